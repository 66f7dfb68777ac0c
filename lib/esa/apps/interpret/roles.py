"""The role catalogue: what a critical weight computes, each role an ablation-verified hypothesis.

A role is one registered `Role` in `ROLES`: a name, a one-line hypothesis, what its test reads, and a
`measure` that turns the captured evidence of one weight and its matched control into a per-input
statistic. Adding a role is adding one entry. `run_roles` tests every (weight, role) pair and returns a
`RoleReport`.

Protocol, shared by every role (every role claim is an ablation against a matched control
with an effect size and a CI):
- the inputs are n held-out windows (`tokens.default_inputs`); the unit of replication is the input;
- the control of a weight is one other weight of the same matrix (same count), drawn with a seed by
  esa.perturb.controls "random_k" (disjoint from the weight);
- ablation = zeroing in place (esa.perturb.apply.perturbed, bit-exact restore). One baseline pass is
  shared by all weights; each weight then costs two passes (weight zeroed, control zeroed) whose hooks
  keep only what the requested roles read; roles (d)-(f) read the baseline only, since zeroing w_ij
  removes exactly w_ij * x_j(t) from output i of its own module, which the baseline already shows;
- per input i the role gives a statistic s_w(i) for the weight and s_c(i) for the control, oriented so
  that larger = more of the role. H1: s_w(i) > max(s_c(i), floor) (one-sided Wilcoxon signed-rank over
  inputs). `floor` is a role's stated bar of a material effect (RoleConfig: what "massive", "nearly
  constant" and "concentrated" mean, and the least sink drop / stopword rise that counts), because a
  deterministic ablation makes the control's effect ~0 with ~0 spread, so any consistent change, however
  small, would be significant. Effect = the weight's mean statistic (exp of it on log-scale roles) with a
  bootstrap CI over inputs; the control's beside it;
- Holm's correction runs across every (weight, role) p of one call; a role is verified at Holm-adjusted
  p < alpha. Role (a) has no effect bar (its factor is reported as measured), only its premise;
- too few usable inputs, or a zero-ablation that is a no-op (the weight is already 0), gives "not
  estimable"; a role whose premise does not hold (no massive channel to create, no attention after the
  weight, a 3-D expert weight whose input is routed) gives "not applicable"; a weight with no verified
  role is "unexplained" (role g), reported as such.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats as sps

from esa.apps.interpret.anatomy import BEFORE_ATTENTION, Anatomy, anatomy, block_of, require, writes_residual
from esa.apps.interpret.passes import Capture, Wants, forward_capture
from esa.apps.interpret.tokens import default_inputs, sink_mask, stopword_ids
from esa.errors import EsaError, unknown
from esa.models.inventory import WeightSpec
from esa.models.loader import LoadedModel
from esa.perturb.apply import perturbed
from esa.perturb.controls import ControlInput, make_control
from esa.perturb.ops import PerturbSpec
from esa.progress import progress
from esa.registry import Registry
from esa.stats.inference import bootstrap_ci, holm
from esa.stats.shares import wilson_interval

KEY = ["param", "expert", "row", "col"]
VERDICTS = ("pass", "fail", "not estimable", "not applicable")
UNEXPLAINED = "unexplained"
_EPS = 1e-30  # keeps logs of exact zeros finite; far below any activation a float32 model produces


# ------------------------------------------------------------------ configuration and evidence
@dataclass
class RoleConfig:
    alpha: float = 0.05  # family-wise, Holm-corrected across the whole catalogue of one call
    massive_ratio: float = 100.0  # "massive" = peak |activation| >= this x the median channel's peak (Sun et al.)
    # material-effect bars of roles b-f (see the module docstring); role (a) has none (issue 19)
    min_sink_drop: float = 0.01  # (b) attention mass on the sink keys, averaged over heads
    min_stopword_ratio: float = 1.1  # (c) ablated / baseline stopword probability mass (Yu et al.: 2-5x)
    max_bias_cv: float = 0.5  # (d) "nearly constant": std over tokens <= half the |mean|
    min_first_token_share: float = 0.5  # (f) at least half the contribution sits on position 0
    sink: str = "first"  # sink keys: "first" (position 0) or "delimiters" (position 0 + punctuation/whitespace)
    seed: int = 0  # control draws (weight i uses seed + i)
    n_boot: int = 2000  # bootstrap resamples of the inputs for each CI
    min_inputs: int = 6  # below this many usable inputs a test is not estimable (Wilcoxon p >= 2^-n)
    batch_size: int | None = None  # inputs per forward batch (None: all at once)
    show_progress: bool = True


@dataclass(frozen=True)
class WeightRef:
    """One weight: its coordinates, its flat index and what its matrix is."""

    param: str
    expert: int
    row: int
    col: int
    flat: int
    layer: int
    spec: WeightSpec

    @property
    def key(self) -> tuple[str, int, int, int]:
        return (self.param, self.expert, self.row, self.col)

    @property
    def module(self) -> str:
        return self.spec.module

    @property
    def label(self) -> str:
        e = f"e{self.expert}," if self.expert >= 0 else ""
        return f"{self.param.removesuffix('.weight')}[{e}{self.row},{self.col}]"


@dataclass
class Evidence:
    """What one role test of one weight sees."""

    weight: WeightRef
    control: WeightRef
    base: Capture
    ablated: Capture | None  # the pass with the weight zeroed (None for roles that read the baseline only)
    control_ablated: Capture | None  # the pass with the control zeroed
    anat: Anatomy
    cfg: RoleConfig
    seqlen: int
    col_index: dict[tuple[str, int], int]  # (module, column) -> position in the captured input columns


@dataclass
class Measure:
    """Per-input statistics of the weight and of its control, oriented so that larger = more of the role."""

    weight: np.ndarray  # (n,)
    control: np.ndarray  # (n,)
    floor: float | None = None  # H1 reference per input is max(control, floor)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Role:
    name: str
    hypothesis: str  # one line
    captures: str  # what the test reads
    effect_name: str  # what the effect number means
    scale: str  # "log": statistics are logs and the effect is exp(mean); "linear": the effect is the mean
    wants: frozenset[str]  # of "residual", "sinks", "stopwords", "inputs"
    ablation: bool  # needs the two ablation passes (else: the baseline only)
    needs: tuple[str, ...]  # model structures (anatomy.require)
    measure: Callable[[Evidence], Measure] | None  # None: the residual role "unexplained"
    dense_only: bool = False  # reads the module input of a plain linear layer (not 3-D experts)
    premise: Callable[[Evidence], str | None] | None = None  # from the baseline alone: why the role cannot apply


# ------------------------------------------------------------------ the roles
def _log(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return np.log(np.maximum(np.asarray(x, dtype=np.float64), _EPS))


def _massive_channel(ev: Evidence) -> tuple[int, float]:
    """The channel role (a) follows and its baseline peak over the median channel's, after the weight's block:
    the weight's row when its module writes the residual stream; otherwise the block's dominant channel,
    the one a weight upstream of the residual write would have to create."""
    peaks = ev.base.residual[ev.weight.layer].double().amax(0)  # (H,) max over inputs and tokens
    channel = ev.weight.row if writes_residual(ev.weight.spec) else int(peaks.argmax())
    return channel, float(peaks[channel] / peaks.median().clamp_min(_EPS))


def _massive_premise(ev: Evidence) -> str | None:
    channel, ratio = _massive_channel(ev)
    if ratio < ev.cfg.massive_ratio:
        return (f"channel {channel} after block {ev.weight.layer} peaks at {ratio:.0f}x the median channel "
                f"(massive means >= {ev.cfg.massive_ratio:g}x)")
    return None


def _creates_massive(ev: Evidence) -> Measure:
    layer = ev.weight.layer
    base = ev.base.residual[layer].double()  # (n, H) max |h| over tokens, after the weight's block
    channel, ratio = _massive_channel(ev)
    details = {"channel": channel, "layer": layer, "peak_over_median": ratio}
    abl, ctl = ev.ablated.residual.double(), ev.control_ablated.residual.double()  # (L, n, H)
    w = _log(base[:, channel]) - _log(abl[layer, :, channel])
    c = _log(base[:, channel]) - _log(ctl[layer, :, channel])
    # the same factor through depth, to see where later blocks rebuild the channel
    depth = (_log(ev.base.residual[layer:, :, channel]) - _log(abl[layer:, :, channel])).mean(1)
    details.update(base_max=float(base[:, channel].mean()), ablated_max=float(abl[layer, :, channel].mean()),
                   control_max=float(ctl[layer, :, channel].mean()),
                   factor_by_depth=[round(float(math.exp(v)), 4) for v in depth])
    return Measure(w, c, details=details)


def _sink_layers(ev: Evidence) -> int:
    """First block whose attention the weight can change: its own if it feeds q/k/v, else the next one."""
    return ev.weight.layer if ev.weight.spec.component in BEFORE_ATTENTION else ev.weight.layer + 1


def _sink_premise(ev: Evidence) -> str | None:
    return "no attention block after this weight" if _sink_layers(ev) >= ev.anat.n_layers else None


def _feeds_sink(ev: Evidence) -> Measure:
    start = _sink_layers(ev)
    base = ev.base.sinks[start:].double()  # (l, n, heads)
    drop_w = base - ev.ablated.sinks[start:].double()
    drop_c = base - ev.control_ablated.sinks[start:].double()
    head_drop = drop_w.mean(1)  # (l, heads) mean over inputs
    top = int(head_drop.argmax())
    details = {"first_layer": start, "base_mass": float(base.mean()),
               "top_head": [start + top // head_drop.shape[1], top % head_drop.shape[1]],
               "top_head_drop": float(head_drop.max()), "heads_dropping_0.1": int((head_drop > 0.1).sum()),
               "head_base": base.mean(1).numpy(), "head_drop": head_drop.numpy(),
               "head_drop_control": drop_c.mean(1).numpy()}
    return Measure(drop_w.mean((0, 2)).numpy(), drop_c.mean((0, 2)).numpy(), floor=ev.cfg.min_sink_drop,
                   details=details)


def _suppresses_stopwords(ev: Evidence) -> Measure:
    base = ev.base.stop_mass.double().mean(1)  # (n,) mean over positions
    abl, ctl = ev.ablated.stop_mass.double().mean(1), ev.control_ablated.stop_mass.double().mean(1)
    return Measure(_log(abl) - _log(base), _log(ctl) - _log(base), floor=math.log(ev.cfg.min_stopword_ratio),
                   details={"base_mass": float(base.mean()), "ablated_mass": float(abl.mean()),
                            "control_mass": float(ctl.mean())})


def _column(ev: Evidence, ref: WeightRef) -> np.ndarray:
    x = ev.base.inputs[ref.module]  # (n, T, ncols)
    return x[..., ev.col_index[(ref.module, ref.col)]].double().numpy()  # (n, T)


def _bias_like(ev: Evidence) -> Measure:
    def inv_cv(x: np.ndarray) -> np.ndarray:  # |mean| / std over tokens, per input; CV of w*x_j = CV of x_j
        return _log(np.abs(x.mean(1))) - _log(x.std(1))

    xw, xc = _column(ev, ev.weight), _column(ev, ev.control)
    return Measure(inv_cv(xw), inv_cv(xc), floor=-math.log(ev.cfg.max_bias_cv), details={"cv": float(np.exp(-inv_cv(xw).mean())),
                                                    "cv_control": float(np.exp(-inv_cv(xc).mean()))})


def _reads_massive(ev: Evidence) -> Measure:
    med = _log(ev.base.input_median_peak[ev.weight.module].double())  # (n,)
    sw = _log(np.abs(_column(ev, ev.weight)).max(1)) - med
    sc = _log(np.abs(_column(ev, ev.control)).max(1)) - med
    return Measure(sw, sc, floor=math.log(ev.cfg.massive_ratio),
                   details={"input_channel": ev.weight.col, "massive_ratio": ev.cfg.massive_ratio})


def _first_token(ev: Evidence) -> Measure:
    def share(x: np.ndarray) -> np.ndarray:  # |w x_j(0)| / sum_t |w x_j(t)|: w cancels
        a = np.abs(x)
        return a[:, 0] / np.maximum(a.sum(1), _EPS)

    floor = max(1.0 / ev.seqlen, ev.cfg.min_first_token_share)
    return Measure(share(_column(ev, ev.weight)), share(_column(ev, ev.control)), floor=floor,
                   details={"uniform_share": 1.0 / ev.seqlen, "floor": floor})


ROLES: Registry[Role] = Registry("role", [
    Role("creates_massive",
         "(a) the weight creates a massive activation: zeroing it shrinks the channel's residual-stream peak "
         "after its block far more than zeroing a random weight of its matrix",
         "residual stream after every block: per-channel max |h| over tokens",
         "shrink factor of the channel's peak (baseline / ablated)", "log",
         frozenset({"residual"}), True, ("layers",), _creates_massive, premise=_massive_premise),
    Role("feeds_sink",
         "(b) the weight feeds attention sinks: zeroing it lowers the attention mass heads put on the sink "
         "token(s), averaged over the heads of every later block, by >= min_sink_drop and more than a random weight",
         "each attention module's probabilities, reduced to per-head mass on the sink keys",
         "drop in attention mass on the sink keys (mean over heads)", "linear",
         frozenset({"sinks"}), True, ("layers", "attention_probs"), _feeds_sink, premise=_sink_premise),
    Role("suppresses_stopwords",
         "(c) the weight suppresses stopwords: zeroing it raises the next-token probability mass on stopwords "
         "by >= min_stopword_ratio and more than a random weight (Yu et al. 2024)",
         "LM-head output, reduced to the probability mass on the stopword ids per position",
         "ratio of stopword probability mass (ablated / baseline)", "log",
         frozenset({"stopwords"}), True, ("lm_head",), _suppresses_stopwords),
    Role("bias_like",
         "(d) the weight acts like a bias: its contribution w*x_j(t) to its module's output is nearly constant "
         "across tokens (coefficient of variation <= max_bias_cv) and more so than a random weight's",
         "baseline input column x_j of the weight's module",
         "1 / CV of w*x_j over tokens (|mean| / std)", "log",
         frozenset({"inputs"}), False, (), _bias_like, dense_only=True),
    Role("reads_massive",
         "(e) the weight reads a massive channel: its input column peaks at >= massive_ratio x the median "
         "input channel, and above a random column of its matrix",
         "baseline input column x_j and the median over channels of max_t |x|",
         "peak |x_j| / median channel peak", "log",
         frozenset({"inputs"}), False, (), _reads_massive, dense_only=True),
    Role("first_token",
         "(f) the weight handles the first token: the share of its contribution |w*x_j(t)| at position 0 "
         "is >= min_first_token_share (and 1/T) and above a random weight's",
         "baseline input column x_j of the weight's module",
         "share of sum_t |w*x_j(t)| at position 0", "linear",
         frozenset({"inputs"}), False, (), _first_token, dense_only=True),
    Role(UNEXPLAINED,
         "(g) none of the tested roles is verified for the weight at the Holm-corrected alpha",
         "nothing (the complement of the other roles)", "", "linear", frozenset(), False, (), None),
], base=Role, describe=lambda r: r.hypothesis)
ABLATION_ROLES = [r.name for r in ROLES.values() if r.ablation]  # (a)-(c): verified by zeroing the weight


def parse_roles(names: str | Iterable[str] | None) -> list[str]:
    """Role names (comma-separated or a list; None = all); EsaError on an unknown one."""
    if names is None:
        return list(ROLES)
    items = [n.strip() for n in names.split(",")] if isinstance(names, str) else [str(n).strip() for n in names]
    items = [n for n in items if n]
    for n in items:
        ROLES.lookup(n)
    if not items:
        raise EsaError(f"no roles given; accepted: {', '.join(ROLES)}")
    return list(dict.fromkeys(items))


def catalogue() -> pd.DataFrame:
    """The registered roles: name, hypothesis, what the test reads, effect, cost."""
    return pd.DataFrame([{"role": r.name, "hypothesis": r.hypothesis, "captures": r.captures,
                          "effect": r.effect_name, "passes_per_weight": 2 if r.ablation else 0}
                         for r in ROLES.values()])


# ------------------------------------------------------------------ selection -> weights
def top_selection(selection: pd.DataFrame, k: int, by: str = "rank") -> pd.DataFrame:
    """The k best rows of each metric of a selection table (`by`: "rank" ascending or "score" descending)."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k <= 0:
        raise EsaError(f"k must be a positive integer, got {k!r}")
    if by not in selection:
        raise EsaError(f"the selection has no column {by!r} to take the top {k} by; columns: {list(selection)}")
    metric = selection["metric"] if "metric" in selection else pd.Series("selection", index=selection.index)
    parts = []
    for m, rows in selection.assign(metric=metric).groupby("metric", sort=True):
        if k > len(rows):
            raise EsaError(f"k={k} is larger than the {len(rows)} candidates available for metric {m!r}")
        parts.append(rows.sort_values(by, ascending=by == "rank", kind="mergesort").head(k))
    return pd.concat(parts, ignore_index=True)


def weight_refs(selection: pd.DataFrame, inventory: list[WeightSpec], anat: Anatomy) -> tuple[list[WeightRef],
                                                                                                 pd.DataFrame]:
    """Deduplicated weights of a selection table, and its (weight key, metric) membership."""
    missing = [c for c in ("param", "row", "col") if c not in selection]
    if missing:
        raise EsaError(f"the selection table lacks columns {missing}; it needs param, row, col "
                       "(optional: expert, metric)")
    if selection.empty:
        raise EsaError("the selection table is empty: no weights to test")
    specs = {s.name: s for s in inventory}
    sel = selection.assign(expert=selection.get("expert", -1), metric=selection.get("metric", "selection"))
    sel["expert"] = pd.to_numeric(sel["expert"]).fillna(-1)  # tables concatenated with and without experts
    refs: dict[tuple, WeightRef] = {}
    for param, expert, row, col in sel[KEY].itertuples(index=False):
        if param not in specs:
            raise EsaError(f"selection names parameter {param!r}, which is not in the model's weight inventory")
        spec = specs[param]
        expert, row, col = int(expert), int(row), int(col)
        if not (0 <= row < spec.rows and 0 <= col < spec.cols) or (spec.n_experts and not 0 <= expert < spec.n_experts):
            raise EsaError(f"selection index ({expert}, {row}, {col}) is out of range for {param} with shape {spec.shape}")
        key = (param, expert if spec.n_experts else -1, row, col)
        if key not in refs:
            flat = int(spec.ravel(torch.tensor([key[1]]), torch.tensor([row]), torch.tensor([col]))[0])
            refs[key] = WeightRef(param, key[1], row, col, flat, block_of(anat, param), spec)
    member = sel.assign(expert=[-1 if not specs[p].n_experts else int(e) for p, e in zip(sel["param"], sel["expert"],
                                                                                         strict=True)])
    member = member[[*KEY, "metric"]].drop_duplicates().reset_index(drop=True)
    return list(refs.values()), member


def _control(model: torch.nn.Module, inventory: list[WeightSpec], ref: WeightRef, seed: int) -> WeightRef:
    top = {ref.param: torch.tensor([ref.flat], dtype=torch.long)}
    drawn = make_control("random_k", ControlInput(model, inventory, top, seed=seed))[ref.param]
    e, r, c = ref.spec.unravel(drawn)
    return WeightRef(ref.param, int(e[0]), int(r[0]), int(c[0]), int(drawn[0]), ref.layer, ref.spec)


# ------------------------------------------------------------------ one test
def _test(role: Role, m: Measure, cfg: RoleConfig) -> dict[str, Any]:
    """Wilcoxon signed-rank of s_w - max(s_c, floor) > 0 over inputs; effect and CI from s_w."""
    w, c = np.asarray(m.weight, dtype=float), np.asarray(m.control, dtype=float)
    ref = np.maximum(c, m.floor) if m.floor is not None else c
    ok = np.isfinite(w) & np.isfinite(ref)
    n = int(ok.sum())
    out: dict[str, Any] = {"n_inputs": n, "effect": math.nan, "ci_lo": math.nan, "ci_hi": math.nan,
                           "control_effect": math.nan, "diff": math.nan, "p": math.nan, "note": ""}
    if n < cfg.min_inputs:
        out["note"] = f"{n} usable inputs (< {cfg.min_inputs}): not estimable"
        return out
    w, c, d = w[ok], c[ok], w[ok] - ref[ok]
    tf = np.exp if role.scale == "log" else (lambda v: v)
    est, lo, hi = bootstrap_ci(w, n_boot=cfg.n_boot, seed=cfg.seed)
    out.update(effect=float(tf(est)), ci_lo=float(tf(lo)), ci_hi=float(tf(hi)), control_effect=float(tf(c.mean())),
               diff=float(d.mean()))
    nz = d[d != 0]
    if nz.size == 0:
        out.update(p=1.0, note="identical to the control on every input")
    else:
        # the exact null distribution up to 50 inputs, also with tied differences (an input-independent
        # massive activation gives nearly the same factor on every input; scipy's default would then switch
        # to the normal approximation, whose p for 16 all-positive differences is ~10x the exact 2^-16)
        method = "exact" if nz.size <= 50 else "auto"
        out["p"] = float(sps.wilcoxon(nz, alternative="greater", method=method).pvalue)
    return out


# ------------------------------------------------------------------ the report
@dataclass
class RoleReport:
    tests: pd.DataFrame  # one row per (weight, role): effect, CI, control, p, p_holm, verdict, note
    weights: pd.DataFrame  # one row per weight: roles (";"-joined verified roles), n_roles, explained, metrics
    heads: pd.DataFrame  # role (b): per (weight, layer, head) base sink mass, drop, control's drop
    membership: pd.DataFrame  # (param, expert, row, col, metric): which selection each weight came from
    config: dict[str, Any]
    timing: dict[str, Any]


def roles_for(lm: LoadedModel, selection: pd.DataFrame, inputs: torch.Tensor | None = None,
              roles: str | Sequence[str] | None = None, cfg: RoleConfig | None = None) -> RoleReport:
    """`run_roles` for a loaded model (esa.models.load)."""
    return run_roles(lm.model, lm.tokenizer, lm.inventory, selection, inputs, roles, cfg)


def run_roles(model: torch.nn.Module, tokenizer: Any, inventory: list[WeightSpec], selection: pd.DataFrame,
              inputs: torch.Tensor | None = None, roles: str | Sequence[str] | None = None,
              cfg: RoleConfig | None = None) -> RoleReport:
    """Test every weight of `selection` (columns param, row, col, [expert], [metric]) for every role.

    `inputs`: (n, T) token ids (default: tokens.default_inputs, 16 held-out windows of 32 tokens). Cost:
    one baseline pass, plus two passes per weight when an ablation role (a-c) is asked for; hooks keep only
    what the asked roles read."""
    cfg = cfg or RoleConfig()
    t0 = time.perf_counter()
    if inputs is None:
        inputs = default_inputs(tokenizer)
    names = parse_roles(roles)
    tested = [ROLES[n] for n in names if ROLES[n].measure is not None]
    anat = anatomy(model)
    require(anat, "the role catalogue", ("layers",))
    for r in tested:
        require(anat, f"role {r.name}", r.needs)
    if inputs.dim() != 2 or inputs.shape[0] < cfg.min_inputs or inputs.shape[1] < 2:
        raise EsaError(f"role inputs must be (n >= {cfg.min_inputs}, T >= 2) token ids, got {tuple(inputs.shape)}")
    refs, member = weight_refs(selection, inventory, anat)
    wants_all = frozenset().union(*(r.wants for r in tested)) if tested else frozenset()
    stop_ids = stopword_ids(tokenizer) if "stopwords" in wants_all else None
    mask = sink_mask(inputs, tokenizer, cfg.sink)
    controls = [_control(model, inventory, ref, cfg.seed + i) for i, ref in enumerate(refs)]
    params = dict(model.named_parameters())

    # baseline: one pass for all weights; input columns of every tested weight and its control
    cols: dict[str, set[int]] = {}
    if "inputs" in wants_all:
        for ref, ctl in zip(refs, controls, strict=True):
            if not ref.spec.n_experts:
                cols.setdefault(ref.module, set()).update({ref.col, ctl.col})
    col_t = {m: torch.tensor(sorted(v), dtype=torch.long) for m, v in cols.items()}
    col_index = {(m, int(c)): i for m, t in col_t.items() for i, c in enumerate(t.tolist())}
    base_wants = Wants(residual="residual" in wants_all, sinks="sinks" in wants_all, stopwords=stop_ids, inputs=col_t)
    base = forward_capture(model, anat, inputs, base_wants, mask, cfg.batch_size)
    t_base = time.perf_counter() - t0
    n_passes = 1

    rows, head_rows = [], []
    zero = PerturbSpec("zero")
    for ref, ctl in progress(list(zip(refs, controls, strict=True)), desc="roles", disable=not cfg.show_progress):
        wanted = [r for r in tested if not (r.dense_only and ref.spec.n_experts)]
        ev = Evidence(ref, ctl, base, None, None, anat, cfg, int(inputs.shape[1]), col_index)
        skips = {r.name: r.premise(ev) for r in wanted if r.premise is not None}
        ablation = [r for r in wanted if r.ablation and not skips.get(r.name)]
        is_zero = bool(params[ref.param].detach().reshape(-1)[ref.flat] == 0)
        abl = ctl_abl = None
        if ablation and not is_zero:
            # the two passes keep only what this weight's applicable ablation roles read
            wants = frozenset().union(*(r.wants for r in ablation))
            abl_wants = Wants(residual="residual" in wants, sinks="sinks" in wants,
                              stopwords=stop_ids if "stopwords" in wants else None)
            with perturbed(model, {ref.param: torch.tensor([ref.flat])}, zero):
                abl = forward_capture(model, anat, inputs, abl_wants, mask, cfg.batch_size)
            with perturbed(model, {ctl.param: torch.tensor([ctl.flat])}, zero):
                ctl_abl = forward_capture(model, anat, inputs, abl_wants, mask, cfg.batch_size)
            n_passes += 2
            ev.ablated, ev.control_ablated = abl, ctl_abl
        for role in tested:
            row = {**dict(zip(KEY, ref.key, strict=True)), "layer": ref.layer, "component": ref.spec.component,
                   "role": role.name, "control_row": ctl.row, "control_col": ctl.col,
                   "effect_name": role.effect_name, "details": "{}"}
            if role not in wanted:
                rows.append({**row, "verdict": "not applicable", "note": "3-D expert weight: its input is routed"})
                continue
            if skips.get(role.name):
                rows.append({**row, "verdict": "not applicable", "note": skips[role.name]})
                continue
            if role.ablation and is_zero:
                rows.append({**row, "verdict": "not estimable",
                             "note": "the weight is exactly 0: zeroing it is a no-op"})
                continue
            m = role.measure(ev)
            res = _test(role, m, cfg)
            rows.append({**row, **res, "details": _json(m.details)})
            if role.name == "feeds_sink":
                hb, hd, hc = m.details["head_base"], m.details["head_drop"], m.details["head_drop_control"]
                for li in range(hb.shape[0]):
                    for h in range(hb.shape[1]):
                        head_rows.append({**dict(zip(KEY, ref.key, strict=True)),
                                          "layer": m.details["first_layer"] + li, "head": h,
                                          "base_mass": float(hb[li, h]), "drop": float(hd[li, h]),
                                          "control_drop": float(hc[li, h])})
    tests = _finish(pd.DataFrame(rows), cfg)
    weights = _assign(tests, refs, member, names)
    timing = {"seconds": time.perf_counter() - t0, "baseline_seconds": t_base, "forward_passes": n_passes,
              "n_weights": len(refs), "inputs": tuple(inputs.shape)}
    return RoleReport(tests, weights, pd.DataFrame(head_rows), member,
                      {**asdict(cfg), "roles": names, "stopword_ids": 0 if stop_ids is None else int(stop_ids.numel())},
                      timing)


def _json(details: dict[str, Any]) -> str:
    """A role's details as JSON (per-head arrays go to RoleReport.heads instead), so tables stay flat."""
    return json.dumps({k: v for k, v in details.items() if not k.startswith("head_")}, default=float)


def _finish(tests: pd.DataFrame, cfg: RoleConfig) -> pd.DataFrame:
    """Holm across every finite p of the catalogue; verdicts."""
    for col, default in (("p", math.nan), ("note", ""), ("effect", math.nan), ("ci_lo", math.nan),
                         ("ci_hi", math.nan), ("control_effect", math.nan), ("diff", math.nan), ("n_inputs", 0),
                         ("verdict", None)):
        if col not in tests:
            tests[col] = default
    tests["note"] = tests["note"].fillna("")
    tests["p_holm"] = holm(tests["p"].to_numpy(dtype=float)) if len(tests) else []
    decided = tests["verdict"].isna()
    p_holm = tests["p_holm"].to_numpy(dtype=float)
    verdict = np.where(np.isnan(p_holm), "not estimable", np.where(p_holm < cfg.alpha, "pass", "fail"))
    tests.loc[decided, "verdict"] = verdict[decided.to_numpy()]
    tests["n_inputs"] = tests["n_inputs"].fillna(0).astype(int)
    cols = [*KEY, "layer", "component", "role", "verdict", "effect", "ci_lo", "ci_hi", "control_effect", "diff", "p",
            "p_holm", "n_inputs", "effect_name", "control_row", "control_col", "note", "details"]
    return tests[cols]


def _assign(tests: pd.DataFrame, refs: list[WeightRef], member: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    rows = []
    metrics = member.groupby(KEY)["metric"].apply(lambda s: ";".join(sorted(set(s)))).to_dict()
    for ref in refs:
        t = tests[(tests["param"] == ref.param) & (tests["expert"] == ref.expert) & (tests["row"] == ref.row)
                  & (tests["col"] == ref.col)]
        verified = sorted(t.loc[t["verdict"] == "pass", "role"])
        rows.append({**dict(zip(KEY, ref.key, strict=True)), "layer": ref.layer, "component": ref.spec.component,
                     "label": ref.label, "metrics": metrics.get(ref.key, ""),
                     "roles": ";".join(verified) if verified else (UNEXPLAINED if UNEXPLAINED in names else ""),
                     "n_roles": len(verified), "explained": bool(verified),
                     "n_not_estimable": int((t["verdict"] == "not estimable").sum())})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------ summaries
def criterion(report: RoleReport, metric: str | None = None, roles: Sequence[str] | None = None,
              level: float = 0.95) -> dict[str, Any]:
    """The guide's criterion: share of the weights (of one metric, or all) with >= 1 verified role, Wilson CI.

    `roles` restricts what counts (e.g. the ablation roles a-c only: (e) and (f) describe the weight's input
    column, which act_mag = |W| * ||X_j|| favours by construction)."""
    w = report.weights
    if metric is not None:
        keys = report.membership[report.membership["metric"] == metric][KEY]
        if keys.empty:
            raise unknown("metric", metric, sorted(set(report.membership["metric"])))
        w = w.merge(keys, on=KEY)
    counted = parse_roles(roles) if roles is not None else [r for r in report.config["roles"] if r != UNEXPLAINED]
    explained = w["roles"].str.split(";").apply(lambda rs: any(r in counted for r in rs)) if len(w) else w["roles"]
    n, k = len(w), int(explained.sum()) if len(w) else 0
    base = {"metric": metric or "all", "roles": ";".join(counted), "n": n, "explained": k}
    if n == 0:
        return {**base, "share": math.nan, "ci_lo": math.nan, "ci_hi": math.nan, "note": "no weights: not estimable"}
    lo, hi = wilson_interval(k, n, level)
    return {**base, "share": k / n, "ci_lo": lo, "ci_hi": hi,
            "note": "Wilson interval" + ("; fewer than 10 weights" if n < 10 else "")}


def role_metric_table(report: RoleReport) -> pd.DataFrame:
    """Share of each metric's weights with each verified role (rows: roles incl. unexplained; cols: metrics + all)."""
    roles = list(report.config["roles"])
    w = report.weights.merge(report.membership, on=KEY)
    out = {}
    for metric, g in [*sorted(w.groupby("metric"), key=lambda x: x[0]), ("all", report.weights)]:
        sets = g["roles"].str.split(";")
        out[metric] = {r: float(np.mean([r in s for s in sets])) if len(g) else math.nan for r in roles}
        out[metric]["n_weights"] = len(g)
    return pd.DataFrame(out)


def wide_table(report: RoleReport) -> pd.DataFrame:
    """One row per weight, with every role's effect, p, Holm p and verdict (the roles.parquet layout)."""
    t = report.tests
    wide = report.weights.drop(columns=["n_not_estimable"])
    for role, g in t.groupby("role", sort=False):
        part = g[[*KEY, "effect", "ci_lo", "ci_hi", "control_effect", "p", "p_holm", "verdict"]].rename(
            columns={c: f"{role}_{c}" for c in ("effect", "ci_lo", "ci_hi", "control_effect", "p", "p_holm", "verdict")})
        wide = wide.merge(part, on=KEY, how="left")
    return wide
