"""The report's paper-ready files from an executed run, without executing anything.

`python -m esa.runner.docs tables [--run-id R]` writes the CSV and LaTeX of every parquet table a
notebook saved (for runs executed before notebooks wrote them), and `... pdf [--run-id R]` writes
`reports/<run>/report.pdf`: a document typeset by Typst (esa.report.document: title page, abstract, one
section per phase, the scorecard as appendix). Only when the `typst` wheel is missing or fails does it
fall back to printing the index and each notebook page without code, with a bookmark per page, through
Debian's `chromium` driven by playwright (`executable_path`, so playwright never downloads a browser of
its own); pages are self-contained files, so nothing is fetched.
`make run` and `make generate-docs` call these after the runner.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from esa.errors import EsaError
from esa.report import artefacts, document
from esa.runner import schedule
from esa.runner.layout import figures_dir, outputs, report_pdf
from esa.runner.state import all_stamps
from esa.store import REPO_ROOT, atomic_path

CHROMIUM_ENV = "ESA_CHROMIUM"  # a Chromium binary other than the one on PATH
_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
VIEWPORT_WIDTH = 1400  # what an advisor's screen shows; pages are checked at this width too


def chromium_path() -> str:
    """The Chromium to print and test with: $ESA_CHROMIUM, else the first on PATH; EsaError if none."""
    env = os.environ.get(CHROMIUM_ENV)
    if env:
        if not Path(env).is_file():
            raise EsaError(f"{CHROMIUM_ENV}={env} is not a file; point it at a Chromium binary or unset it")
        return env
    for name in _CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    raise EsaError(
        f"no Chromium found (looked for {', '.join(_CANDIDATES)} on PATH and ${CHROMIUM_ENV}); install "
        "Debian's package with `apt-get install -y chromium` (make env does this as root)"
    )


def rebuild_tables(run_dir: Path) -> int:
    """CSV + LaTeX beside every parquet of the run's notebooks, and registries listing them; returns the count."""
    import pandas as pd

    n = 0
    for data_dir in sorted(p for p in (run_dir / "data").glob("*") if p.is_dir()):
        reg = artefacts.read_registry(data_dir) or artefacts.Registry(data_dir.name)
        known = {t.name: t for t in reg.tables}
        tables = []
        for parquet in sorted(data_dir.glob("*.parquet")):
            rec = known.get(parquet.stem)
            if rec is None or (rec.csv and not (data_dir / rec.csv).is_file()) or not (data_dir / rec.tex).is_file():
                rec = artefacts.write_table(pd.read_parquet(parquet), data_dir, parquet.stem)
                n += 1
            tables.append(rec)
        # Registry order is the order the notebook saved them; tables it never registered go last.
        order = {t.name: i for i, t in enumerate(reg.tables)}
        reg.tables = sorted(tables, key=lambda t: (order.get(t.name, len(order)), t.name))
        artefacts.write_registry(data_dir, reg)
    return n


def report_pages(run_dir: Path) -> list[tuple[str, Path]]:
    """(bookmark title, page) in report order: the index, then each notebook without code, by schedule."""
    pages: list[tuple[str, Path]] = []
    index = run_dir / "index.html"
    if index.is_file():
        pages.append(("Run overview: findings and scorecard", index))
    stamps = all_stamps(run_dir)
    try:
        order = [e.id for e in schedule.entries()]
    except EsaError:  # a broken schedule must not stop the report: stamp order
        order = []
    pos = {name: i for i, name in enumerate(order)}
    for name in sorted(stamps, key=lambda n: (pos.get(n, len(pos)), n)):
        page = outputs(run_dir, name).html_nocode
        if page.is_file():
            title = stamps[name].get("title") or name
            week = stamps[name].get("week")
            pages.append((f"Week {week}: {title}" if week is not None else title, page))
    return pages


def build_pdf(run_dir: Path, dest: Path | None = None, chrome: Any = None) -> Path:
    """The run's report PDF: the Typst document, else (no typst, or it failed) the printed pages."""
    dest = dest or report_pdf(run_dir)
    try:
        import typst  # noqa: F401 - only whether it is installed
    except ImportError:
        print("esa.runner.docs: typst is not installed (pip install -e '.[report]'); printing the HTML pages",
              file=sys.stderr)
        return print_pdf(run_dir, dest, chrome)
    try:
        with atomic_path(dest) as tmp:
            document.build(run_dir, figures_dir(run_dir.parent.parent, run_dir.name), tmp)
    except RuntimeError as err:  # typst reports a compile error as RuntimeError: keep a report all the same
        print(f"esa.runner.docs: typst failed ({err}); printing the HTML pages instead", file=sys.stderr)
        return print_pdf(run_dir, dest, chrome)
    return dest


def print_pdf(run_dir: Path, dest: Path | None = None, chrome: Any = None) -> Path:
    """The fallback: print the run's pages to one PDF (A4 landscape, backgrounds on) with one bookmark per page.

    `chrome`: a playwright Browser already running (the browser test's); by default one is launched.
    """
    pages = report_pages(run_dir)
    if not pages:
        raise EsaError(f"{run_dir} has no index.html and no rendered notebook; run run_all.py first")
    try:
        from pypdf import PdfWriter
    except ImportError:
        raise EsaError("the PDF needs pypdf: pip install -e '.[report]'") from None
    writer = PdfWriter()
    if chrome is not None:
        _print_pages(chrome, pages, writer)
    else:
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            raise EsaError("the PDF needs playwright: pip install -e '.[report]'") from None
        exe = chromium_path()
        with sync_playwright() as pw:
            launched = pw.chromium.launch(executable_path=exe)
            try:
                _print_pages(launched, pages, writer)
            finally:
                launched.close()
    writer.add_metadata({"/Title": f"critical-weights report: {run_dir.name}"})
    dest = dest or report_pdf(run_dir)
    with atomic_path(dest) as tmp, open(tmp, "wb") as fh:
        writer.write(fh)
    return dest


def _print_pages(chrome: Any, pages: list[tuple[str, Path]], writer: Any) -> None:
    from pypdf import PdfReader

    page = chrome.new_page(viewport={"width": VIEWPORT_WIDTH, "height": 1000})
    try:
        for title, path in pages:
            page.goto(path.resolve().as_uri(), wait_until="load")
            pdf = page.pdf(
                format="A4",
                landscape=True,
                print_background=True,
                scale=0.8,  # A4 landscape at 0.8 lays the page out about 1400 CSS px wide
                margin={"top": "12mm", "bottom": "12mm", "left": "10mm", "right": "10mm"},
            )
            start = len(writer.pages)
            for p in PdfReader(io.BytesIO(pdf)).pages:
                writer.add_page(p)
            writer.add_outline_item(title=title, page_number=start)
    finally:
        page.close()


def _run_dir(run_id: str | None, root: Path) -> Path:
    if run_id is None:
        from esa.runner.driver import latest_run

        run_id = latest_run(root)
    run_dir = (root / "reports" / run_id).resolve()
    if not run_dir.is_dir():
        raise EsaError(f"no run folder {run_dir}")
    return run_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m esa.runner.docs", description=__doc__.splitlines()[0])
    p.add_argument(
        "what", choices=["tables", "pdf"], help="tables: CSV + LaTeX of every table; pdf: report.pdf"
    )
    p.add_argument("--run-id", help="run folder under reports/ (default: the run whose manifest is newest)")
    p.add_argument("--root", type=Path, default=REPO_ROOT, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        run_dir = _run_dir(args.run_id, args.root.resolve())
        started = time.perf_counter()
        if args.what == "tables":
            n = rebuild_tables(run_dir)
            print(
                f"{run_dir.name}: {n} table(s) written as CSV + LaTeX in {time.perf_counter() - started:.1f} s"
            )
        else:
            dest = build_pdf(run_dir)
            print(f"{dest} written in {time.perf_counter() - started:.1f} s")
    except EsaError as err:
        print(f"esa.runner.docs: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
