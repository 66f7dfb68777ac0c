"""Phase 1 (week 0): baselines that show the harness measures what it claims, and their criteria.

Per model and seed: perplexity and next-token accuracy on sampled evaluation windows, plus the reference
points of `esa.baselines` (unigram model, GPL-3 reference text, copy probe); the guide's Phase 1 table and
the 'good results' criteria are computed from them.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pandas as pd

from esa.baselines import copy_probe, reference_text_ppl, unigram_ppl
from esa.data import CORPORA, Windows, evaluation, get_corpus
from esa.evaluate import evaluate
from esa.models import load
from esa.params import Profile, model_params
from esa.stats.verdicts import Criterion


def run_baselines(model_names: list[str], profile: Profile, show_progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Phase 1: per model and seed, PPL/accuracy on `profile.eval_windows` sampled eval windows, plus
    the reference points. Returns (per_seed, per_model) DataFrames."""
    seed_rows, model_rows = [], []
    for name in model_names:
        mp = model_params(name)
        t0 = time.perf_counter()
        lm = load(mp.ref, dtype=profile.dtype, device_map=mp.device_map)
        load_s = time.perf_counter() - t0
        corpus = get_corpus(profile.corpus)
        first: Windows | None = None
        for seed in profile.seeds:
            wins = evaluation(lm.tokenizer, corpus, profile.seqlen, profile.eval_windows, seed,
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
            unigram_ppl=unigram_ppl(lm.tokenizer, corpus.name, first) if corpus.name in CORPORA else math.nan,
            gpl3_ppl=ref if ref is not None else math.nan,
            gpl3_expected=mp.published.get("gpl3_ppl_1000", math.nan),
            copy_ppl_original=probe["ppl_original"], copy_ppl_repeated=probe["ppl_repeated"],
            load_seconds=load_s,
        ))
        del lm
    return pd.DataFrame(seed_rows), pd.DataFrame(model_rows)


def summarise(per_seed: pd.DataFrame, per_model: pd.DataFrame) -> pd.DataFrame:
    """One row per model: mean/std of PPL and accuracy across seeds, merged with the reference points."""
    agg = per_seed.groupby("model").agg(
        ppl=("ppl", "mean"), ppl_std=("ppl", "std"), accuracy=("accuracy", "mean"),
        accuracy_std=("accuracy", "std"), n_seeds=("seed", "nunique"), nonfinite=("n_nonfinite_windows", "sum"),
        tokens_per_seed=("n_tokens", "first"),
    ).reset_index()
    return per_model.merge(agg, on="model")


def phase1_criteria(summary: pd.DataFrame) -> list[Criterion]:
    """The Phase 1 'good results' criteria, judged from the summary table (one Criterion per check)."""
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


def _gpl3_clause(r) -> str:
    """What the GPL-3 text says for one model: a reproduced reference, or why there is none."""
    if math.isfinite(r.gpl3_expected):
        return f"on GPL-3 the harness gives {r.gpl3_ppl:.1f} (independent reference {r.gpl3_expected:.0f})"
    return (f"on GPL-3 it scores {r.gpl3_ppl:.1f}, but no independent reference is recorded for it (a text a "
            "code model may have memorised is no reference), so it has no reference check")


def summary_lines(summary: pd.DataFrame, card: pd.DataFrame, corpus_description: str) -> list[str]:
    """Week 0's prose: one sentence group per model, the pass count, and what the corpus is (and is not)."""
    lines = []
    for r in summary.itertuples():
        std = 0 if pd.isna(r.ppl_std) else r.ppl_std
        lines.append(
            f"- **{r.display}** ({r.params / 1e6:.0f}M parameters, {r.family}, "
            f"{'instruction-tuned' if r.instruct else 'base'}): PPL {r.ppl:.2f} ± {std:.2f} "
            f"and next-token accuracy {r.accuracy:.1%} over {r.n_seeds} seed(s) × {r.windows_per_seed} windows × "
            f"{r.seqlen} tokens ({r.tokens_per_seed} scored tokens per seed, tokenizer {r.tokenizer}). "
            f"A unigram model scores {r.unigram_ppl:.0f} ({r.unigram_ppl / r.ppl:.0f}× worse); {_gpl3_clause(r)}; "
            f"repeating a window drops its PPL from {r.copy_ppl_original:.1f} to {r.copy_ppl_repeated:.2f}.")
    n_pass = int((card.result == "PASS").sum())
    lines.append(f"\n{n_pass} of {len(card)} Phase 1 checks pass"
                 + ("." if n_pass == len(card) else f"; failing: {', '.join(card.loc[card.result != 'PASS', 'id'])}."))
    lines.append(f"\nCorpus: {corpus_description}. These are not WikiText-2 numbers and are not comparable with "
                 "published WikiText-2 perplexities; with network access, set `corpus: wikitext2`.")
    return lines


def guide_table(summary: pd.DataFrame, profile_name: str, run_dir: str | Path) -> pd.DataFrame:
    """The research guide's Phase 1 table: Model, Parameters, Smoke/Standard/Extended PPL, Accuracy.

    This run fills its own profile's column; the other columns are read from the newest earlier run of
    each other profile under the same reports/ folder (their manifests name the profile), else left blank.
    """
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
