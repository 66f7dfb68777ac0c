"""Week 8 experiments: how many of the top-k carry the damage, restore-one, and damage-ranking stability.

- `cumulative_ablation`: perturb the global top-1, top-10, ... (by rank) and measure the damage each time.
- `restore_one`: perturb all of the top-k but leave the single top weight alone (and the top weight
  alone, and all of them), to see whether one weight carries the damage (as a super weight would).
- `ranking_stability`: are the conditions' damage rankings the same on different evaluation samples?
  Random halves of the evaluation windows are drawn repeatedly; Spearman's rho between the two halves'
  rankings of the conditions is reported with its spread.
- `single_weight_test`: one weight perturbed alone against random single weights of the same matrix, the
  causal check of a super-weight claim, with an exact rank p-value over the controls.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from scipy import stats as sps

from esa.errors import EsaError
from esa.evaluate import EvalResult, evaluate
from esa.models.inventory import WeightSpec
from esa.perturb.apply import count_targets, targets_from_selection
from esa.perturb.ops import PerturbSpec
from esa.perturb.sweep import AllNonFinite, evaluate_perturbed


def _row(label: str, n: int, res, stats, base) -> dict:
    return dict(condition=label, n_weights=n, ppl=res.ppl, log_ppl=res.log_ppl, delta_ppl=res.ppl - base.ppl,
                delta_log_ppl=res.log_ppl - base.log_ppl, accuracy=res.accuracy,
                n_nonfinite_windows=res.n_nonfinite_windows, n_inf_weights=stats.n_inf, n_nan_weights=stats.n_nan)


def _eval(model, windows, targets, spec, seed, batch_size, base, label) -> dict:
    n = count_targets(targets)
    try:
        res, st = evaluate_perturbed(model, windows, targets, spec, seed, batch_size)
        return _row(label, n, res, st, base)
    except AllNonFinite:  # recorded as catastrophic, not dropped
        return dict(condition=label, n_weights=n, ppl=np.nan, log_ppl=np.nan, delta_ppl=np.nan,
                    delta_log_ppl=np.nan, accuracy=np.nan, n_nonfinite_windows=len(windows), n_inf_weights=-1,
                    n_nan_weights=-1)


def cumulative_ablation(model: torch.nn.Module, inventory: list[WeightSpec], ranked: pd.DataFrame,
                        windows: torch.Tensor, ns: Sequence[int], spec: PerturbSpec | None = None, seed: int = 0,
                        batch_size: int | None = None) -> pd.DataFrame:
    """Damage of perturbing the n best-ranked weights of `ranked` (a global top-k table), for each n."""
    spec = spec or PerturbSpec("zero")
    base = evaluate(model, windows, batch_size=batch_size, show_progress=False)
    ranked = ranked.sort_values("rank", kind="stable")
    rows = []
    for n in sorted({min(int(n), len(ranked)) for n in ns}):
        t = targets_from_selection(ranked.head(n), inventory)
        rows.append(_eval(model, windows, t, spec, seed, batch_size, base, f"top-{n}"))
    return pd.DataFrame(rows)


def restore_one(model: torch.nn.Module, inventory: list[WeightSpec], ranked: pd.DataFrame, windows: torch.Tensor,
                spec: PerturbSpec | None = None, seed: int = 0, batch_size: int | None = None) -> pd.DataFrame:
    """All top-k perturbed; all but the top-1 perturbed (the top weight restored); only the top-1 perturbed."""
    spec = spec or PerturbSpec("zero")
    base = evaluate(model, windows, batch_size=batch_size, show_progress=False)
    ranked = ranked.sort_values("rank", kind="stable")
    sets = {"all top-k": ranked, "top-k but keep top-1": ranked.iloc[1:], "top-1 only": ranked.head(1)}
    return pd.DataFrame([_eval(model, windows, targets_from_selection(df, inventory), spec, seed, batch_size,
                               base, label) for label, df in sets.items()])


def ranking_stability(windows_df: pd.DataFrame, n_splits: int = 200, seed: int = 0) -> dict:
    """Spearman rho between conditions' mean delta NLL on random halves of the evaluation windows."""
    keys = ["perturbation", "scale", "prob", "group", "seed"]
    piv = windows_df.pivot_table(index=keys, columns="window", values="delta_nll", aggfunc="mean")
    piv = piv.replace([np.inf, -np.inf], np.nan)
    n_win = piv.shape[1]
    if n_win < 2 or len(piv) < 3:
        return dict(rho_mean=np.nan, rho_lo=np.nan, rho_hi=np.nan, n_conditions=len(piv), n_windows=n_win,
                    note="needs >= 2 windows and >= 3 conditions")
    rng = np.random.default_rng(seed)
    rhos = []
    vals = piv.to_numpy()
    for _ in range(n_splits):
        perm = rng.permutation(n_win)
        a, b = perm[: n_win // 2], perm[n_win // 2 :]
        ra, rb = np.nanmean(vals[:, a], axis=1), np.nanmean(vals[:, b], axis=1)
        ok = np.isfinite(ra) & np.isfinite(rb)
        if ok.sum() >= 3:
            rhos.append(sps.spearmanr(ra[ok], rb[ok]).statistic)
    r = np.asarray(rhos, dtype=float)
    return dict(rho_mean=float(np.nanmean(r)), rho_lo=float(np.nanquantile(r, 0.025)),
                rho_hi=float(np.nanquantile(r, 0.975)), n_conditions=len(piv), n_windows=n_win, n_splits=len(r))


def single_weight_test(model: torch.nn.Module, inventory: list[WeightSpec], param: str, row: int, col: int,
                       windows: torch.Tensor, n_controls: int = 20, seed: int = 0, spec: PerturbSpec | None = None,
                       batch_size: int | None = None, expert: int = -1, alpha: float = 0.05,
                       baseline: EvalResult | None = None) -> dict:
    """Perturb (param, [expert,] row, col) alone, then each of `n_controls` random single weights of its matrix.

    Controls are drawn uniformly (seeded by `seed` and the matrix name) among the matrix's nonzero weights
    other than the target: zeroing an exactly-zero weight changes nothing, so a quantised checkpoint's
    zeros would make easy controls. p = (1 + #controls whose delta log-PPL >= the target's) / (1 + n), the
    exact one-sided rank p-value of "the target does more damage than a random weight of its matrix"
    (a non-finite evaluation counts as the most damage). It cannot go below 1 / (1 + n), so with fewer
    than 1/alpha - 1 controls the verdict is "underpowered" whatever the effect. `baseline`: the unperturbed
    evaluation on these windows, when the caller already has it (as `run_sweep` takes it)."""
    spec = spec or PerturbSpec("zero")
    specs = {s.name: s for s in inventory}
    if param not in specs:
        raise EsaError(f"single_weight_test: {param!r} is not in the model's weight inventory")
    ws = specs[param]
    if not (0 <= row < ws.rows and 0 <= col < ws.cols and (expert == -1 or 0 <= expert < ws.n_experts)):
        raise EsaError(f"single_weight_test: [{row}, {col}] (expert {expert}) is outside {param} with shape {ws.shape}")
    target = int(ws.ravel(torch.tensor([expert]), torch.tensor([row]), torch.tensor([col]))[0])
    flat = model.get_parameter(param).detach().reshape(-1)
    rng = np.random.default_rng([int(seed), zlib.crc32(param.encode())])
    size = ws.rows * ws.cols  # one matrix: an expert's slice of a 3-D tensor
    lo = max(expert, 0) * size if ws.n_experts else 0
    pool = lo + (flat[lo:lo + size] != 0).nonzero().flatten().cpu()
    pool = pool[pool != target]
    keep = pool[torch.as_tensor(rng.choice(len(pool), size=min(n_controls, len(pool)), replace=False))]
    base = evaluate(model, windows, batch_size=batch_size, show_progress=False) if baseline is None else baseline

    def damage(idx: int, label: str) -> tuple[float, float]:
        r = _eval(model, windows, {param: torch.tensor([idx])}, spec, seed, batch_size, base, label)
        d = float(r["delta_log_ppl"])
        return (d, float(r["ppl"])) if np.isfinite(d) else (np.inf, np.inf)

    effect, ppl = damage(target, "target")
    controls = np.array([damage(int(i), "control")[0] for i in keep], dtype=float)
    n = len(controls)
    p = (1 + int((controls >= effect).sum())) / (1 + n)
    verdict = "underpowered" if 1 / (1 + n) > alpha else "confirmed" if p <= alpha else "not confirmed"
    finite = controls[np.isfinite(controls)]
    return dict(param=param, row=int(row), col=int(col), expert=int(expert),
                weight=float(flat[target]), perturbation=spec.label(), base_ppl=base.ppl, ppl=ppl,
                delta_log_ppl=effect, n_controls=n,
                control_median=float(np.median(finite)) if len(finite) else np.nan,
                control_max=float(controls.max()) if n else np.nan,
                p_value=p, alpha=alpha, verdict=verdict)
