"""Week 16: the research question answered from one run folder, read only (no model is loaded).

The question (README): does a transformer LM depend on a small fraction (<1%) of its weights, so much that
perturbing them does far more damage than perturbing as many others, in a way that scales with size and
architecture and can be used? Each expected outcome is mapped to the scorecard rows that test it and
answered from their verdicts (`answers`); one table per phase (`phase_tables`), the scorecard
(`scorecard_frame`), limitations computed from the run (`limitations`), each phase's key figure
(`key_figures`), and which scheduled notebooks and phases are missing (`missing`). Every reader tolerates
an absent notebook or table: Phase 5's are being built and may not exist in a run.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from esa.errors import EsaError
from esa.params import load_schedule
from esa.perturb import CONTROLS
from esa.phases.criteria import untrained_reason
from esa.report import artefacts
from esa.report import findings as fd
from esa.report.scorecard import judged
from esa.report.tables import number as sig
from esa.stats.verdicts import VERDICTS, verdict_of

SELF = "phase5_week16_synthesis"
PHASE_NAMES = {1: "Baselines", 2: "Sensitivity metrics", 3: "Causal validation by perturbation",
               4: "Scaling and architecture", 5: "Applications"}
# each phase's key figure: the first of these (under figures/<run>/) that the run drew
KEY_FIGURES = {
    1: ["phase1_week0_baselines/baselines.png"],
    2: ["phase2_week4_components/component_shares.png", "phase2_week1_metric_validation/survival.png"],
    3: ["phase3_week5_core_perturbation/damage_{model}.png", "phase3_week8_advanced/cumulative_ablation.png"],
    4: ["phase4_week9_parameter_scaling/scaling_fits.png", "phase4_week10_architecture_comparison/architecture.png"],
    5: ["phase5_week13_pruning/*.png", "phase5_week14_security/*.png", "phase5_week15_interpretability/*.png",
        "phase5_week13_finetune/*.png"],
}


@dataclass(frozen=True)
class Outcome:
    phase: int
    expected: str  # the expected outcome, in the guide's terms
    prefixes: tuple[str, ...]  # scorecard ids that test it


OUTCOMES = (
    Outcome(1, "the harness measures credible perplexities (no leakage, finite, reproduces references)", ("P1.",)),
    Outcome(2, "sensitivity scores are heavy-tailed and pick stable top-k sets across seeds and metrics",
            ("P2.",)),
    Outcome(3, "perturbing the top-k does far more damage than matched controls, significantly, with a "
               "dose-response, across architectures", ("P3.",)),
    Outcome(4, "sensitivity follows a power law in model size and differs between architecture families",
            ("P4.",)),
    Outcome(5, "critical weights are useful: pruning, fine-tuning, security and interpretability gain from them",
            ("P5.",)),
)


def _read(run_dir: Path, nb: str, name: str) -> pd.DataFrame | None:
    return fd._parquet(run_dir, nb, name)


def present_notebooks(run_dir: str | Path) -> list[str]:
    """Scheduled notebooks with any output in the run folder (data, scorecard or a rendered page)."""
    run_dir = Path(run_dir)
    out = []
    for e in load_schedule():
        nb = e["id"]
        if ((run_dir / "data" / nb).is_dir() and any((run_dir / "data" / nb).iterdir())) or \
                (run_dir / "scorecard" / f"{nb}.json").is_file() or (run_dir / "html" / f"{nb}.html").is_file():
            out.append(nb)
    return out


def missing(run_dir: str | Path) -> dict[str, Any]:
    """Which scheduled notebooks (other than this one) and which phases left nothing in the run."""
    sched = [e for e in load_schedule() if e["id"] != SELF]
    have = set(present_notebooks(run_dir))
    gone = [e["id"] for e in sched if e["id"] not in have]
    phases = sorted({int(e["phase"]) for e in sched})
    no_phase = [p for p in phases if not any(e["id"] in have for e in sched if int(e["phase"]) == p)]
    return {"notebooks": gone, "phases": no_phase, "present": sorted(have - {SELF})}


# ------------------------------------------------------------------ one table per phase
def _phase1(run_dir: Path) -> pd.DataFrame | None:
    t = _read(run_dir, "phase1_week0_baselines", "summary")
    cols = ["model", "family", "params", "ppl", "ppl_std", "accuracy", "unigram_ppl", "gpl3_ppl", "gpl3_expected",
            "copy_ppl_repeated", "n_seeds", "tokens_per_seed"]
    return None if t is None else t[[c for c in cols if c in t.columns]]


def _phase2(run_dir: Path) -> pd.DataFrame | None:
    t = _read(run_dir, fd.W4, "phase2_summary")
    stab = _read(run_dir, fd.W2, "stability")
    if stab is None:
        stab = _read(run_dir, fd.W1, "stability")
        first = fd._models(run_dir)[1]
        if stab is not None and first:
            stab = stab.assign(model=first)
    if t is None and stab is None:
        return None
    if stab is not None and "model" in stab.columns:
        s = stab[["model", "metric", "n_seeds", "jaccard_mean", "spearman_union"]]
        t = s if t is None else t.merge(s, on=["model", "metric"], how="outer")
    return t


def _phase3(run_dir: Path) -> pd.DataFrame | None:
    rows = []
    for p in sorted((run_dir / "data" / fd.W5).glob("stats_*.json")):
        st = fd._json(p) or {}
        model = p.stem.removeprefix("stats_")
        summ = pd.DataFrame(st.get("summary", []))
        if summ.empty:
            continue
        comps = {(c["perturbation"], c["scale"], c["b"]): c for c in st.get("comparisons", []) if c["a"] == "top_k"}
        for (pert, scale), g in summ.groupby(["perturbation", "scale"], sort=True):
            m = g.set_index("group")
            m = m.loc[sorted(m.index, key=lambda grp: (grp != "top_k", grp))]  # the top-k first, then its controls
            c = comps.get((pert, scale, "random_k"), {})
            ci = {f"dlogppl_{grp}_{end}": fd._num(m.loc[grp].get(f"ci_{end}")) for grp in m.index for end in ("lo", "hi")}
            rows.append({"model": model, "perturbation": pert, "scale": scale, "k": int(g["k"].iloc[0]),
                         **{f"dlogppl_{grp}": float(v) for grp, v in m["mean"].items()}, **ci,
                         "p_holm_top_vs_random": c.get("p_primary_holm"), "test": c.get("primary")})
    for p in sorted((run_dir / "data" / fd.W8).glob("cumulative_*.parquet")):
        t = pd.read_parquet(p)
        one = t[t["n_weights"] == 1]
        if len(one):
            rows.append({"model": p.stem.removeprefix("cumulative_"), "perturbation": "zero (global top-1 only)",
                         "scale": 1.0, "k": 1, "dlogppl_top_k": float(one["delta_log_ppl"].iloc[0])})
    return pd.DataFrame(rows) if rows else None


def _phase4(run_dir: Path) -> pd.DataFrame | None:
    t = _read(run_dir, "phase4_week9_parameter_scaling", "measures")
    if t is None:
        return None
    cols = ["model", "family", "moe", "n_params", "base_ppl", "dlogppl_topk_zero", "dlogppl_random_zero",
            "topk_over_random", "tail_top1pct_over_median", "frac_selected"]
    t = t[[c for c in cols if c in t.columns]]
    suite = _read(run_dir, "phase4_week9_parameter_scaling", "micro_suite")
    if suite is not None and {"model", "eval_ppl", "unigram_ppl"} <= set(suite.columns):
        beat = dict(zip(suite["model"], suite["eval_ppl"] < suite["unigram_ppl"], strict=True))
        t = t.assign(beats_unigram=[beat.get(str(m).split("@")[0]) for m in t["model"]])
    return t


def _phase5(run_dir: Path, rows: list[dict[str, Any]]) -> pd.DataFrame | None:
    p5 = [r for r in rows if r.get("phase") == 5]
    files = sorted(str(p.relative_to(run_dir)) for d in (run_dir / "data").glob("phase5_*") if d.name != SELF
                   for p in d.iterdir() if p.is_file())
    if not p5 and not files:
        return None
    t = pd.DataFrame([{"id": r["id"], "measured": r.get("measured"), "verdict": verdict_of(r),
                       "notebook": r.get("notebook")} for r in p5])
    return t.assign(source="scorecard") if len(t) else pd.DataFrame({"data file": files})


def phase_tables(run_dir: str | Path, rows: list[dict[str, Any]] | None = None) -> dict[int, pd.DataFrame | None]:
    """Phase -> its summary table from the run (None when the phase left no table)."""
    run_dir = Path(run_dir)
    rows = judged(run_dir) if rows is None else rows
    return {1: _phase1(run_dir), 2: _phase2(run_dir), 3: _phase3(run_dir), 4: _phase4(run_dir),
            5: _phase5(run_dir, rows)}


def scorecard_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    cols = ["id", "phase", "measured", "threshold", "verdict", "note", "notebook"]
    t = pd.DataFrame([{**r, "verdict": verdict_of(r)} for r in rows])
    return t[[c for c in cols if c in t.columns]] if len(t) else pd.DataFrame(columns=cols)


def verdict_counts(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Phase x verdict counts (every verdict a column, 0 when absent)."""
    c = Counter((int(r.get("phase", 0)), verdict_of(r)) for r in rows)
    phases = sorted({p for p, _ in c})
    return pd.DataFrame([{"phase": p, **{v: c.get((p, v), 0) for v in VERDICTS}} for p in phases])


# ------------------------------------------------------------------ answers and limitations
def answers(rows: list[dict[str, Any]], gone: Mapping[str, Any]) -> pd.DataFrame:
    """One row per expected outcome: the rows that test it, their verdicts, and the answer they support:
    'supported' (judged rows all PASS), 'contradicted' (a judged FAIL), 'not established at this budget'
    (no row could be judged), 'not run'."""
    out = []
    for o in OUTCOMES:
        mine = [r for r in rows if str(r["id"]).startswith(o.prefixes)]
        c = Counter(verdict_of(r) for r in mine)
        if not mine:
            answer = "not run" if o.phase in gone.get("phases", []) else "no criterion written"
        elif c["FAIL"]:
            answer = "contradicted"
        elif c["PASS"] and not any(c[v] for v in VERDICTS[2:]):
            answer = "supported"
        elif c["PASS"]:
            answer = "partly supported (the rest not judged)"
        else:
            answer = "not established at this budget"
        fails = [r["id"] for r in mine if verdict_of(r) == "FAIL"]
        face = [r["id"] for r in mine if r.get("face_value") == "FAIL"]
        out.append({"phase": o.phase, "expected outcome": o.expected, "answer": answer, "rows": len(mine),
                    **{v: c.get(v, 0) for v in VERDICTS}, "failed": ", ".join(fails),
                    "fail at face value (not judged)": ", ".join(face)})
    return pd.DataFrame(out)


def _reason(note: str) -> str:
    """The leading clause of a note: the reason a row is not judged (without the face-value remark)."""
    text = re.split(r" \((?:the number alone reads|also) [^)]*\)", note or "", maxsplit=1)[0]
    text = text.split(". ", 1)[0].strip()
    return text if len(text) <= 160 else text.split("; ", 1)[0]


def limitations(run_dir: str | Path, rows: list[dict[str, Any]], settings: Mapping[str, Any],
                gone: Mapping[str, Any]) -> list[str]:
    """Limitations computed from the run: budget, not-judged rows grouped by reason, data and model
    provenance, untrained suites, noisy estimators, what did not run."""
    run_dir = Path(run_dir)
    out = [run_size(run_dir, settings), f"Budget: {fd.profile_banner(settings, fd.holm_m(run_dir))}."]
    for verdict in VERDICTS[2:]:
        rs = [r for r in rows if verdict_of(r) == verdict]
        if rs:
            reasons = Counter(_reason(r.get("note", "")) for r in rs)
            top = "; ".join(f"{why} ({n} row{'s' if n > 1 else ''})" for why, n in reasons.most_common(3))
            out.append(f"{len(rs)} of {len(rows)} criteria are {verdict}: {top}.")
    corpus = settings.get("corpus")
    if corpus and corpus not in ("wikitext2",):
        out.append(f"Text: the {corpus} corpus, not WikiText-2: perplexities are not comparable with published "
                   f"WikiText-2 numbers.")
    prov = fd.provenance(run_dir)
    if prov:
        out.append("Weights: " + "; ".join(prov) + f" to {settings.get('dtype', '?')} — quantisation leaves many "
                   "exact zeros, which sign flips and zeroing cannot change.")
    comp = _read(run_dir, fd.W5, "group_composition")
    if comp is not None and {"group", "zero_share"} <= set(comp.columns):
        z = comp.groupby("group")["zero_share"].mean()
        zeros = [f"{g} {v:.0%}" for g, v in z.items() if v >= 0.2]
        if zeros:
            out.append(f"Exactly-zero weights per group (week 5): {', '.join(zeros)}; those groups are tested by "
                       "gauss_noise only.")
    stab = _phase2(run_dir)
    probes = settings.get("hutchinson_probes")
    if stab is not None and "jaccard_mean" in stab.columns:
        h = stab[stab["metric"] == "hutchinson_diag"]
        if len(h) and pd.notna(h["jaccard_mean"]).any():
            out.append(f"hutchinson_diag at {probes} probe(s): top-k Jaccard across seeds "
                       f"{float(h['jaccard_mean'].mean()):.2f}" + (f", Spearman on the union {float(h['spearman_union'].mean()):+.2f}"
                                                                  if "spearman_union" in h.columns
                                                                  and pd.notna(h["spearman_union"]).all() else "")
                       + ": its per-weight ranking at this probe count is not reproducible across calibration samples.")
    suite = _read(run_dir, "phase4_week9_parameter_scaling", "micro_suite")
    why = untrained_reason(suite)
    if why:
        out.append(f"Phase 4: {why}.")
    cum = list((run_dir / "data" / fd.W8).glob("cumulative_*.parquet"))
    for p in cum:
        t = pd.read_parquet(p).sort_values("n_weights")
        d = t["delta_log_ppl"].to_numpy()
        if len(d) >= 3 and not (d[1:] >= d[:-1]).all():
            out.append(f"{p.stem.removeprefix('cumulative_')}: cumulative ablation is not monotonic in n ("
                       + ", ".join(f"top-{int(n)} {v:+.1f}" for n, v in zip(t["n_weights"], d, strict=True))
                       + " nats/token): zeroing more top weights can hurt less, so damage is not additive.")
    if gone.get("phases"):
        out.append(f"Phases with no output in this run: {gone['phases']}.")
    if gone.get("notebooks"):
        out.append(f"Scheduled notebooks not in this run: {', '.join(gone['notebooks'])}.")
    return out


def key_figures(fig_dir: str | Path, models: list[str]) -> dict[int, Path | None]:
    """Phase -> its key figure under figures/<run>/ (the first pattern that matches), or None."""
    fig_dir = Path(fig_dir)
    out: dict[int, Path | None] = {}
    for phase, pats in KEY_FIGURES.items():
        hit = None
        for pat in pats:
            for model in models or [""]:
                found = sorted(fig_dir.glob(pat.format(model=model)))
                if found:
                    hit = found[0]
                    break
            if hit:
                break
        out[phase] = hit
    return out


def key_figure_numbers(run_dir: str | Path, figs: Mapping[int, Path | None]) -> dict[int, str | None]:
    """Phase -> the number its key figure carries on its own page (from the notebook's registry), or None."""
    out: dict[int, str | None] = {}
    for phase, path in figs.items():
        reg = artefacts.read_registry(Path(run_dir) / "data" / path.parent.name) if path is not None else None
        out[phase] = next((f.number for f in (reg.figures if reg else []) if Path(f.png).resolve() == path.resolve()),
                          None)
    return out


def key_figure_takeaway(run_dir: str | Path, figs: Mapping[int, Path | None]) -> str:
    """'Phase 1: figure 0.1. Phase 2: no figure. ...': where each phase's key figure sits in the report."""
    numbers = key_figure_numbers(run_dir, figs)
    return " ".join(f"Phase {p}: " + (f"figure {numbers[p]}." if numbers[p] else
                                      "no figure." if figs[p] is None else f"{figs[p].stem}.") for p in sorted(figs))


def headline(rows: list[dict[str, Any]], ans: pd.DataFrame, f: fd.Findings) -> str:
    """The short answer to the research question, computed from the findings and the outcome table."""
    judged_n = sum(verdict_of(r) in ("PASS", "FAIL") for r in rows)
    parts = [f"{judged_n} of {len(rows)} criteria could be judged in this run"]
    for m in f.models[:2]:
        if m.sentences and m.model != "Phase 5":
            parts.append(f"{m.model}: {m.sentences[0]}")
    p3 = ans[ans["phase"] == 3]
    if len(p3):
        parts.append(f"The causal claim (Phase 3) is {p3['answer'].iloc[0]}")
    return ". ".join(p.rstrip(".") for p in parts) + "."


# ------------------------------------------------------------------ the results section
# the synthesis page numbers its tables in this order (week 16): claims first, then one per phase, then the scorecard
TABLE_CLAIMS = "16.1"


def phase_table_number(phase: int) -> str:
    return f"16.{phase + 1}"


TABLE_COUNTS = phase_table_number(max(PHASE_NAMES) + 1)
TABLE_SAVINGS = phase_table_number(max(PHASE_NAMES) + 2)  # the windows sequential evaluation saved


def notebook_figures(run_dir: str | Path) -> dict[str, tuple[int, list[str]]]:
    """Notebook -> (its phase, the numbers of the figures it drew in this run: "5.1", "5.2", ...)."""
    out = {}
    for e in load_schedule():
        reg = artefacts.read_registry(Path(run_dir) / "data" / e["id"])
        if reg is not None and e["id"] != SELF:
            out[e["id"]] = (int(e["phase"]), [f.number for f in reg.figures])
    return out


def phase_figures(nb_figs: Mapping[str, tuple[int, list[str]]]) -> dict[int, list[str]]:
    """Phase -> the figure numbers of all its notebooks, in schedule order."""
    out: dict[int, list[str]] = {p: [] for p in PHASE_NAMES}
    for phase, numbers in nb_figs.values():
        out.setdefault(phase, []).extend(numbers)
    return out


def _measured(row: Mapping[str, Any]) -> str:
    v = fd._num(row.get("measured"))
    return sig(v) if v is not None else str(row.get("measured"))


def _cite(phase: int, figs: list[str]) -> str:
    refs = ([f"figure{'s' if len(figs) > 1 else ''} {', '.join(figs)}"] if figs else []) + \
        [f"table {phase_table_number(phase)}"]
    return " and ".join(refs)


def _change(answer: str, mine: list[dict[str, Any]]) -> str:
    """What would change an answer, from the verdicts behind it."""
    c = Counter(verdict_of(r) for r in mine)
    if not mine:
        return "Running the phase's notebooks would give it criteria to judge."
    if answer == "contradicted":
        fails = [r for r in mine if verdict_of(r) == "FAIL"]
        return ("It would change if " + "; ".join(f"{r['id']} ({_measured(r)} against "
                                                 f"{r.get('threshold')})" for r in fails[:3])
                + (f" and {len(fails) - 3} more" if len(fails) > 3 else "") + " passed in a larger run.")
    open_ = {v: n for v, n in c.items() if v not in ("PASS", "FAIL")}
    text = ""
    if open_:
        text = ("Judging " + ", ".join(f"{n} {v}" for v, n in open_.items()) + " criteria would settle it: "
                "the underpowered ones need the sample the power-planned profile sizes"
                if c["underpowered"] else "Judging " + ", ".join(f"{n} {v}" for v, n in open_.items())
                + " criteria would settle it")
        text += "."
    if c["PASS"]:
        text += (" " if text else "") + f"A FAIL on any of its {c['PASS']} passing criteria in a larger run would overturn it."
    return text


def outcome_paragraphs(rows: list[dict[str, Any]], ans: pd.DataFrame,
                       figs: Mapping[int, list[str]]) -> list[str]:
    """Per expected outcome: the answer in one sentence, its evidence by number, and what would change it."""
    out = []
    for o, (_, a) in zip(OUTCOMES, ans.iterrows(), strict=True):
        mine = [r for r in rows if str(r["id"]).startswith(o.prefixes)]
        c = Counter(verdict_of(r) for r in mine)
        counted = ", ".join(f"{n} {v}" for v, n in c.most_common())
        answer = {"supported": "is supported", "contradicted": "is contradicted",
                  "not run": "was not tested: the phase did not run",
                  "no criterion written": "has no criterion in this run"}.get(
            a["answer"], f"is {a['answer']}")
        out.append(f"**Phase {o.phase} ({PHASE_NAMES[o.phase]}).** That {o.expected} {answer}"
                   + (f" ({counted} of {len(mine)} criteria)" if mine else "") + ". "
                   f"Evidence: {_cite(o.phase, list(figs.get(o.phase, [])))}. {_change(a['answer'], mine)}")
    return out


def claims_table(rows: list[dict[str, Any]], figs: Mapping[int, list[str]],
                 nb_figs: Mapping[str, tuple[int, list[str]]] | None = None) -> pd.DataFrame:
    """Every criterion once: its value, threshold and verdict, why it is not judged (when it is not), and
    its evidence (the figures of the notebook that wrote it, else its phase's, and the phase table): the
    claims and evidence table, in full. The outcome each phase's criteria test is in its paragraph."""
    out = []
    for r in rows:
        phase, verdict = int(r.get("phase", 0)), verdict_of(r)
        own = (nb_figs or {}).get(str(r.get("notebook")), (phase, []))[1]
        out.append({"phase": phase, "id": r["id"], "measured": r.get("measured"), "threshold": r.get("threshold"),
                    "verdict": verdict, "why": "" if verdict in ("PASS", "FAIL") else _reason(r.get("note", "")),
                    "evidence": _cite(phase, own or list(figs.get(phase, [])))})
    return pd.DataFrame(out, columns=["phase", "id", "measured", "threshold", "verdict", "why", "evidence"])


def _control_words(group: str) -> str:
    try:
        return f"{group} ({CONTROLS.definition(group)})"
    except EsaError:  # a group that is no registered control (renamed, or from an older run)
        return group


def contradictions(phase3: pd.DataFrame | None, rows: list[dict[str, Any]]) -> list[str]:
    """What the runs found against the hypothesis, stated plainly: a control group that does more damage
    than the sensitivity top-k under the same perturbation (from the phase 3 table), and every criterion
    judged FAIL."""
    out = []
    if phase3 is not None and "dlogppl_top_k" in phase3.columns:
        ref = phase_table_number(3)
        for r in phase3.to_dict("records"):
            top = fd._num(r.get("dlogppl_top_k"))
            if top is None:
                continue
            for col, v in r.items():
                ctl = col.removeprefix("dlogppl_")
                v = fd._num(v)
                if not col.startswith("dlogppl_") or col.endswith(("_lo", "_hi")) or ctl == "top_k" or v is None \
                        or v <= top:
                    continue
                out.append(f"On {r['model']}, {r['perturbation']} (scale {r.get('scale'):g}) of the "
                           f"{_control_words(ctl)} does more damage than the same perturbation of the sensitivity "
                           f"top-k: {sig(v)} vs {sig(top)} nats/token (table {ref}).")
    for r in rows:
        if verdict_of(r) == "FAIL":
            out.append(f"{r['id']} failed: measured {_measured(r)} against {r.get('threshold')} "
                       f"(table {TABLE_CLAIMS}).")
    return out


def run_size(run_dir: str | Path, settings: Mapping[str, Any]) -> str:
    """The run's size in one sentence: models, windows, seeds, tokens."""
    models = fd._models(Path(run_dir))[0]
    p1 = _read(Path(run_dir), fd.P1, "summary")
    if p1 is not None and "model" in p1.columns:
        models = list(dict.fromkeys([*p1["model"].astype(str), *models]))
    seeds = settings.get("seeds") or []
    w = settings.get("perturb_eval_windows") or settings.get("eval_windows")
    return (f"The run covers {len(models)} model(s) ({', '.join(models) or 'none'}), {len(seeds)} seed(s), "
            f"{w} evaluation window(s) per perturbation condition and {settings.get('max_samples')} calibration "
            f"window(s) of {settings.get('seqlen')} tokens per seed.")


def synthesize(run_dir: str | Path, fig_dir: str | Path | None = None,
               settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything the week 16 notebook shows, from one run folder."""
    run_dir = Path(run_dir)
    s = fd._settings(run_dir, settings)
    rows = judged(run_dir, s or None)
    gone = missing(run_dir)
    ans = answers(rows, gone)
    models = fd._models(run_dir)[0]
    tables = phase_tables(run_dir, rows)
    nb_figs = notebook_figures(run_dir)
    figs = phase_figures(nb_figs)
    return {"rows": rows, "paragraphs": outcome_paragraphs(rows, ans, figs), "claims": claims_table(rows, figs, nb_figs),
            "contradictions": contradictions(tables[3], rows), "size": run_size(run_dir, s), "missing": gone, "answers": ans, "tables": tables,
            "scorecard": scorecard_frame(rows), "counts": verdict_counts(rows),
            "limitations": limitations(run_dir, rows, s, gone),
            "headline": headline(rows, ans, fd.collect(run_dir, fig_dir, s, rows)),
            "figures": key_figures(fig_dir, models) if fig_dir is not None else {}}


def counts_figure(counts: pd.DataFrame) -> Any:
    """Stacked bars: criteria per phase by verdict (the run's scorecard at a glance)."""
    import matplotlib.pyplot as plt

    colors = {"PASS": "#17803d", "FAIL": "#b42318", "underpowered": "#b7791f", "not estimable": "#6b7280",
              "machinery-only": "#6d28d9"}
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    bottom = pd.Series(0, index=counts.index, dtype=float)
    for v in VERDICTS:
        if v in counts.columns and counts[v].sum():
            ax.bar(counts["phase"].astype(str), counts[v], bottom=bottom, color=colors[v], label=v)
            bottom += counts[v]
    ax.set(xlabel="phase", ylabel="criteria", title="Scorecard by phase and verdict")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def figure_grid(figs: Mapping[int, Path | None]) -> Any:
    """The phases' key figures side by side, each titled by its phase (missing phases say so)."""
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    n = len(figs)
    cols = min(3, max(1, n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    for ax, (phase, path) in zip(axes.ravel(), sorted(figs.items()), strict=False):
        ax.axis("off")
        title = f"Phase {phase}: {PHASE_NAMES.get(phase, '')}"
        if path is None:
            ax.text(0.5, 0.5, "no figure in this run", ha="center", va="center", color="0.4")
        else:
            ax.imshow(mpimg.imread(path))
            title += f"\n{path.parent.name}/{path.name}"
        ax.set_title(title, fontsize=8)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    fig.suptitle("The key figure of each phase in this run", fontsize=10)
    fig.tight_layout()
    return fig
