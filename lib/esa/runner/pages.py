"""What a rendered notebook page shows: results, numbered figure captions, links to the full artefacts.

`prepare(nb, ...)` returns a copy of an executed notebook ready for nbconvert: each figure's caption
(printed by esa.nb's savefig) moves from the cell's stdout to just under its image, with links to the
PDF and PNG; bare path reprs are dropped; a closing section links every table (CSV, LaTeX, parquet),
every figure and the notebook's log file. The executed .ipynb itself is never changed.
`exporter(...)` is nbconvert's lab template without the scripts it would fetch from a CDN (require.js,
MathJax, mermaid): the pages are read offline and printed to PDF, where those requests only fail.
"""

from __future__ import annotations

import base64
import copy
import html
import re
from pathlib import Path
from typing import Any

from esa.report import artefacts, tables
from esa.runner.layout import outputs

_BARE_REPR = re.compile(r"^(Posix|Windows|Pure\w*)?Path\(.*\)$", re.S)

TEMPLATE = "esa_page.html.j2"
_TEMPLATE_SOURCE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block extra_css -%}<style>ESA_CSS</style>{%- endblock extra_css -%}
{%- block data_png scoped -%}
{%- set alt = output | get_metadata('alt', 'image/png') -%}
{%- if alt -%}
<div class="jp-RenderedImage jp-OutputArea-output {{ extra_class }}">
<img src="data:image/png;base64,{{ output.data['image/png'] | escape_html }}" alt="{{ alt | escape_html }}">
</div>
{%- else -%}{{ super() }}{%- endif -%}
{%- endblock data_png -%}
"""
# Wide tables scroll inside their output instead of widening the page; captions read as captions.
PAGE_CSS = """
.jp-OutputArea-output { overflow-x: auto; max-width: 100%; }
table.esa-table { border-collapse: collapse; margin: 4px 0 10px; font-size: 0.92em; max-width: 100%; }
table.esa-table caption { caption-side: top; text-align: left; font-weight: 600; padding-bottom: 4px; }
table.esa-table th { text-align: left; vertical-align: bottom; border-bottom: 1px solid #444; padding: 2px 10px; }
table.esa-table td { text-align: right; padding: 2px 10px; overflow-wrap: anywhere; max-width: 28em; }
table.esa-table tr:nth-child(even) td { background: #f6f6f6; }
.jp-RenderedHTMLCommon table { max-width: none; }
.jp-RenderedText pre { white-space: pre-wrap; word-break: break-word; }
p.esa-caption { font-size: 0.92em; color: #333; margin: 2px 0 16px; max-width: 60em; }
p.esa-caption b { color: #000; }
.esa-artefacts table { font-size: 0.9em; margin-left: 0 !important; }
@media print { .jp-OutputArea-output { overflow-x: visible; } .jp-OutputArea-output table { font-size: 0.75em; } }
"""


def exporter(exclude_input: bool) -> Any:
    """nbconvert's HTMLExporter (lab template, offline), with or without the code cells."""
    import jinja2
    from nbconvert import HTMLExporter

    return HTMLExporter(
        template_name="lab",
        template_file=TEMPLATE,
        extra_loaders=[jinja2.DictLoader({TEMPLATE: _TEMPLATE_SOURCE.replace("ESA_CSS", PAGE_CSS)})],
        exclude_input=exclude_input,
        exclude_input_prompt=exclude_input,
        exclude_output_prompt=exclude_input,
    )


def prepare(nb: Any, notebook: str, run_dir: Path) -> Any:
    """A copy of executed notebook `nb` with captions under figures and an artefacts section at the end."""
    out = outputs(run_dir, notebook)
    page_dir = out.html.parent
    registry = artefacts.read_registry(out.data)
    nb = copy.deepcopy(nb)
    by_label = {f.label(): f for f in registry.figures} if registry else {}
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = _captioned(cell.get("outputs", []), by_label, page_dir)
    _found_first(nb)
    section = _artefacts_markdown(registry, out.log, out.data, page_dir)
    if section:
        import nbformat

        nb.cells.append(nbformat.v4.new_markdown_cell(section))
    return nb


def _found_first(nb: Any) -> None:
    """Move the notebook's "What this week found" (computed last) under the page's title cell, and its criteria
    in words to the end, so the page opens with its findings and closes with its verdicts."""
    import nbformat

    moved: dict[str, str] = {}
    for cell in nb.cells:
        for o in list(cell.get("outputs", []) if cell.cell_type == "code" else []):
            text = o.get("data", {}).get("text/markdown", "")
            text = "".join(text) if isinstance(text, list) else text
            mark = next((m for m in (artefacts.FOUND_MARK, artefacts.CRITERIA_MARK) if m in text), None)
            if mark and mark not in moved:
                cell.outputs.remove(o)
                moved[mark] = text.replace(mark, "")
    if artefacts.FOUND_MARK in moved:
        first = next((i for i, c in enumerate(nb.cells) if c.cell_type == "markdown"), -1)
        nb.cells.insert(first + 1, nbformat.v4.new_markdown_cell(moved[artefacts.FOUND_MARK]))
    if artefacts.CRITERIA_MARK in moved:
        nb.cells.append(nbformat.v4.new_markdown_cell(moved[artefacts.CRITERIA_MARK]))


def _captioned(outs: list[Any], by_label: dict[str, artefacts.FigureRecord], page_dir: Path) -> list[Any]:
    import nbformat

    kept: list[Any] = []
    pending: list[artefacts.FigureRecord] = []
    for o in outs:
        if o.get("output_type") == "stream" and o.get("name") == "stdout" and by_label:
            lines = o.get("text", "").splitlines(keepends=True)
            rest = []
            for line in lines:
                rec = by_label.get(line.rstrip("\n"))
                if rec is not None:
                    pending.append(rec)
                else:
                    rest.append(line)
            if rest:
                o["text"] = "".join(rest)
                kept.append(o)
            continue
        if o.get("output_type") == "execute_result" and _is_bare_repr(o.get("data", {})):
            continue
        kept.append(o)
        shows_image = o.get("output_type") in ("display_data", "execute_result") and "image/png" in o.get(
            "data", {}
        )
        if shows_image and pending:
            rec = pending.pop(0)
            o.setdefault("metadata", {}).setdefault("image/png", {})["alt"] = (
                rec.label()
            )  # the caption is the alt text
            kept.append(_caption_output(rec, page_dir, nbformat))
    # A figure the cell closed before the kernel showed it: the saved PNG stands in, with its caption.
    for rec in pending:
        if Path(rec.png).is_file():
            data = {
                "image/png": base64.b64encode(Path(rec.png).read_bytes()).decode(),
                "text/plain": rec.label(),
            }
            kept.append(
                nbformat.v4.new_output(
                    "display_data", data=data, metadata={"image/png": {"alt": rec.label()}}
                )
            )
        kept.append(_caption_output(rec, page_dir, nbformat))
    return kept


def _is_bare_repr(data: dict[str, Any]) -> bool:
    """A path as the cell's value: savefig/save_table results, or a plain Path left as the last line."""
    if data.get("text/html") == "":
        return True
    keys = set(data) - {"text/plain"}
    return not keys and bool(_BARE_REPR.match(str(data.get("text/plain", "")).strip()))


def _caption_output(rec: artefacts.FigureRecord, page_dir: Path, nbformat: Any) -> Any:
    links = " · ".join(
        f'<a href="{html.escape(artefacts.relative(p, page_dir))}">{label}</a>'
        for p, label in ((rec.pdf, "PDF"), (rec.png, "PNG"))
    )
    take = f" <i>{html.escape(rec.takeaway)}</i>" if rec.takeaway else ""
    body = (
        f'<p class="esa-caption" id="figure-{html.escape(rec.number)}"><b>Figure {html.escape(rec.number)}.</b> '
        f"{html.escape(rec.caption)}{take} <small>({links})</small></p>"
    )
    return nbformat.v4.new_output("display_data", data={"text/html": body})


def _artefacts_markdown(
    registry: artefacts.Registry | None, log: Path, data_dir: Path, page_dir: Path
) -> str:
    parts: list[str] = []
    if registry and registry.tables:
        parts.append("**Tables** (pages show the headline rows; these files hold every row)\n")
        parts.append("| table | rows | files |\n|---|---:|---|")
        for t in registry.tables:
            files = " · ".join(
                f"[{label}]({artefacts.relative(data_dir / name, page_dir)})"
                for name, label in ((t.csv, "CSV"), (t.tex, "LaTeX"), (t.parquet, "parquet")) if name
            ) + ("" if t.csv else " (no CSV: too large)")
            parts.append(f"| `{t.name}` | {t.rows:,} | {files} |")
        parts.append("")
    if registry and registry.figures:
        parts.append("**Figures**\n")
        parts.append("| figure | caption | files |\n|---|---|---|")
        for f in registry.figures:
            files = (
                f"[PDF]({artefacts.relative(f.pdf, page_dir)}) · [PNG]({artefacts.relative(f.png, page_dir)})"
            )
            parts.append(f"| {f.number} | {tables.md_cell(f.caption)} | {files} |")
        parts.append("")
    if log.is_file():
        text = log.read_text(encoding="utf-8", errors="replace")
        n_warn = sum(1 for line in text.splitlines() if " WARNING " in line)
        n_lines = len(text.splitlines())
        parts.append(
            f"**Log**: [{log.parent.name}/{log.name}]({artefacts.relative(log, page_dir)}), {n_lines} lines, "
            f"{n_warn} warning{'s' if n_warn != 1 else ''} (library logs and Python warnings of this run)."
        )
    if not parts:
        return ""
    return '## Artefacts\n<div class="esa-artefacts">\n\n' + "\n".join(parts) + "\n\n</div>"

