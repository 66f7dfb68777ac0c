"""reports/<run>/index.html: the front page of a run.

First the findings (esa.report.findings: a profile banner, per-model sentences computed from the run's
tables, one hero figure); then every notebook of the run folder (from its stamps) with links to the
executed notebook and both HTML renderings, status and time (after the windows sequential evaluation
saved against the fixed-n plan, esa.report.savings); the success-criteria scorecard
(esa.report.scorecard.judged: each id once, verdicts PASS / FAIL / underpowered / not estimable /
machinery-only, counted by verdict) with evidence links; the key figures under figures/<run>/ as embedded thumbnails linking to the full PNGs;
and a summary of the manifest. One self-contained file: inline CSS, no JavaScript.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from esa.report import html as h
from esa.report.artefacts import read_registry
from esa.report.findings import collect
from esa.report.savings import in_words, windows_saved
from esa.report.scorecard import counts, judged
from esa.runner.layout import outputs
from esa.runner.state import all_stamps
from esa.stats.verdicts import VERDICTS, verdict_of
from esa.store import atomic_path, read_json

MAX_FIGURES_PER_NOTEBOOK = 12  # an index is an overview; the notebook HTML has every figure

_STATUS_CSS = {"ok": "ok", "failed": "failed", "not run": "notrun"}


def _rel(target: Path, start: Path) -> str:
    return Path(os.path.relpath(target, start)).as_posix()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, list | tuple):
        return ", ".join(_fmt(v) for v in value)
    return "" if value is None else str(value)


def _seconds(value: Any) -> str:
    if not isinstance(value, int | float):
        return ""
    return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min"


def _missing(manifest: dict[str, Any]) -> str:
    """A record (esa.runner.record) names the schedule's notebooks that have no chunk yet."""
    gone = manifest.get("missing") or []
    if not gone:
        return ""
    return (f"<p class='missing'><b>Not yet in this record ({len(gone)} of the schedule's notebooks):</b> "
            + ", ".join(h.esc(n) for n in gone) + ".</p>")


def _parts(manifest: dict[str, Any], stamps: dict[str, dict[str, Any]], notebook_s: float) -> str:
    """A record's committed parts (per-model pieces its chunks read): each one's wall time, and the record's
    compute with them, which the notebooks' times alone leave out."""
    found = [(nb, unit, made) for nb, units in (manifest.get("parts") or {}).items() for unit, made in units.items()]
    if not found:
        return ""
    part_s = sum(float(made.get("seconds") or 0) for _, _, made in found)
    each = "; ".join(f"{h.esc(nb)} {h.esc(unit)} ({_seconds(made.get('seconds'))}, commit "
                     f"{h.esc(str(made.get('commit'))[:12])}" + (", read by its chunk)" if nb in stamps else
                                                                  ", its chunk not yet run)")
                     for nb, unit, made in found)
    return (f"<p class='missing'><b>Committed parts ({len(found)}, {_seconds(part_s)}):</b> {each}. The record's "
            f"compute so far is {_seconds(notebook_s + part_s)}: the notebooks' {_seconds(notebook_s)} and the "
            "parts' time, which a chunk reading a part does not repeat.</p>")


def _savings(run_dir: Path, settings: dict[str, Any] | None) -> str:
    """The windows sequential evaluation used against the fixed-n plan's, per notebook (esa.report.savings)."""
    words = in_words(windows_saved(run_dir, settings))
    if not words:
        return ""
    return ("<p class='missing'><b>Sequential evaluation</b> (a comparison stops adding windows once it is "
            f"decided): {h.esc(words)}.</p>")


def _notebook_rows(
    run_dir: Path, stamps: dict[str, dict[str, Any]], manifest: dict[str, Any], order: list[str]
) -> list[list[str]]:
    pos = {name: i for i, name in enumerate(order)}
    names = sorted(stamps, key=lambda n: (pos.get(n, len(pos)), n))
    rows = []
    for i, name in enumerate(names, 1):
        st = stamps[name]
        out = outputs(run_dir, name)
        files = " · ".join(
            h.link(_rel(p, run_dir) if p.is_file() else None, label)
            for p, label in ((out.executed, "ipynb"), (out.html, "HTML"), (out.html_nocode, "HTML, no code"))
        )
        status = st.get("status", "?")
        cell = h.badge(status, _STATUS_CSS.get(status, "na"))
        fail = (st.get("failure") or {}).get("summary") or st.get("render_error")
        if fail:
            cell += f'<div class="err">{h.esc(fail)}</div>'
        title = f"<b>{h.esc(st.get('title') or name)}</b><br><span class='muted'>{h.esc(name)}</span>"
        models = ", ".join((st.get("parameters") or {}).get("models") or [])
        rows.append(
            [
                str(i),
                h.esc(f"{st.get('phase', '')}/{st.get('week', '')}"),
                title,
                h.esc(models),
                cell,
                h.esc(_seconds(st.get("seconds"))),
                h.esc(st.get("started", "")),
                files,
            ]
        )
    # Selected but never started (dependency failed, fail-fast), or cut short by an interrupt.
    for entry in manifest.get("notebooks", []):
        status = entry.get("status")
        if status in ("not run", "interrupted") and entry.get("notebook") not in stamps:
            rows.append(
                [
                    "",
                    "",
                    f"<b>{h.esc(entry['notebook'])}</b>",
                    "",
                    h.badge(status, "notrun") + f'<div class="err">{h.esc(entry.get("reason", ""))}</div>',
                    "",
                    "",
                    "",
                ]
            )
    return rows


_VERDICT_CSS = {"PASS": "PASS", "FAIL": "FAIL", "underpowered": "under", "not estimable": "n-a",
                "machinery-only": "mach"}
# index-only styles: long ids and paths wrap inside their cells, so nothing runs off a 1400 px window
INDEX_CSS = """<style>
table.score { table-layout: fixed; } table.score td, table.score th { overflow-wrap: anywhere; }
table.score td.num, table.score .badge { white-space: normal; }
table.score col.c1 { width: 22%; } table.score col.c2 { width: 10%; } table.score col.c3 { width: 11%; }
table.score col.c4 { width: 11%; } table.score col.c5 { width: 34%; } table.score col.c6 { width: 12%; }
dd, figcaption, .banner, .finding { overflow-wrap: anywhere; }
.under { background: #b7791f; } .mach { background: #6d28d9; }
.banner { background: #fff7e6; border: 1px solid #f0c36d; border-radius: 8px; padding: 8px 14px; margin: 8px 0; }
.findings figure { width: 100%; max-width: 900px; margin: 10px 0 0; }
.cid { font-size: 0.75em; color: #6b7280; overflow-wrap: anywhere; }
</style>"""


def _evidence(run_dir: Path, evidence: str) -> str:
    """The evidence text with its path or notebook as a link: 'data/<nb>/x.json' -> that file; '<nb>: tables' ->
    the notebook's data folder (or its HTML page when it wrote no data)."""
    text = str(evidence or "")
    head = text.split(":", 1)[0].split(" ", 1)[0]
    if head.startswith("data/") and (run_dir / head).exists():
        return h.link(head, head) + h.esc(text[len(head):])
    if head and (run_dir / "data" / head).is_dir():
        return h.link(f"data/{head}/", head) + h.esc(text[len(head):])
    page = outputs(run_dir, head).html_nocode if head else None
    if page is not None and page.is_file():
        return h.link(_rel(page, run_dir), head) + h.esc(text[len(head):])
    return h.esc(text)


def _scorecard(run_dir: Path, settings: dict[str, Any] | None) -> tuple[str, dict[str, int]]:
    try:
        rows = judged(run_dir, settings)
    except (OSError, ValueError) as err:
        return f'<p class="err">scorecard unreadable: {h.esc(err)}</p>', {}
    if not rows:
        return '<p class="muted">No notebook of this run wrote success criteria.</p>', {}
    body = []
    for r in sorted(rows, key=lambda r: (r.get("phase", 0), r.get("notebook", ""), r.get("id", ""))):
        verdict = verdict_of(r)
        nb = r.get("notebook") or ""
        page = outputs(run_dir, nb).html_nocode
        also = (f"<br><span class='muted'>also written by {h.esc(', '.join(r['also_in']))}</span>"
                if r.get("also_in") else "")
        body.append(
            [
                f"<b>{h.esc(r.get('id'))}</b><br><span class='muted'>{h.esc(r.get('text'))}</span>",
                h.esc(_fmt(r.get("measured")) or "n/a"),
                h.esc(r.get("threshold")),
                h.badge(verdict, _VERDICT_CSS.get(verdict, "n-a")),
                _evidence(run_dir, r.get("evidence", ""))
                + (f"<br><span class='muted'>{h.esc(r['note'])}</span>" if r.get("note") else ""),
                h.link(_rel(page, run_dir) if page.is_file() else None, nb) + also,
            ]
        )
    headers = ["Criterion", "Measured", "Threshold", "Verdict", "Evidence and reason", "Notebook"]
    cols = "<colgroup>" + "".join(f'<col class="c{i}">' for i in range(1, 7)) + "</colgroup>"
    table = h.table(headers, body, numeric=[1]).replace("<table>", f'<table class="score">{cols}', 1)
    return table, counts(rows)


def _findings(run_dir: Path, fig_dir: Path, settings: dict[str, Any] | None) -> str:
    f = collect(run_dir, fig_dir, settings)
    parts = [f'<div class="banner"><b>Profile.</b> {h.esc(f.banner)}</div>']
    text = "".join(f"<h3>{h.esc(m.model)}</h3>" + "".join(
        f'<p class="finding">{h.esc(s)}' + (f' <span class="cid">{h.esc(", ".join(ids))}</span>' if ids else "") + "</p>"
        for s, ids in zip(m.sentences, m.ids or [[]] * len(m.sentences), strict=True)) for m in f.models) or '<p class="muted">No Phase 2-5 results in this run yet.</p>'
    if f.missing:
        text += f'<p class="muted">Not in this run: {h.esc("; ".join(f.missing))}.</p>'
    fig = ""
    if f.hero is not None:
        href = _rel(f.hero, run_dir)
        fig = (f'<figure><a href="{h.esc(href)}"><img src="{h.esc(h.thumbnail_src(f.hero, 880) or href)}" '
               f'alt="{h.esc(f.hero_caption)}"></a><figcaption>{h.esc(f.hero_caption)}</figcaption></figure>')
    return "<h2>Findings</h2>" + parts[0] + f'<div class="findings"><div class="text">{text}</div>{fig}</div>'


def _figure_labels(run_dir: Path, notebook: str) -> dict[str, str]:
    """PNG file name -> "Figure 5.2. caption" from the notebook's artefact registry (file stems without one)."""
    reg = read_registry(run_dir / "data" / notebook)
    return {Path(f.png).name: f.label() for f in reg.figures} if reg is not None else {}


def _figures(run_dir: Path, fig_dir: Path, order: list[str]) -> str:
    if not fig_dir.is_dir():
        return '<p class="muted">No figures for this run.</p>'
    pos = {name: i for i, name in enumerate(order)}
    groups: dict[str, list[Path]] = {}
    for png in sorted(fig_dir.rglob("*.png")):
        if png.name.startswith("."):
            continue  # a temporary file of an interrupted write
        rel = png.relative_to(fig_dir)
        groups.setdefault(rel.parts[0] if len(rel.parts) > 1 else "(run)", []).append(png)
    if not groups:
        return '<p class="muted">No figures for this run.</p>'
    parts = []
    for name in sorted(groups, key=lambda n: (pos.get(n, len(pos)), n)):
        pngs = groups[name]
        labels = _figure_labels(run_dir, name)
        figs = []
        for png in pngs[:MAX_FIGURES_PER_NOTEBOOK]:
            href = _rel(png, run_dir)
            src = h.thumbnail_src(png) or href
            label = labels.get(png.name, png.stem)
            figs.append(
                f'<figure><a href="{h.esc(href)}"><img src="{h.esc(src)}" alt="{h.esc(label)}" '
                f'loading="lazy"></a><figcaption>{h.esc(label)}</figcaption></figure>'
            )
        more = len(pngs) - MAX_FIGURES_PER_NOTEBOOK
        note = (
            f'<p class="muted">{more} more figure(s) in {h.esc(_rel(png.parent, run_dir))}</p>'
            if more > 0
            else ""
        )
        parts.append(f"<h3>{h.esc(name)}</h3><div class='figs'>{''.join(figs)}</div>{note}")
    return "".join(parts)


def _manifest_summary(manifest: dict[str, Any], run_dir: Path) -> str:
    if not manifest:
        return '<p class="muted">No manifest yet.</p>'
    env = manifest.get("environment", {})
    commit = env.get("git_commit") or "unknown"
    if env.get("git_dirty"):
        commit += " (uncommitted changes)"
    pkgs = ", ".join(f"{k} {v}" for k, v in (env.get("packages") or {}).items() if v)
    pairs = [
        ("run id", manifest.get("run_id")),
        ("profile", manifest.get("profile")),
        ("models (--models)", _fmt(manifest.get("models")) or "from the schedule"),
        ("overrides", manifest.get("overrides") or "none"),
        (
            "last invocation",
            f"{manifest.get('started')} -> {manifest.get('finished')} "
            f"({_seconds(manifest.get('wall_seconds'))}), {manifest.get('status', 'status not recorded')}",
        ),
        (
            "executor",
            f"{manifest.get('executor')} (jobs {manifest.get('jobs')}), kernel {manifest.get('kernel')}",
        ),
        ("git commit", commit),
        ("python / platform", f"{env.get('python')} / {env.get('platform')}"),
        ("host / GPUs", f"{env.get('host')} / {', '.join(env.get('gpus') or []) or 'none'}"),
        ("packages", pkgs),
        ("command", " ".join(manifest.get("command") or [])),
    ]
    return h.definition_list(pairs) + f"<p>{h.link('manifest.json', 'Full manifest (JSON)')}</p>"


def write_index(run_dir: Path, fig_dir: Path, order: list[str] | None = None) -> Path:
    """Write reports/<run>/index.html (atomic) and return its path."""
    order = order or []
    stamps = all_stamps(run_dir)
    try:
        manifest = read_json(run_dir / "manifest.json")
    except (OSError, ValueError):
        manifest = {}
    n_ok = sum(s.get("status") == "ok" for s in stamps.values())
    n_failed = sum(s.get("status") == "failed" for s in stamps.values())
    settings = manifest.get("profile_settings") or None
    score_html, n_verdict = _scorecard(run_dir, settings)
    total_s = sum(s.get("seconds") or 0 for s in stamps.values())
    cards = [
        (str(n_ok), "notebooks ok"),
        (str(n_failed), "failed"),
        *((str(n_verdict.get(v, 0)), f"criteria {v}" if v == "PASS" else v) for v in VERDICTS),
        (_seconds(total_s), "notebook time (sum)"),
    ]
    body = (
        INDEX_CSS
        + _findings(run_dir, fig_dir, settings)
        + "<div class='cards'>"
        + "".join(f"<div class='card'><b>{h.esc(v)}</b><span>{h.esc(k)}</span></div>" for v, k in cards)
        + "</div>"
        + _missing(manifest)
        + _parts(manifest, stamps, total_s)
        + _savings(run_dir, settings)
        + "<h2>Notebooks</h2>"
        + h.table(
            ["#", "Phase/week", "Notebook", "Models", "Status", "Time", "Started", "Outputs"],
            _notebook_rows(run_dir, stamps, manifest, order),
            numeric=[5],
        )
        + "<h2>Success criteria (each judged once)</h2>"
        + score_html
        + "<h2>Key figures</h2>"
        + _figures(run_dir, fig_dir, order)
        + "<h2>Manifest</h2>"
        + _manifest_summary(manifest, run_dir)
    )
    env = manifest.get("environment", {})
    subtitle = h.esc(
        f"profile {manifest.get('profile', '?')} · commit {(env.get('git_commit') or 'unknown')[:12]} · "
        f"last invocation finished {manifest.get('finished', '?')}"
    )
    text = h.page(f"critical-weights run: {run_dir.name}", body, subtitle)
    path = run_dir / "index.html"
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
