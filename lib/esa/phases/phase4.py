"""Phase 4 (weeks 9-12): per-model Phase 2/3 measures for the scaling and architecture analyzers.

`model_measures(ref, profile)` scores one model with Phase 2's engine (cached), selects the top-k,
zeroes it and a size-matched random control (Phase 3's in-place perturbation with exact restore),
and returns one row of the tidy scaling table plus the top-k table for the architecture analyzer.

Measures (averaged over the profile's seeds):
- `dlogppl_topk_zero`: increase in eval log-perplexity (nats/token) when the top-k is zeroed;
- `dlogppl_random_zero`: the same for `random_k` (same count per matrix, random positions);
- `topk_over_random`: their ratio (how much more the selected weights matter than random ones);
- `tail_top1pct_over_median`, `tail_max_over_median`, `hill_alpha`: heavy-tail statistics of scores;
- `frac_selected`: selected weights / weights studied (per_layer k is fixed, so this falls with size:
  a confound of every damage-vs-size fit, reported so it can be read alongside).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from esa.analysis.patterns import routing_load, superweight_presence
from esa.baselines import unigram_nll
from esa.data import calibration, evaluation, windows
from esa.errors import EsaError
from esa.evaluate import evaluate
from esa.models import load, micro
from esa.params import Profile
from esa.perturb.apply import perturbed, targets_from_selection
from esa.perturb.controls import ControlInput, make_control
from esa.perturb.ops import PerturbSpec
from esa.recipes import Recipe

log = logging.getLogger(__name__)


def phase4_models(P: Profile) -> list[str]:
    """The profile's Phase 4 model set (`phase4_models`: micro-suite `name@budget` entries and real models)."""
    if not P.phase4_models:
        raise EsaError(f"profile {P.name!r} lists no phase4_models; add the micro-suite and/or real models to it")
    return list(P.phase4_models)


def model_measures(ref: str, P: Profile, metric: str = "grad_x_weight", k: int | None = None,
                   mode: str | None = None) -> tuple[dict[str, Any], pd.DataFrame]:
    """(one row of the scaling table, the top-k table over seeds) for model `ref` under profile `P`."""
    t0 = time.perf_counter()
    R = Recipe.of(P)
    k, mode = k or P.topk, mode or P.mode
    lm = R.load(ref)  # a params/models name (hub id, device_map) or a raw reference
    wins = R.evaluation_windows(lm)
    base = evaluate(lm.model, wins, batch_size=P.batch_size, show_progress=False)
    zero = PerturbSpec("zero")
    rows, sels = [], []
    _, _, _, scored = R.scored_topk(lm, ref, metric, k, mode)
    for seed in P.seeds:
        run = scored[seed]
        sel = run.topk(k, mode, lm.inventory)
        sels.append(sel)
        top = targets_from_selection(sel, lm.inventory)
        rand = make_control("random_k", ControlInput(lm.model, lm.inventory, top, seed=seed))
        out = {}
        for label, targets in (("topk", top), ("random", rand)):
            with perturbed(lm.model, targets, zero, seed=seed):
                res = evaluate(lm.model, wins, batch_size=P.batch_size, show_progress=False)
            out[label] = res.log_ppl - base.log_ppl
        t = run.tails
        rows.append(dict(seed=seed, dlogppl_topk_zero=out["topk"], dlogppl_random_zero=out["random"],
                         tail_top1pct_over_median=t["top_mean_over_median"], tail_max_over_median=t["max_over_median"],
                         hill_alpha=t["hill_alpha"], n_selected=len(sel)))
    per_seed = pd.DataFrame(rows)
    info = lm.info
    row = dict(model=ref, family=info.family, moe=info.moe, instruct=info.instruct, n_layers=info.n_layers,
               n_params=info.n_params, n_params_active=info.n_params_active, metric=metric, k=k, mode=mode,
               base_log_ppl=base.log_ppl, base_ppl=base.ppl, n_seeds=len(per_seed),
               **per_seed.drop(columns="seed").mean().to_dict())
    row["topk_over_random"] = (row["dlogppl_topk_zero"] / row["dlogppl_random_zero"]
                               if row["dlogppl_random_zero"] > 0 else np.nan)
    row["frac_selected"] = row.pop("n_selected") / info.n_weights_studied
    row["seconds"] = time.perf_counter() - t0
    log.info("%s: measures in %.0f s", ref, row["seconds"])
    return row, pd.concat(sels, ignore_index=True)


def collect(refs: list[str], P: Profile, metric: str = "grad_x_weight") -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """The tidy scaling table (one row per model) and {model: top-k table} for a list of models."""
    rows, tables = [], {}
    for ref in refs:
        row, sel = model_measures(ref, P, metric)
        rows.append(row)
        tables[ref] = sel
    return pd.DataFrame(rows), tables


WEEK9 = "phase4_week9_parameter_scaling"


def week9_results(run_dir: Any, models: list[str] | None, P: Profile,
                  metric: str = "grad_x_weight") -> tuple[pd.DataFrame, dict[str, pd.DataFrame], str]:
    """(measures, {model: top-k table}, where they came from) for the Phase 4 notebooks after week 9.

    Week 9's saved tables in `run_dir` are reused when present; otherwise the measures are collected now
    (scores come from the engine's cache where they exist), for `models` or the profile's Phase 4 set.
    """
    folder = Path(run_dir) / "data" / WEEK9
    if (folder / "measures.parquet").exists():
        measures = pd.read_parquet(folder / "measures.parquet")
        tables = {m: pd.read_parquet(folder / f"topk_{m.replace('@', '_')}.parquet") for m in measures.model}
        return measures, tables, f"week 9 results of this run ({folder})"
    measures, tables = collect(list(models) if models else phase4_models(P), P, metric)
    return measures, tables, "collected in this notebook (week 9 output not found)"


def forward_patterns(refs: list[str], P: Profile, n_windows: int = 8) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(super-weight presence per model, routing load of every MoE model) for the models `refs` under profile P.

    Each model is loaded once (cached weights) and runs one short prompt (super weights) and, for MoE
    models, `n_windows` calibration windows of the profile's corpus with its first seed (routing load).
    """
    R = Recipe.of(P)
    presence, routing = [], []
    for ref in refs:
        lm = R.load(ref)
        presence.append(superweight_presence(lm.model, lm.tokenizer, lm.inventory, ref))
        if lm.info.moe:
            wins = calibration(lm.tokenizer, P.corpus, P.seqlen, min(n_windows, P.max_samples), P.seeds[0],
                               max_positions=lm.info.max_positions or None)
            routing.append(routing_load(lm.model, lm.inventory, wins.ids, ref, batch_size=P.batch_size))
        del lm
    cols = ["model", "layer", "expert", "tokens", "share"]
    pres = pd.DataFrame(presence)
    for col in ("n_layers_checked", "layer", "row", "col", "weight_abs_rank_in_matrix"):
        if col in pres.columns:  # MoE rows have none of these: keep them integers with <NA>
            pres[col] = pres[col].astype("Int64")
    return pres, (pd.concat(routing, ignore_index=True) if routing else pd.DataFrame(columns=cols))


def micro_unigram_ppl(corpus: str = micro.CORPUS, seqlen: int = 512, smoothing: float = 1.0) -> float:
    """Perplexity of the unigram model of the calib split's bytes on the eval split: the baseline a trained
    micro model must clearly beat (it knows byte frequencies and nothing else)."""
    tok = micro.micro_tokenizer()
    train_ids = windows(tok, corpus, "calib", seqlen).ids.flatten().numpy()
    eval_ids = windows(tok, corpus, "eval", seqlen).ids[:, 1:].flatten().numpy()  # the scored targets
    # np.exp, as this baseline has always been computed (math.exp differs in the last bit for ~5% of values)
    return float(np.exp(unigram_nll(train_ids, eval_ids, len(tok), smoothing)))


def suite_report(budget: str = "standard", names: list[str] | None = None, seqlen: int = 512,
                 eval_windows: int | None = 64, seed: int = 0) -> pd.DataFrame:
    """One row per micro-suite member: size, training cost, eval perplexity vs the unigram baseline."""
    micro.BUDGETS.lookup(budget)
    base = micro_unigram_ppl(seqlen=seqlen)
    rows = []
    for name in names or list(micro.MICRO_SUITE):
        lm = load(f"{name}{micro.SEP}{budget}", seed=seed)
        rec = micro.train_log(f"{name}{micro.SEP}{budget}", seed)
        wins = evaluation(lm.tokenizer, micro.CORPUS, seqlen, n_windows=eval_windows, seed=0 if eval_windows else None)
        res = evaluate(lm.model, wins, show_progress=False)
        rows.append(dict(model=name, budget=budget, arch=micro.MICRO_SUITE[name].arch, n_params=lm.info.n_params,
                         n_params_active=lm.info.n_params_active, train_tokens=rec["tokens"],
                         train_steps=rec["steps"], train_seconds=rec["seconds"], train_device=rec["device"],
                         first_loss=rec["losses"][0], last_loss=rec["losses"][-1], eval_ppl=res.ppl,
                         unigram_ppl=base, eval_tokens=res.n_tokens))
    if not rows:
        raise EsaError("suite_report: no models named")
    return pd.DataFrame(rows)
