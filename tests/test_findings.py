"""The findings block, the index around it, and the week 16 synthesis, on a small synthetic run folder."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from test_scorecard import SMOKE, sweep

from esa.phases import criteria
from esa.report import findings, savings, scorecard, synthesis
from esa.runner.index import write_index
from esa.stats.inference import analyze
from esa.stats.verdicts import Criterion
from esa.store import write_json

MODEL = "m-135"
PLANTED = ("model.layers.3.mlp.down_proj.weight", 42, 7)


def make_run(root: Path, settings: dict, magnitude: float = 8.0, phase5: bool = False) -> tuple[Path, Path]:
    """A run folder with the tables Phases 1-4 write (a planted top weight on channel 42), and its figures."""
    run, figs = root / "reports" / "r", root / "figures" / "r"
    write_json(run / "manifest.json", {"profile_settings": settings, "profile": settings["name"], "notebooks": [
        {"notebook": findings.W1, "parameters": {"models": [MODEL]}}]})
    data = run / "data"
    pd.DataFrame([{"model": MODEL, "source": "embedded", "tokenizer": "Tok(m.Q4_1-x)", "ppl": 40.0, "ppl_std": 1.0,
                   "accuracy": 0.3, "unigram_ppl": 600.0}]).to_parquet(_mk(data / findings.P1) / "summary.parquet")
    tops = [dict(model=MODEL, metric=m, seed=s, rank=1, param=PLANTED[0], row=PLANTED[1], col=PLANTED[2], score=1.0)
            for m in ("grad_x_weight", "act_mag") for s in (1, 2)]
    tops += [dict(model=MODEL, metric="grad_x_weight", seed=s, rank=2, param="model.layers.1.self_attn.v_proj.weight",
                  row=5, col=42, score=0.5) for s in (1, 2)]
    pd.DataFrame(tops).to_parquet(_mk(data / findings.W2) / "top_weights.parquet")
    pd.DataFrame([{"metric": "hutchinson_diag", "n_seeds": 2, "jaccard_mean": 0.1, "spearman_union": -0.5,
                   "model": MODEL}]).to_parquet(data / findings.W2 / "stability.parquet")
    pd.DataFrame([{"model": MODEL, "metric": "grad_x_weight", "component": "k", "selected_share": 0.3,
                   "weight_share": 0.03, "enrichment": 10.0}]).to_parquet(_mk(data / findings.W4) / "component_shares.parquet")
    table, wins = sweep({"top_k": 5.0, "random_k": 0.0, "bottom_k": 0.0, "magnitude_k": magnitude}, noise=0.01)
    st = analyze(table, wins, n_boot=100)
    write_json(_mk(data / findings.W5) / f"stats_{MODEL}.json", {"baseline": {"ppl": 40.0}, **st})
    pd.DataFrame([{"n_weights": 1, "ppl": 3000.0, "delta_log_ppl": 4.3}, {"n_weights": 10, "ppl": 9e6, "delta_log_ppl": 14.0},
                  {"n_weights": 100, "ppl": 1e5, "delta_log_ppl": 8.0}]).to_parquet(
        _mk(data / findings.W8) / f"cumulative_{MODEL}.parquet")
    pd.DataFrame([{"model": "micro-a", "eval_ppl": 30.0, "unigram_ppl": 27.0}]).to_parquet(
        _mk(data / "phase4_week9_parameter_scaling") / "micro_suite.parquet")
    rows = criteria.phase3_rows(st, f"data/{findings.W5}/stats_{MODEL}.json", ["sign_flip", "zero"])
    for r in rows:
        r.id = f"{r.id}.{MODEL}"
    scorecard.write_rows(run, findings.W5, criteria.budgeted(rows, settings))
    scorecard.write_rows(run, findings.W1, criteria.budgeted(
        [Criterion(f"P2.metric_overlap.{MODEL}", 2, "overlap > 60%", 0.3, "> 0.6", False, findings.W1)], settings))
    scorecard.write_rows(run, findings.W2, [Criterion(f"P2.metric_overlap.{MODEL}", 2, "overlap", 0.3, "> 0.6", False,
                                                      findings.W2)])  # a repeat, as old week 2 notebooks wrote
    scorecard.write_rows(run, "phase4_week12_architecture_patterns",
                         [Criterion("P4.family_differences", 4, "families differ", -0.9, "p < 0.05", True, "x")])
    if phase5:
        scorecard.write_rows(run, "phase5_week13_pruning",
                             [Criterion("P5.prune_beats_magnitude", 5, "beats magnitude", 0.8, "> 0", True, "y")])
    for name in (f"{findings.W5}/damage_{MODEL}.png", "phase1_week0_baselines/baselines.png"):
        p = figs / name
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), (30, 90, 200)).save(p)
    return run, figs


def _mk(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def test_findings_sentences_come_from_the_tables(tmp_path):
    run, figs = make_run(tmp_path, SMOKE)
    f = findings.collect(run, figs)
    assert f.banner.startswith("smoke: 2 seeds × 2 windows") and "cannot reach α = 0.01" in f.banner
    assert "m-135: embedded Q4_1 GGUF" in f.banner
    (m,) = [x for x in f.models if x.model == MODEL]
    text = " ".join(m.sentences)
    assert f"{PLANTED[0]}[42, 7], ranked first by 2 metric(s)" in text
    assert "takes PPL from 40 to 3000" in text
    assert "hidden channel 42 recurs" in text and "k holds 30%" in text
    # magnitude_k (8 nats) beats top-k (5 nats): said plainly
    assert "magnitude control (top-k by |w|) does more damage than the sensitivity top-k" in text
    assert "At face value these would fail" in text and "P2.metric_overlap" in text
    assert f.hero == figs / f"{findings.W5}/damage_{MODEL}.png"


def test_banner_says_when_tests_can_reach_alpha():
    six = dict(SMOKE, name="standard", seeds=[1, 2, 3, 4, 5, 6], perturb_eval_windows=16)
    assert findings.profile_banner(six, 25).endswith("tests can reach α = 0.01")
    assert "25 × 2^-4 = 1" in findings.profile_banner(SMOKE, 25)


def test_magnitude_sentence_when_top_k_wins(tmp_path):
    run, figs = make_run(tmp_path, SMOKE, magnitude=1.0)
    text = " ".join(findings.collect(run, figs).models[0].sentences)
    assert "The sensitivity top-k does more damage than the magnitude control" in text


def test_index_leads_with_findings_and_counts_unique_verdicts(tmp_path):
    run, figs = make_run(tmp_path, SMOKE, phase5=True)
    html = write_index(run, figs).read_text()
    assert html.index("<h2>Findings</h2>") < html.index("<h2>Notebooks</h2>") < html.index("Success criteria")
    assert "statistics cannot reach α = 0.01" in html and "data:image/png;base64" in html
    rows = scorecard.judged(run)
    assert sum(r["id"] == f"P2.metric_overlap.{MODEL}" for r in rows) == 1  # the week 2 repeat is gone
    c = scorecard.counts(rows)
    for verdict, n in c.items():
        label = "criteria PASS" if verdict == "PASS" else verdict
        assert f"<b>{n}</b><span>{label}</span>" in html
    assert c["FAIL"] == 0 and c["machinery-only"] >= 2  # smoke budget and the untrained micro-suite
    assert f'href="data/{findings.W5}/stats_{MODEL}.json"' in html  # evidence paths are links
    assert "table-layout: fixed" in html and "overflow-wrap: anywhere" in html
    assert "1 of 1 criterion could be judged (1 PASS)" in html and '<span class="cid">P5.prune_beats_magnitude</span>' in html
    assert "<script" not in html


def test_synthesis_answers_from_the_run_and_names_what_is_missing(tmp_path):
    run, figs = make_run(tmp_path, SMOKE)
    t0 = time.perf_counter()
    syn = synthesis.synthesize(run, figs)
    assert time.perf_counter() - t0 < 10
    assert 5 in syn["missing"]["phases"] and "phase5_week13_pruning" in syn["missing"]["notebooks"]
    ans = syn["answers"].set_index("phase")["answer"]
    assert ans[5] == "not run" and ans[3] == "not established at this budget" and ans[4] == "not established at this budget"
    assert syn["tables"][3] is not None and {"dlogppl_top_k", "dlogppl_magnitude_k"} <= set(syn["tables"][3].columns)
    assert syn["tables"][1]["ppl"].iloc[0] == 40.0 and syn["tables"][5] is None
    lim = " ".join(syn["limitations"])
    assert "cannot reach α = 0.01" in lim and "do not beat the unigram baseline" in lim
    assert "not monotonic" in lim and "hutchinson_diag" in lim and "Phases with no output in this run: [5]" in lim
    assert syn["figures"][3] == figs / f"{findings.W5}/damage_{MODEL}.png" and syn["figures"][2] is None
    assert int(syn["counts"].drop(columns="phase").to_numpy().sum()) == len(syn["rows"])
    synthesis.figure_grid(syn["figures"])
    synthesis.counts_figure(syn["counts"])


def test_synthesis_reads_phase5_rows_when_they_exist(tmp_path):
    run, figs = make_run(tmp_path, SMOKE, phase5=True)
    syn = synthesis.synthesize(run, figs)
    assert syn["answers"].set_index("phase").loc[5, "answer"] == "supported"
    assert syn["tables"][5]["id"].tolist() == ["P5.prune_beats_magnitude"]


@pytest.mark.parametrize("broken", ["top_weights.parquet", "stats"])
def test_findings_survive_missing_or_broken_tables(tmp_path, broken):
    run, figs = make_run(tmp_path, SMOKE)
    if broken == "stats":
        (run / "data" / findings.W5 / f"stats_{MODEL}.json").write_text("{not json")
    else:
        (run / "data" / findings.W2 / broken).write_bytes(b"not parquet")
    f = findings.collect(run, figs)
    assert f.banner and all(isinstance(s, str) for m in f.models for s in m.sentences)
    json.dumps([m.sentences for m in f.models])


def test_index_and_savings_count_windows_against_the_fixed_n_plan(tmp_path):
    run, figs = make_run(tmp_path, dict(SMOKE, perturb_eval_windows=16))
    prune = _mk(run / "data" / "phase5_week13_pruning")
    write_json(prune / "plan.json", {"setup": {"evaluation": {"windows": 8}}})  # the plan's cap wins for pruning
    pd.DataFrame({"model": ["a", "a", "b"], "method": ["wanda", "magnitude", "wanda"],
                  "eval_windows": [2, 8, 4]}).to_parquet(prune / "pruning_rows.parquet")
    pert = _mk(run / "data" / "phase3_week5_core_perturbation")
    pd.DataFrame({"model": ["a"] * 4, "n_windows": [2, 2, 16, None]}).to_parquet(pert / "perturbation.parquet")
    t = savings.windows_saved(run, dict(SMOKE, perturb_eval_windows=16))
    got = {(r.notebook, r.model): (r.conditions, r.evaluated, r.fixed_n) for r in t.itertuples()}
    assert got == {("phase3_week5_core_perturbation", "a"): (3, 20, 48),  # the row with no count is left out
                   ("phase5_week13_pruning", "a"): (2, 10, 16), ("phase5_week13_pruning", "b"): (1, 4, 8)}
    words = savings.in_words(t)
    assert "phase5_week13_pruning: 14 evaluation windows against 24 at fixed n (1.7x fewer; a 10 of 16, b 4 of 8)" in words
    html = write_index(run, figs).read_text()
    assert "<b>Sequential evaluation</b>" in html and "20 evaluation windows against 48 at fixed n (2.4x fewer" in html
    assert savings.windows_saved(tmp_path / "empty", SMOKE).empty and savings.in_words(savings.windows_saved(
        tmp_path / "empty", SMOKE)) == ""
