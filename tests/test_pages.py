"""Clean pages and paper-ready artefacts, without a browser: tables, figures, captions, quiet kernels.

Covers esa.report.artefacts (CSV + LaTeX), esa.nb's save_table/savefig (files, numbering, captions),
esa.runner.pages (captions under images, bare reprs dropped, artefact links, no CDN scripts),
esa.nb.headless_kernel (logs and warnings to the log file, no bars) and esa.runner.docs' table rebuild.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import matplotlib
import nbformat
import numpy as np
import pandas as pd
import pytest

from esa.report import artefacts
from esa.runner import docs, pages
from esa.runner.layout import outputs

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _frame(n: int = 60) -> pd.DataFrame:
    return pd.DataFrame(
        {"param_name": [f"layer_{i}.w" for i in range(n)], "score": np.linspace(0, 1, n), "k": range(n)}
    )


def test_write_table_csv_and_booktabs_latex(tmp_path):
    rec = artefacts.write_table(_frame(), tmp_path, "top_weights", caption="Top weights")
    back = pd.read_csv(tmp_path / rec.csv)
    assert len(back) == 60 and list(back.columns) == ["param_name", "score", "k"]
    tex = (tmp_path / rec.tex).read_text()
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex  # booktabs
    assert "layer\\_0.w" in tex  # underscores escaped: the file compiles
    assert "\\begin{longtable}" in tex  # 60 rows: more than a page
    assert "\\label{tab:top_weights}" in tex and "Top weights" in tex
    assert pd.read_parquet(tmp_path / rec.parquet).equals(_frame())


def test_write_table_keeps_a_groupby_index_and_caps_latex(tmp_path):
    df = _frame(300).assign(g=lambda d: d.k % 3).groupby("g")[["score"]].mean()
    rec = artefacts.write_table(df, tmp_path, "by_group")
    assert list(pd.read_csv(tmp_path / rec.csv).columns) == ["g", "score"]  # the index is a column
    assert list(pd.read_parquet(tmp_path / rec.parquet).columns) == [
        "score"
    ]  # parquet as later weeks read it
    filtered = artefacts.write_table(_frame()[lambda d: d.k > 50], tmp_path, "filtered")
    assert "index" not in pd.read_csv(tmp_path / filtered.csv).columns  # row numbers are not data
    big = artefacts.write_table(_frame(300), tmp_path, "big")
    tex = (tmp_path / big.tex).read_text()
    assert big.rows == 300 and big.tex_rows == artefacts.TEX_MAX_ROWS
    assert f"first {artefacts.TEX_MAX_ROWS} of 300 rows" in tex
    assert len(pd.read_csv(tmp_path / big.csv)) == 300  # the CSV keeps every row


def _context(tmp_path: Path, notebook: str = "phase3_week5_demo"):
    import esa.nb

    run = tmp_path / "reports" / "r1"
    return esa.nb.context(notebook, "smoke", ["tiny-llama"], run, {})


def test_savefig_numbers_captions_and_writes_png_and_pdf(tmp_path, capsys):
    ctx = _context(tmp_path)
    assert ctx.fig_dir == tmp_path / "figures" / "r1" / "phase3_week5_demo"  # beside reports/, same root
    fig, ax = plt.subplots()
    ax.plot([1, 2, 3])
    ax.set_title("damage per group")
    first = ctx.savefig(fig, "damage")
    second = ctx.savefig(fig, "dose", caption="Dose-response", takeaway="top-k rises at every dose.")
    plt.close(fig)
    printed = capsys.readouterr().out.splitlines()
    assert printed == ["Figure 5.1. damage per group", "Figure 5.2. Dose-response top-k rises at every dose."]
    for name in ("damage", "dose"):
        assert (ctx.fig_dir / f"{name}.png").stat().st_size > 0
        assert (ctx.fig_dir / f"{name}.pdf").read_bytes().startswith(b"%PDF")
    assert first == ctx.fig_dir / "damage.png" and first._repr_html_() == ""  # no PosixPath(...) on a page
    reg = json.loads((ctx.data_dir / artefacts.REGISTRY).read_text())
    assert [f["number"] for f in reg["figures"]] == ["5.1", "5.2"]
    assert second.name == "dose.png"


def test_save_table_returns_path_with_capped_view(tmp_path):
    ctx = _context(tmp_path)
    path = ctx.save_table(_frame(), "top_weights")
    assert path == ctx.data_dir / "top_weights.parquet" and path.is_file()
    view = path._repr_html_()
    assert view.count("<tr") == 1 + 10  # header + headline rows
    assert "10 of 60 rows" in view and 'href="../data/phase3_week5_demo/top_weights.csv"' in view
    assert (ctx.data_dir / "top_weights.csv").is_file() and (ctx.data_dir / "top_weights.tex").is_file()


def _executed(tmp_path: Path) -> tuple[Path, Path]:
    """A run folder with one executed notebook whose outputs look like a real kernel's."""
    ctx = _context(tmp_path)
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    ctx.savefig(fig, "survival", caption="Survival of top-k", takeaway="Heavy tail.")
    plt.close(fig)
    ctx.save_table(_frame(), "topk")
    label = "Figure 5.1. Survival of top-k Heavy tail."
    png = nbformat.v4.new_output("display_data", data={"image/png": "iVBORw0KGgo=", "text/plain": "<Figure>"})
    cell = nbformat.v4.new_code_cell("ctx.savefig(fig, 'survival')")
    cell.outputs = [
        nbformat.v4.new_output("stream", name="stdout", text=f"before\n{label}\nafter\n"),
        nbformat.v4.new_output(
            "execute_result", data={"text/plain": "PosixPath('/x/y.png')"}, execution_count=1
        ),
        png,
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# Demo"), cell])
    run = ctx.run_dir
    out = outputs(run, ctx.notebook)
    out.executed.parent.mkdir(parents=True)
    nbformat.write(nb, str(out.executed))
    out.log.parent.mkdir(parents=True)
    out.log.write_text("12:00:00 WARNING esa.perturb.sweep: non-finite\n12:00:01 INFO x: y\n")
    return run, out.executed


def test_prepare_moves_captions_under_images_and_links_artefacts(tmp_path):
    run, executed = _executed(tmp_path)
    nb = pages.prepare(nbformat.read(str(executed), as_version=4), "phase3_week5_demo", run)
    outs = nb.cells[1].outputs
    kinds = [o.output_type for o in outs]
    assert kinds == ["stream", "display_data", "display_data"]  # the PosixPath repr is gone
    assert outs[0].text == "before\nafter\n"  # only the caption line left the stream
    assert "image/png" in outs[1].data
    caption = outs[2].data["text/html"]
    assert "<b>Figure 5.1.</b> Survival of top-k <i>Heavy tail.</i>" in caption
    assert "../../../figures/r1/phase3_week5_demo/survival.pdf" in caption
    section = nb.cells[-1].source
    assert "../data/phase3_week5_demo/topk.csv" in section and "| 60 |" in section
    assert "[logs/phase3_week5_demo.log](../logs/phase3_week5_demo.log), 2 lines, 1 warning" in section
    # the executed notebook itself is untouched
    assert len(nbformat.read(str(executed), as_version=4).cells) == 2


def test_rendered_pages_fetch_nothing_and_show_no_repr(tmp_path):
    from esa.runner import notebook as nbrun

    run, executed = _executed(tmp_path)
    out = outputs(run, "phase3_week5_demo")
    nbrun.render_html(executed, out.html, out.html_nocode)
    for page in (out.html, out.html_nocode):
        text = page.read_text()
        assert "cdnjs" not in text and "<script src=" not in text  # offline pages: no CDN scripts
        assert "PosixPath(" not in text and 'class="esa-caption"' in text
    assert "savefig" in out.html.read_text() and "savefig" not in out.html_nocode.read_text()
    assert 'alt="Figure 5.1. Survival of top-k Heavy tail."' in out.html_nocode.read_text()


def test_headless_kernel_sends_logs_and_warnings_to_the_log_file(tmp_path):
    log = tmp_path / "nb.log"
    code = textwrap.dedent(
        """
        import logging, warnings, sys
        import numpy as np
        import esa.nb
        esa.nb.headless_kernel()
        import pandas as pd, os
        logging.getLogger("esa.demo").warning("bit flip made the loss NaN")
        with np.errstate(over="warn"):
            np.exp(np.array([1000.0]))
        warnings.warn("a user warning")
        from esa.progress import progress
        assert list(progress(range(3))) == [0, 1, 2] and os.environ["TQDM_DISABLE"] == "1"
        print(pd.get_option("display.max_rows"), pd.get_option("display.min_rows"))
        """
    )
    env = {**os.environ, "ESA_NOTEBOOK_LOG": str(log)}
    env.pop("ESA_PROGRESS", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # nothing reaches the page's stderr
    assert proc.stdout.split() == ["20", "10"]
    text = log.read_text()
    assert "WARNING esa.demo: bit flip made the loss NaN" in text
    assert "RuntimeWarning: overflow encountered in exp" in text and "UserWarning: a user warning" in text


def test_headless_kernel_is_a_no_op_outside_the_runner(monkeypatch):
    import logging

    import esa.nb

    monkeypatch.delenv("ESA_NOTEBOOK_LOG", raising=False)
    before = list(logging.getLogger().handlers)
    esa.nb.headless_kernel()
    assert logging.getLogger().handlers == before


def test_rebuild_tables_for_a_run_without_csv(tmp_path):
    data = tmp_path / "reports" / "old" / "data" / "phase1_week0_baselines"
    data.mkdir(parents=True)
    _frame(5).to_parquet(data / "summary.parquet", index=False)
    assert docs.rebuild_tables(data.parent.parent) == 1
    assert (data / "summary.csv").is_file() and (data / "summary.tex").is_file()
    reg = artefacts.read_registry(data)
    assert reg is not None and [t.name for t in reg.tables] == ["summary"]
    assert docs.rebuild_tables(data.parent.parent) == 0  # up to date: nothing rewritten


def test_chromium_path_names_a_bad_override(monkeypatch, tmp_path):
    from esa.errors import EsaError

    monkeypatch.setenv(docs.CHROMIUM_ENV, str(tmp_path / "nope"))
    with pytest.raises(EsaError, match="ESA_CHROMIUM=.*is not a file"):
        docs.chromium_path()


def test_a_figure_closed_before_display_gets_its_saved_png(tmp_path):
    run, executed = _executed(tmp_path)
    nb = nbformat.read(str(executed), as_version=4)
    nb.cells[1].outputs = [o for o in nb.cells[1].outputs if "image/png" not in o.get("data", {})]
    out = pages.prepare(nb, "phase3_week5_demo", run).cells[1].outputs
    assert [o.output_type for o in out] == ["stream", "display_data", "display_data"]
    assert out[1].data["image/png"] and out[1].metadata["image/png"]["alt"].startswith("Figure 5.1.")
    assert "esa-caption" in out[2].data["text/html"]


def test_hotspot_plot_keeps_empty_layers_and_labels_its_colorbar():
    from esa.sensitivity import plots as splots

    counts = pd.DataFrame({"q": [3, 5], "down": [1, 0]}, index=pd.Index([0, 5], name="layer"))
    fig = splots.hotspot_plot(counts, "t", n_layers=8)
    heat, bar = fig.axes
    assert heat.images[0].get_array().shape == (8, 2)  # layers 1-4, 6, 7 shown as zero rows
    assert "6 of 8 layers hold none" in heat.get_title()
    assert bar.get_ylabel() == "selected weights (count)"
    plt.close(fig)


def test_damage_bars_keep_a_log_axis_near_the_bars_and_mark_capped_groups():
    from esa.perturb import plots as pplots

    rows = [
        {
            "perturbation": "gauss_noise",
            "scale": 1.0,
            "prob": 0.5,
            "group": g,
            "mean": m,
            "ci_lo": lo,
            "ci_hi": m * 1.2,
            "n_capped": 0,
        }
        for g, m, lo in (("top_k", 5.0, 4.0), ("random_k", 1e-3, -1e-3), ("bottom_k", 0.03, 0.02))
    ] + [
        {
            "perturbation": "sign_flip",
            "scale": 1.0,
            "prob": 0.5,
            "group": g,
            "mean": 50.0,
            "ci_lo": 50.0,
            "ci_hi": 50.0,
            "n_capped": c,
        }
        for g, c in (("top_k", 2), ("random_k", 0))
    ]
    fig = pplots.damage_bars(rows)
    noise, flip = fig.axes
    assert noise.get_yscale() == "log" and noise.get_ylim()[0] >= 1e-3 / 10 / 2  # not stretched to 1e-15
    assert "hatched: 1 group(s) at the damage cap" in flip.get_title()
    assert [p.get_hatch() for p in flip.patches] == ["//", None]
    plt.close(fig)


def test_a_table_mixing_numbers_and_words_in_one_column_is_stored(tmp_path) -> None:
    # the synthesis scorecard's "measured" holds numbers and "nan"/"inf" words; parquet needs one type
    import pandas as pd

    from esa.report.artefacts import write_table

    write_table(pd.DataFrame({"measured": [1.5, "nan", 3], "n": [1, 2, 3]}), tmp_path, "t")
    back = pd.read_parquet(tmp_path / "t.parquet")
    assert list(back["measured"]) == ["1.5", "nan", "3"] and back["n"].dtype == "int64"


def test_index_thumbnails_carry_the_figure_number_and_caption(tmp_path) -> None:
    from esa.report.artefacts import FigureRecord, Registry, write_registry
    from esa.runner.index import _figures

    run_dir, fig_dir = tmp_path / "reports" / "r", tmp_path / "figures" / "r"
    (fig_dir / "nb1").mkdir(parents=True)
    (run_dir / "data" / "nb1").mkdir(parents=True)
    for stem in ("captioned", "bare"):
        (fig_dir / "nb1" / f"{stem}.png").write_bytes(b"\\x89PNG\\r\\n\\x1a\\n")
    rec = FigureRecord("5.1", "captioned", "Damage per group", "top-k hurts most.",
                       str(fig_dir / "nb1" / "captioned.png"), str(fig_dir / "nb1" / "captioned.pdf"))
    write_registry(run_dir / "data" / "nb1", Registry("nb1", figures=[rec]))
    page = _figures(run_dir, fig_dir, ["nb1"])
    assert "<figcaption>Figure 5.1. Damage per group top-k hurts most.</figcaption>" in page
    assert "<figcaption>bare</figcaption>" in page  # no registry entry: the file stem, as before


def test_a_table_too_large_for_a_csv_keeps_its_parquet_only(tmp_path, monkeypatch):
    """Week 1's top-k sets made a 25 MB CSV: over the cap the CSV is not written (an older one is removed),
    the parquet holds every row, the LaTeX note points at it, and the artefacts list says why no CSV."""
    big = _frame(300)
    (tmp_path / "big.csv").write_text("stale\n")
    monkeypatch.setattr(artefacts, "CSV_MAX_BYTES", 1000)
    rec = artefacts.write_table(big, tmp_path, "big")
    assert rec.csv == "" and not (tmp_path / "big.csv").exists()
    assert not list(tmp_path.glob(".big.csv.*"))  # no temporary file left behind
    assert len(pd.read_parquet(tmp_path / rec.parquet)) == 300
    assert "all rows in big.parquet" in (tmp_path / rec.tex).read_text()
    small = artefacts.write_table(_frame(3), tmp_path, "small")
    assert small.csv == "small.csv" and len(pd.read_csv(tmp_path / small.csv)) == 3
    reg = artefacts.Registry("phase2_week1_demo", tables=[rec, small])
    section = pages._artefacts_markdown(reg, tmp_path / "no.log", tmp_path, tmp_path)
    assert "big.parquet" in section and "big.csv" not in section and "no CSV: too large" in section
