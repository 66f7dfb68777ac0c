"""Small, dependency-free HTML building blocks for self-contained reports (inline CSS, no JavaScript)."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Sequence
from pathlib import Path

CSS = """
:root { --fg:#1d2330; --muted:#5b6475; --line:#dde2ea; --bg:#ffffff; --soft:#f5f7fa;
        --ok:#17803d; --bad:#b42318; --na:#6b7280; --skip:#3b5bdb; }
* { box-sizing: border-box; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       background: var(--bg); margin: 0 auto; max-width: 1180px; padding: 28px 24px 60px; }
h1 { font-size: 1.6em; margin: 0 0 4px; } h2 { font-size: 1.2em; margin: 34px 0 10px;
  border-bottom: 1px solid var(--line); padding-bottom: 4px; } h3 { font-size: 1.02em; margin: 18px 0 8px; }
.sub { color: var(--muted); margin: 0 0 18px; }
table { border-collapse: collapse; width: 100%; font-size: 0.92em; }
th, td { text-align: left; padding: 6px 9px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { background: var(--soft); font-weight: 600; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
a { color: #1f4fbf; text-decoration: none; } a:hover { text-decoration: underline; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 0.82em; font-weight: 600;
         color: #fff; white-space: nowrap; }
.ok, .PASS { background: var(--ok); } .failed, .FAIL { background: var(--bad); }
.na, .n-a { background: var(--na); } .skip { background: var(--skip); } .notrun { background: #b7791f; }
.err { color: var(--bad); font-size: 0.85em; white-space: pre-wrap; margin: 4px 0 0;
       font-family: ui-monospace, SFMono-Regular, Menlo, monospace; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 8px 0 4px; }
.card { background: var(--soft); border: 1px solid var(--line); border-radius: 8px; padding: 8px 14px; }
.card b { display: block; font-size: 1.25em; } .card span { color: var(--muted); font-size: 0.85em; }
.figs { display: flex; flex-wrap: wrap; gap: 14px; }
figure { margin: 0; width: 260px; } figure img { width: 100%; border: 1px solid var(--line); border-radius: 4px; }
figcaption { font-size: 0.8em; color: var(--muted); word-break: break-all; }
dl.kv { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; font-size: 0.92em; }
dl.kv dt { color: var(--muted); } dl.kv dd { margin: 0; font-family: ui-monospace, Menlo, monospace; }
.muted { color: var(--muted); }
"""


def esc(value: object) -> str:
    return html.escape("" if value is None else str(value))


def badge(text: str, css: str | None = None) -> str:
    return f'<span class="badge {esc(css or text)}">{esc(text)}</span>'


def link(href: str | None, text: str) -> str:
    return f'<a href="{esc(href)}">{esc(text)}</a>' if href else f'<span class="muted">{esc(text)}</span>'


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], numeric: Iterable[int] = ()) -> str:
    """An HTML table; cells are raw HTML (escape values with `esc` before passing them)."""
    num = set(numeric)
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join(
        "<tr>"
        + "".join(f'<td class="num">{c}</td>' if i in num else f"<td>{c}</td>" for i, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def definition_list(pairs: Iterable[tuple[str, object]]) -> str:
    return '<dl class="kv">' + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in pairs) + "</dl>"


def thumbnail_src(png: Path, width: int = 520) -> str | None:
    """A small PNG data URI of `png` (so the page shows figures on its own), or None if Pillow fails."""
    try:
        from PIL import Image

        with Image.open(png) as im:
            im.thumbnail((width, width * 3))
            buf = io.BytesIO()
            im.convert("RGBA" if im.mode in ("RGBA", "LA", "P") else "RGB").save(
                buf, format="PNG", optimize=True
            )
    except Exception:  # noqa: BLE001 - a broken figure must not break the index; the link still works
        return None
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def page(title: str, body: str, subtitle: str = "") -> str:
    sub = f'<p class="sub">{subtitle}</p>' if subtitle else ""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head>"
        f"<body><h1>{esc(title)}</h1>{sub}{body}</body></html>\n"
    )
