"""Reference points that make a perplexity credible or expose a broken harness.

- `unigram_ppl`: a unigram model fitted on the calibration split and scored on the same evaluation
  targets; any real LM must beat it by a wide margin.
- `reference_text_ppl`: perplexity on the first 1,000 tokens of the GPL-3 text Debian ships, where
  SCIENCE.md records independent measurements (SmolLM2-135M about 19, Gemma-3-270M about 14).
- `copy_probe`: a window followed by an exact copy of itself; the copy's perplexity is near 1.0 in any
  working model. That is what leaked or repeated evaluation text looks like, and why a Phase 1 table
  showing PPL near 1.0 with 99% accuracy on real text is a harness bug, not a good model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from esa.data import Windows, _token_stream, get_corpus

GPL3 = Path("/usr/share/common-licenses/GPL-3")


def unigram_ppl(tokenizer: Any, corpus: str, wins: Windows, smoothing: float = 1.0) -> float:
    """Add-`smoothing` unigram perplexity over the same target tokens `evaluate` scores."""
    calib = _token_stream(tokenizer, get_corpus(corpus), "calib")
    vocab = max(len(tokenizer), int(calib.max()) + 1, int(wins.ids.max()) + 1)
    counts = np.bincount(calib, minlength=vocab).astype(np.float64) + smoothing
    logp = np.log(counts / counts.sum())
    targets = wins.ids[:, 1:].numpy().ravel()
    return float(math.exp(-logp[targets].mean()))


@torch.no_grad()
def reference_text_ppl(model: torch.nn.Module, tokenizer: Any, n_tokens: int = 1000) -> float | None:
    """PPL on the first `n_tokens` tokens of Debian's GPL-3 text as one window; None if it is absent."""
    if not GPL3.is_file():
        return None
    ids = tokenizer(GPL3.read_text())["input_ids"][:n_tokens]
    x = torch.tensor([ids], device=model.get_input_embeddings().weight.device)
    logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
    return float(torch.exp(F.cross_entropy(logits, x[0, 1:])))


@torch.no_grad()
def copy_probe(model: torch.nn.Module, wins: Windows, n: int = 2) -> dict[str, float]:
    """PPL of the first half of a window vs. the same half repeated right after it."""
    half = wins.seqlen // 2
    device = model.get_input_embeddings().weight.device
    first, copy = [], []
    for row in wins.ids[:n]:
        seq = torch.cat([row[:half], row[1:half] if wins.bos else row[:half]]).unsqueeze(0).to(device)
        logits = model(input_ids=seq, use_cache=False).logits[0, :-1].float()
        nll = F.cross_entropy(logits, seq[0, 1:], reduction="none")
        first.append(nll[: half - 1].mean())
        copy.append(nll[half:].mean())
    return {"ppl_original": float(torch.exp(torch.stack(first).mean())),
            "ppl_repeated": float(torch.exp(torch.stack(copy).mean()))}


def run_baselines(model_names: list[str], profile: Any, show_progress: bool = True):
    """Phase 1: per model and seed, PPL/accuracy on `profile.eval_windows` sampled eval windows, plus
    the reference points above. Returns (per_seed, per_model) DataFrames."""
    import time

    import pandas as pd

    from esa import data as esa_data
    from esa.evaluate import evaluate
    from esa.models import load
    from esa.params import model_params

    seed_rows, model_rows = [], []
    for name in model_names:
        mp = model_params(name)
        t0 = time.perf_counter()
        lm = load(mp.ref, dtype=profile.dtype, device_map=mp.device_map)
        load_s = time.perf_counter() - t0
        corpus = esa_data.get_corpus(profile.corpus)
        first: Windows | None = None
        for seed in profile.seeds:
            wins = esa_data.evaluation(lm.tokenizer, corpus, profile.seqlen, profile.eval_windows, seed,
                                       max_positions=lm.info.max_positions or None)
            first = first or wins
            t1 = time.perf_counter()
            res = evaluate(lm.model, wins, show_progress=show_progress, desc=f"{name} seed {seed}")
            seed_rows.append(dict(model=name, seed=seed, **res.as_dict(), seconds=time.perf_counter() - t1,
                                  **{f"win_{k}": v for k, v in wins.describe().items()}))
        assert first is not None
        ref = reference_text_ppl(lm.model, lm.tokenizer)
        probe = copy_probe(lm.model, first)
        model_rows.append(dict(
            model=name, display=mp.display, family=lm.info.family, params=lm.info.n_params,
            instruct=lm.info.instruct, source=lm.info.source, tokenizer=first.tokenizer,
            seqlen=profile.seqlen, windows_per_seed=first.n_windows, windows_available=first.n_available,
            unigram_ppl=unigram_ppl(lm.tokenizer, corpus.name, first) if corpus.name in esa_data.CORPORA else math.nan,
            gpl3_ppl=ref if ref is not None else math.nan,
            gpl3_expected=mp.published.get("gpl3_ppl_1000", math.nan),
            copy_ppl_original=probe["ppl_original"], copy_ppl_repeated=probe["ppl_repeated"],
            load_seconds=load_s,
        ))
        del lm
    return pd.DataFrame(seed_rows), pd.DataFrame(model_rows)


def summarise(per_seed, per_model):
    """One row per model: mean/std of PPL and accuracy across seeds, merged with the reference points."""
    agg = per_seed.groupby("model").agg(
        ppl=("ppl", "mean"), ppl_std=("ppl", "std"), accuracy=("accuracy", "mean"),
        accuracy_std=("accuracy", "std"), n_seeds=("seed", "nunique"), nonfinite=("n_nonfinite_windows", "sum"),
        tokens_per_seed=("n_tokens", "first"),
    ).reset_index()
    return per_model.merge(agg, on="model")


def phase1_criteria(summary) -> list:
    """The Phase 1 'good results' criteria, judged from the summary table (one Criterion per check)."""
    from esa.report.scorecard import Criterion

    rows = []
    ev = "data/phase1_week0_baselines/summary.parquet"
    for r in summary.itertuples():
        rows.append(Criterion(
            f"P1.finite.{r.model}", 1, f"{r.model}: baseline perplexity is finite on every window",
            int(r.nonfinite), "== 0 non-finite windows", bool(r.nonfinite == 0 and math.isfinite(r.ppl)), ev))
        rows.append(Criterion(
            f"P1.no_leak.{r.model}", 1, f"{r.model}: no sign of leakage (PPL > 1.5 and accuracy < 0.9 on real text)",
            f"PPL {r.ppl:.2f}, acc {r.accuracy:.3f}", "PPL > 1.5 and acc < 0.9",
            bool(r.ppl > 1.5 and r.accuracy < 0.9), ev))
        ratio = r.unigram_ppl / r.ppl if math.isfinite(r.unigram_ppl) else math.nan
        rows.append(Criterion(
            f"P1.beats_unigram.{r.model}", 1, f"{r.model}: beats a unigram model of the corpus by >= 5x in PPL",
            round(ratio, 2) if math.isfinite(ratio) else None, ">= 5", None if math.isnan(ratio) else bool(ratio >= 5), ev,
            "" if math.isfinite(ratio) else "no unigram baseline for this corpus"))
        cv = r.ppl_std / r.ppl if r.n_seeds > 1 else math.nan
        rows.append(Criterion(
            f"P1.seed_stable.{r.model}", 1, f"{r.model}: PPL varies < 25% (CV) across sampled window sets",
            round(cv, 3) if math.isfinite(cv) else None, "< 0.25", None if math.isnan(cv) else bool(cv < 0.25), ev,
            "" if r.n_seeds > 1 else "one seed only"))
        exp = r.gpl3_expected
        if math.isfinite(exp) and math.isfinite(r.gpl3_ppl):
            err = abs(r.gpl3_ppl - exp) / exp
            rows.append(Criterion(
                f"P1.reference.{r.model}", 1, f"{r.model}: reproduces the independent reference PPL on GPL-3 (1,000 tokens) within 15%",
                f"{r.gpl3_ppl:.2f} vs {exp:.1f}", "|rel. error| < 0.15", bool(err < 0.15), ev))
        rows.append(Criterion(
            f"P1.copy_probe.{r.model}", 1, f"{r.model}: harness scores the right positions (repeated text PPL < 2)",
            round(r.copy_ppl_repeated, 3), "< 2", bool(r.copy_ppl_repeated < 2), ev))
    return rows


PROFILE_COLUMNS = {"smoke": "Smoke PPL", "standard": "Standard PPL", "extended": "Extended PPL"}


def guide_table(summary, profile_name: str, run_dir: str | Path):
    """The research guide's Phase 1 table: Model, Parameters, Smoke/Standard/Extended PPL, Accuracy.

    This run fills its own profile's column; the other columns are read from the newest earlier run of
    each other profile under the same reports/ folder (their manifests name the profile), else left blank.
    """
    import json

    import pandas as pd

    run_dir = Path(run_dir)
    others: dict[str, pd.DataFrame] = {}
    for manifest in sorted(run_dir.parent.glob("*/manifest.json"), key=lambda p: p.stat().st_mtime):
        if manifest.parent == run_dir:
            continue
        try:
            prof = json.loads(manifest.read_text()).get("profile")
        except (OSError, ValueError):
            continue
        table = manifest.parent / "data" / "phase1_week0_baselines" / "summary.parquet"
        if prof in PROFILE_COLUMNS and prof != profile_name and table.is_file():
            others[prof] = pd.read_parquet(table)
    rows = []
    for r in summary.itertuples():
        row = {"Model": r.display, "Parameters": f"{r.params / 1e6:.1f}M"}
        for prof, col in PROFILE_COLUMNS.items():
            if prof == profile_name:
                row[col] = f"{r.ppl:.2f}"
            elif prof in others and (m := others[prof].loc[others[prof].model == r.model]).shape[0]:
                row[col] = f"{m.ppl.iloc[0]:.2f}"
            else:
                row[col] = "not run"
        row["Accuracy"] = f"{r.accuracy:.1%}"
        row["seqlen × windows × seeds"] = f"{r.seqlen} × {r.windows_per_seed} × {r.n_seeds}"
        rows.append(row)
    return pd.DataFrame(rows)
