"""Knowledge localisation: do the weights a probe set calibrates on hold its facts, more than generic text's?

Two tests (Hase et al. 2023: localisation claims need a direct test):
- selectivity (`selectivity`): zero the top-k weights of a probe-calibrated sensitivity score, of a
  generic-calibrated one, and a random-k control matched per matrix to the probe top-k; for each, the drop
  in probe accuracy and the rise in the answers' NLL, each divided by the rise in generic loss (delta
  log-PPL, nats/token, on held-out windows). Bootstrap CIs resample probe items and windows independently;
  a ratio whose denominator's CI reaches 0 is "not estimable" (the generic loss did not measurably rise);
- the direct test (`direct_test`): for candidate weights (the probe top-n plus random weights), zero each
  alone and measure the rise of the answers' NLL; Spearman of that effect (signed, and its magnitude) with
  the weight's probe score, with its generic score (the control) and with its specificity
  log(probe score / generic score), over all candidates and within the probe top-n, bootstrap CIs over
  weights.
Probe calibration runs a registered sensitivity metric on windows made of the probe statements (prompt +
answer); `metric_scores` is the one call into the metric registry. `localisation` runs all of it for a loaded model:
probe accuracy, the selectivity of the three ablations, and the direct test.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats as sps

from esa.apps.interpret.correlation import spearman_ci
from esa.apps.interpret.probes import (
    ProbeSet,
    answer_nll,
    build_probes,
    probe_statements,
    probe_summary,
    score_probes,
)
from esa.errors import EsaError
from esa.evaluate import evaluate
from esa.models.inventory import WeightSpec
from esa.models.loader import LoadedModel
from esa.perturb.apply import Targets, perturbed, targets_from_selection
from esa.perturb.controls import ControlInput, make_control
from esa.perturb.ops import PerturbSpec
from esa.progress import progress
from esa.sensitivity.metrics import MetricConfig, get_metric
from esa.sensitivity.select import select_topk
from esa.stats.inference import capped, holm, log_ppl_cap

CONDITIONS = ("probe_top_k", "generic_top_k", "random_k")


# ------------------------------------------------------------------ calibration
def probe_windows(tokenizer: Any, probes: ProbeSet, seqlen: int = 64) -> torch.Tensor:
    """The probe statements, one per line, as a token stream cut into (n, seqlen) windows (the remainder is
    dropped); a BOS column when the tokenizer prepends one."""
    if seqlen < 2:
        raise EsaError(f"seqlen must be at least 2, got {seqlen}")
    stream: list[int] = []
    for s in probe_statements(probes):
        stream.extend(tokenizer(s + "\n", add_special_tokens=False)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    probe = tokenizer("a")["input_ids"]
    bos = bos if bos is not None and probe and probe[0] == bos else None
    body = seqlen - 1 if bos is not None else seqlen
    n = len(stream) // body
    if n == 0:
        raise EsaError(f"the probe statements give {len(stream)} tokens, fewer than one window of {seqlen}")
    ids = torch.tensor(stream[: n * body], dtype=torch.long).view(n, body)
    if bos is not None:
        ids = torch.cat([torch.full((n, 1), bos, dtype=torch.long), ids], dim=1)
    return ids


def metric_scores(model: torch.nn.Module, inventory: list[WeightSpec], ids: torch.Tensor, metric: str = "grad_x_weight",
                  cfg: MetricConfig | None = None) -> dict[str, torch.Tensor]:
    """The one call into the sensitivity registry: per-weight scores of `metric` calibrated on `ids`."""
    return get_metric(metric)(model, inventory, ids, cfg or MetricConfig(show_progress=False)).scores


def top_targets(scores: Mapping[str, torch.Tensor], inventory: list[WeightSpec], k: int,
                mode: str = "global") -> tuple[Targets, pd.DataFrame]:
    """Top-k of `scores` as a target set and its selection table; EsaError when k exceeds the candidates."""
    specs = [s for s in inventory if s.name in scores]
    total = sum(s.numel for s in specs) if mode == "global" else min((s.rows * s.cols for s in specs), default=0)
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k <= 0:
        raise EsaError(f"k must be a positive integer, got {k!r}")
    if k > total:
        raise EsaError(f"k={k} is larger than the {total} candidate weights available "
                       f"({'all scored weights' if mode == 'global' else 'the smallest matrix'}, mode {mode})")
    sel = select_topk(dict(scores), specs, k, mode)
    return targets_from_selection(sel, inventory), sel


def _without(scores: Mapping[str, torch.Tensor], exclude: Targets | None) -> dict[str, torch.Tensor]:
    """Scores with the excluded weights set to -inf (copies of the touched matrices only)."""
    out = dict(scores)
    for name, idx in (exclude or {}).items():
        if name in out and idx.numel():
            t = out[name].detach().clone().float()
            t.view(-1)[idx.to(t.device)] = -math.inf
            out[name] = t
    return out


def ablation_sets(model: torch.nn.Module, inventory: list[WeightSpec], probe_scores: Mapping[str, torch.Tensor],
                  generic_scores: Mapping[str, torch.Tensor], k: int, mode: str = "global", seed: int = 0,
                  exclude: Targets | None = None) -> dict[str, Targets]:
    """{probe_top_k, generic_top_k, random_k}: random_k matches the probe top-k's count per matrix.

    `exclude` (e.g. the super-weight detector's candidates) is left out of both rankings: zeroing a super
    weight destroys the model whatever it was calibrated on, which leaves no room to see selectivity."""
    probe_t, _ = top_targets(_without(probe_scores, exclude), inventory, k, mode)
    generic_t, _ = top_targets(_without(generic_scores, exclude), inventory, k, mode)
    random_t = make_control("random_k", ControlInput(model, inventory, probe_t, seed=seed))
    return {"probe_top_k": probe_t, "generic_top_k": generic_t, "random_k": random_t}


# ------------------------------------------------------------------ selectivity
@dataclass
class SelectivityResult:
    table: pd.DataFrame  # one row per condition: accuracy, deltas with CIs, selectivity ratios with CIs
    comparisons: pd.DataFrame  # paired tests between conditions (Holm across them)
    base: dict[str, Any]  # the unablated model: probe accuracy, chance, generic log-PPL


def _measure(model: torch.nn.Module, tokenizer: Any, probes: ProbeSet, eval_ids: torch.Tensor) -> dict[str, np.ndarray]:
    sc = score_probes(model, tokenizer, probes)
    ev = evaluate(model, eval_ids, show_progress=False)
    return {"correct": sc.correct.astype(float), "answer_nll": sc.answer_nll, "window_nll": np.array(ev.window_nll)}


def _boot_ratio(num: np.ndarray, den: np.ndarray, n_boot: int, level: float, seed: int) -> tuple[float, float, float,
                                                                                                  float, float]:
    """mean(num) / mean(den) with num (items) and den (windows) resampled independently; also den's CI."""
    rng = np.random.default_rng(seed)
    bn = num[rng.integers(0, num.size, (n_boot, num.size))].mean(1)
    bd = den[rng.integers(0, den.size, (n_boot, den.size))].mean(1)
    q = [(1 - level) / 2, 1 - (1 - level) / 2]
    d_lo, d_hi = np.quantile(bd, q)
    est = float(num.mean() / den.mean()) if den.mean() != 0 else math.nan
    if d_lo <= 0:  # the generic loss did not measurably rise: the ratio has no finite CI
        return math.nan, math.nan, math.nan, float(d_lo), float(d_hi)
    lo, hi = np.quantile(bn / bd, q)
    return est, float(lo), float(hi), float(d_lo), float(d_hi)


def selectivity(model: torch.nn.Module, tokenizer: Any, probes: ProbeSet, eval_ids: torch.Tensor,
                sets: Mapping[str, Targets], n_boot: int = 2000, level: float = 0.95, seed: int = 0,
                show_progress: bool = True) -> SelectivityResult:
    """Zero each target set in turn (bit-exact restore); probe and generic damage and their ratios."""
    if not sets:
        raise EsaError("selectivity needs at least one target set")
    base = _measure(model, tokenizer, probes, eval_ids)
    res = {}
    for name in progress(list(sets), desc="selectivity", disable=not show_progress):
        with perturbed(model, dict(sets[name]), PerturbSpec("zero")):
            res[name] = _measure(model, tokenizer, probes, eval_ids)
    # catastrophic damage can overflow the NLL: cap non-finite values (stated), never drop them
    cap = log_ppl_cap(np.concatenate([base["window_nll"], base["answer_nll"],
                                      *[np.concatenate([r["window_nll"], r["answer_nll"]]) for r in res.values()]]))
    for r in (base, *res.values()):
        r["n_capped"] = int((~np.isfinite(r["window_nll"])).sum() + (~np.isfinite(r["answer_nll"])).sum())
        r["window_nll"], r["answer_nll"] = capped(r["window_nll"], cap), capped(r["answer_nll"], cap)
    rows, deltas = [], {}
    q = [(1 - level) / 2, 1 - (1 - level) / 2]
    rng = np.random.default_rng(seed)
    for name, r in res.items():
        d_acc = base["correct"] - r["correct"]  # (items,) drop in accuracy
        d_pnll = r["answer_nll"] - base["answer_nll"]  # (items,) rise of the answers' NLL
        d_gnll = r["window_nll"] - base["window_nll"]  # (windows,) rise of generic loss
        deltas[name] = (d_acc, d_pnll, d_gnll)
        ci = {lab: np.quantile(v[rng.integers(0, v.size, (n_boot, v.size))].mean(1), q)
              for lab, v in (("acc", d_acc), ("pnll", d_pnll), ("gnll", d_gnll))}
        s_acc = _boot_ratio(d_acc, d_gnll, n_boot, level, seed)
        s_nll = _boot_ratio(d_pnll, d_gnll, n_boot, level, seed + 1)
        note = "" if not math.isnan(s_acc[0]) else "generic loss did not rise measurably: selectivity not estimable"
        rows.append({"condition": name, "n_weights": int(sum(int(v.numel()) for v in sets[name].values())),
                     "probe_accuracy": float(r["correct"].mean()), "drop_accuracy": float(d_acc.mean()),
                     "drop_accuracy_lo": float(ci["acc"][0]), "drop_accuracy_hi": float(ci["acc"][1]),
                     "rise_answer_nll": float(d_pnll.mean()), "rise_answer_nll_lo": float(ci["pnll"][0]),
                     "rise_answer_nll_hi": float(ci["pnll"][1]), "rise_log_ppl": float(d_gnll.mean()),
                     "rise_log_ppl_lo": float(ci["gnll"][0]), "rise_log_ppl_hi": float(ci["gnll"][1]),
                     "selectivity_acc": s_acc[0], "selectivity_acc_lo": s_acc[1], "selectivity_acc_hi": s_acc[2],
                     "selectivity_nll": s_nll[0], "selectivity_nll_lo": s_nll[1], "selectivity_nll_hi": s_nll[2],
                     "n_capped": r["n_capped"], "note": note})
    comps = []
    names = list(res)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            for what, j in (("rise_answer_nll", 1), ("rise_log_ppl", 2)):
                d = deltas[a][j] - deltas[b][j]
                nz = d[d != 0]
                p = float(sps.wilcoxon(nz).pvalue) if nz.size else 1.0  # two-sided: either may hurt more
                comps.append({"a": a, "b": b, "measure": what, "mean_diff": float(d.mean()), "n": int(d.size),
                              "p": p})
    comparisons = pd.DataFrame(comps)
    if len(comparisons):
        comparisons["p_holm"] = holm(comparisons["p"].to_numpy())
    base_info = {"probe_accuracy": float(base["correct"].mean()), "chance": probes.chance,
                 "log_ppl": float(base["window_nll"].mean()), "n_items": len(probes),
                 "n_windows": int(eval_ids.shape[0]), "seqlen": int(eval_ids.shape[1]), "nll_cap": cap}
    return SelectivityResult(pd.DataFrame(rows), comparisons, base_info)


# ------------------------------------------------------------------ the direct (Hase-style) test
def _lookup(scores: Mapping[str, torch.Tensor], sel: pd.DataFrame, inventory: list[WeightSpec]) -> np.ndarray:
    specs = {s.name: s for s in inventory}
    out = np.zeros(len(sel))
    for i, (p, e, r, c) in enumerate(sel[["param", "expert", "row", "col"]].itertuples(index=False)):
        spec = specs[p]
        flat = int(spec.ravel(torch.tensor([e]), torch.tensor([r]), torch.tensor([c]))[0])
        out[i] = float(scores[p].reshape(-1)[flat])
    return out


def direct_candidates(model: torch.nn.Module, inventory: list[WeightSpec], probe_scores: Mapping[str, torch.Tensor],
                      generic_scores: Mapping[str, torch.Tensor], n_top: int = 30, n_random: int = 30,
                      seed: int = 0) -> pd.DataFrame:
    """The probe-score top-n_top weights plus n_random uniform random weights (disjoint), with both scores."""
    top_t, top_sel = top_targets(probe_scores, inventory, n_top, "global")
    specs = [s for s in inventory if s.name in probe_scores]
    if n_random > sum(s.numel for s in specs) - n_top:
        raise EsaError(f"n_random={n_random} is larger than the {sum(s.numel for s in specs) - n_top} weights "
                       "outside the top set")
    parts = [top_sel.assign(group="probe_top")]
    if n_random:
        rnd = make_control("random_global", ControlInput(model, specs, top_t, seed=seed))
        rows = []
        by_name = {s.name: s for s in specs}
        for name, idx in rnd.items():
            e, r, c = by_name[name].unravel(idx)
            rows += [{"param": name, "expert": int(a), "row": int(b), "col": int(d)}
                     for a, b, d in zip(e.tolist(), r.tolist(), c.tolist(), strict=True)]
        parts.append(pd.DataFrame(rows).assign(group="random"))
    cand = pd.concat(parts, ignore_index=True)[["param", "expert", "row", "col", "group"]]
    cand["probe_score"] = _lookup(probe_scores, cand, inventory)
    cand["generic_score"] = _lookup(generic_scores, cand, inventory)
    cand["specificity"] = np.log(np.maximum(cand["probe_score"], 1e-30)) - np.log(np.maximum(cand["generic_score"],
                                                                                             1e-30))
    return cand


@dataclass
class DirectTest:
    table: pd.DataFrame  # per weight: scores, specificity, effect (rise of the answers' NLL when zeroed)
    correlations: pd.DataFrame  # predictor x target x subset: Spearman rho, CI, p, n, note

    def rho(self, predictor: str = "probe_score", target: str = "abs_effect", subset: str = "all") -> dict[str, Any]:
        """One row of `correlations` as a dict."""
        c = self.correlations
        hit = c[(c["predictor"] == predictor) & (c["target"] == target) & (c["subset"] == subset)]
        if hit.empty:
            raise EsaError(f"no correlation for predictor {predictor!r}, target {target!r}, subset {subset!r}")
        return hit.iloc[0].to_dict()


def direct_test(model: torch.nn.Module, tokenizer: Any, probes: ProbeSet, candidates: pd.DataFrame,
                inventory: list[WeightSpec], n_boot: int = 2000, level: float = 0.95, seed: int = 0,
                show_progress: bool = True) -> DirectTest:
    """Zero each candidate alone; does its probe score (or specificity) rank its effect on the answers?

    Targets: the signed effect (rise of the answers' mean NLL) and its magnitude `abs_effect`, which is
    what first-order scores such as |w * g| estimate (they carry no sign). Predictors: the probe score,
    the generic score (the control: a probe-specific claim needs the probe score to beat it) and the
    specificity; over all candidates and within the probe top set (where top-vs-random does not help)."""
    need = {"param", "row", "col", "probe_score"}
    if need - set(candidates):
        raise EsaError(f"direct_test candidates lack columns {sorted(need - set(candidates))}")
    cand = candidates.assign(expert=candidates.get("expert", -1)).reset_index(drop=True)
    targets_from_selection(cand, inventory)  # every candidate checked before any pass (one clear error)
    base = answer_nll(model, tokenizer, probes)
    effects = np.zeros(len(cand))
    for i in progress(range(len(cand)), desc="direct test", disable=not show_progress):
        targets = targets_from_selection(cand.iloc[i : i + 1], inventory)
        with perturbed(model, targets, PerturbSpec("zero")):
            effects[i] = float(np.mean(answer_nll(model, tokenizer, probes) - base))
    table = cand.assign(effect=effects, abs_effect=np.abs(effects))
    subsets = {"all": table}
    if "group" in table:
        subsets["probe_top"] = table[table["group"] == "probe_top"]
    rows = []
    for predictor in ("probe_score", "generic_score", "specificity"):
        if predictor not in table:
            continue
        for target in ("effect", "abs_effect"):
            for name, sub in subsets.items():
                rows.append({"predictor": predictor, "target": target, "subset": name,
                             **spearman_ci(sub[predictor], sub[target], n_boot, level, seed)})
    return DirectTest(table, pd.DataFrame(rows))


@dataclass
class Localisation:
    probes: pd.DataFrame  # probe_summary: accuracy, CI, chance, p vs chance per kind and overall
    selectivity: SelectivityResult
    direct: DirectTest
    n_items: int


def localisation(lm: LoadedModel, generic_scores: Mapping[str, torch.Tensor], eval_ids: torch.Tensor, *,
             metric: str = "grad_x_weight", k: int = 100, probes_per_kind: int | None = None, probe_seqlen: int = 64,
             direct_top: int = 30, direct_random: int = 30, n_boot: int = 2000, seed: int = 0,
             exclude: Targets | None = None) -> Localisation:
    """Probe accuracy; `metric` calibrated on the probe set vs `generic_scores` (the same metric on generic
    text): their top-k and a random-k zeroed, probe damage per unit of generic damage on `eval_ids`; the
    direct test on the probe top `direct_top` and `direct_random` random weights. `exclude` is never zeroed."""
    probes = build_probes(max_per_kind=probes_per_kind)
    summary = probe_summary(score_probes(lm.model, lm.tokenizer, probes))
    probe_scores = metric_scores(lm.model, lm.inventory, probe_windows(lm.tokenizer, probes, probe_seqlen), metric)
    sets = ablation_sets(lm.model, lm.inventory, probe_scores, generic_scores, k, "global", seed, exclude)
    sel = selectivity(lm.model, lm.tokenizer, probes, eval_ids, sets, n_boot, seed=seed, show_progress=False)
    cand = direct_candidates(lm.model, lm.inventory, probe_scores, generic_scores, direct_top, direct_random, seed)
    direct = direct_test(lm.model, lm.tokenizer, probes, cand, lm.inventory, n_boot, seed=seed, show_progress=False)
    return Localisation(summary, sel, direct, len(probes))
