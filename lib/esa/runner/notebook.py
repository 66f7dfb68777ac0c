"""One notebook: jupytext source -> unexecuted .ipynb -> papermill execution -> HTML renderings.

Following the pydoit/papermill pattern: jupytext reads the percent-format `.py`, writes an unexecuted
`.ipynb` into the run folder (never beside the paired source), papermill executes it in a fresh kernel
with an explicit kernel name and cwd, and nbconvert renders it with and without code. Every file is
written under a temporary name and renamed, so nothing half-written is ever read back.

The kernel runs headless: before its first cell it calls `esa.nb.headless_kernel()` (progress bars off,
logs and Python warnings into `logs/<id>.log`), so the pages hold results only (esa.runner.pages).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esa.errors import EsaError
from esa.progress import LOG_ENV, QUIET_ENV
from esa.runner import pages
from esa.runner.layout import outputs
from esa.store import atomic_path

PARAMETERS_TAG = "parameters"


@dataclass
class Failure:
    """Where and why a notebook failed; `cell` is the 0-based index in the executed notebook."""

    notebook: str
    message: str
    cell: int | None = None
    exec_count: int | None = None
    ename: str = ""
    evalue: str = ""
    source: str = ""

    def summary(self) -> str:
        # In [n] is what the HTML shows; the index counts papermill's injected-parameters cell too.
        where = "setup (before any cell ran)"
        if self.cell is not None:
            prompt = f"In [{self.exec_count}], " if self.exec_count is not None else ""
            where = f"cell {prompt}index {self.cell} of the executed notebook"
        head = f"{self.notebook} failed in {where}"
        text = f"{self.ename}: {self.evalue}" if self.ename else self.message
        src = "\n".join("    | " + line for line in self.source.strip().splitlines()[:6])
        return f"{head}: {text}" + (f"\n  cell source:\n{src}" if src else "")

    def as_dict(self) -> dict[str, Any]:
        return {
            "message": self.message,
            "cell": self.cell,
            "exec_count": self.exec_count,
            "ename": self.ename,
            "evalue": self.evalue,
            "source": self.source,
            "summary": self.summary(),
        }


def read_source(source: Path) -> Any:
    """Read a jupytext notebook; a missing file is a clear error."""
    import jupytext

    if not source.is_file():
        raise EsaError(f"notebook source {source} does not exist (listed in schedule.yaml)")
    return jupytext.read(source)


def check_parameters_cell(nb: Any, source: Path) -> None:
    """papermill injects values after the cell tagged `parameters`; without one they would be ignored."""
    for cell in nb.cells:
        if cell.cell_type == "code" and PARAMETERS_TAG in cell.get("metadata", {}).get("tags", []):
            return
    raise EsaError(
        f"notebook {source} has no cell tagged 'parameters'; add one that starts with "
        f'`# %% tags=["parameters"]` and sets profile, models, run_dir and overrides'
    )


def write_input(source: Path, dest: Path, kernel: str) -> Path:
    """Write the unexecuted .ipynb for `source` to `dest` (atomic), with the kernel named explicitly."""
    import nbformat

    nb = read_source(source)
    check_parameters_cell(nb, source)
    nb.metadata["kernelspec"] = {"name": kernel, "display_name": kernel, "language": "python"}
    nb.metadata.setdefault("language_info", {"name": "python"})
    with atomic_path(dest) as tmp:
        nbformat.write(nb, str(tmp))
    return dest


def check_kernel(kernel: str) -> None:
    """Fail before any execution when the kernel spec is missing, saying how to install it."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    ksm = KernelSpecManager()
    try:
        ksm.get_kernel_spec(kernel)
    except NoSuchKernel:
        names = sorted(ksm.find_kernel_specs())
        raise EsaError(
            f"unknown kernel {kernel!r}; installed: {', '.join(names) or 'none'}. Install it with "
            f"`python -m ipykernel install --sys-prefix --name {kernel}` (make does this)"
        ) from None


def execute(
    notebook: str,
    input_path: Path,
    output_path: Path,
    parameters: dict[str, Any],
    kernel: str,
    cwd: Path,
    timeout: float | None = None,
) -> Failure | None:
    """Execute with papermill into `output_path` (atomic). Returns None on success, else the Failure.

    The executed copy is kept on failure too (papermill marks the failing cell), so the HTML shows it;
    if papermill wrote nothing at all, no executed copy is left. The kernel's logs go to
    `<run>/logs/<notebook>.log` (the run folder is the one holding `output_path`'s folder), new each time.
    """
    log = outputs(output_path.parent.parent, notebook).log
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("", encoding="utf-8")
    try:
        with atomic_path(output_path) as tmp, headless_environment(log):
            failure = _papermill(notebook, input_path, tmp, parameters, kernel, cwd, timeout)
            if tmp.stat().st_size == 0:  # mkstemp's empty file: papermill never got to write
                raise _NoOutput(failure or Failure(notebook, "papermill wrote no output"))
    except _NoOutput as err:
        return err.failure
    return failure


# Run in the kernel before any cell (IPython's exec_lines); a kernel without esa just skips it.
_KERNEL_SETUP = "__import__('importlib').util.find_spec('esa') and __import__('esa.nb').nb.headless_kernel()"


@contextlib.contextmanager
def headless_environment(log: Path) -> Iterator[None]:
    """The environment the kernel is started with: its log file and every progress bar off.

    The kernel inherits the worker's environment at start; restored afterwards, since a worker runs
    many notebooks.
    """
    new = {LOG_ENV: str(log.resolve()), **QUIET_ENV}
    before = {k: os.environ.get(k) for k in new}
    os.environ.update(new)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _NoOutput(Exception):
    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


def _papermill(
    notebook: str,
    input_path: Path,
    out: Path,
    parameters: dict[str, Any],
    kernel: str,
    cwd: Path,
    timeout: float | None,
) -> Failure | None:
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    # Imported with papermill (it needs jupyter_client), so planning a run stays free of Jupyter imports.
    from esa.runner.kernel import NoInterruptOnShutdown

    try:
        with warnings.catch_warnings():
            # atomic_path's temporary name ends in .tmp; papermill only warns about the extension.
            warnings.filterwarnings("ignore", message="The specified file .* does not end in one of")
            pm.execute_notebook(
                str(input_path),
                str(out),
                parameters=parameters,
                kernel_name=kernel,
                cwd=str(cwd),
                progress_bar=False,
                log_output=False,
                execution_timeout=timeout,
                kernel_manager_class=NoInterruptOnShutdown,  # no stray SIGINT after a clean run
                # the kernel app's own log (its loopback-TCP transport notice on every start) went to the
                # runner's terminal, once per notebook; its errors still do
                extra_arguments=[f"--IPKernelApp.exec_lines={_KERNEL_SETUP}", "--IPKernelApp.log_level=ERROR"],
            )
    except PapermillExecutionError as err:
        if err.ename == "KeyboardInterrupt":
            # The kernel was interrupted (kernels run in their own session, so this is an interrupt relayed
            # to it, not a crash of the notebook): an interrupted run, not a failed notebook; raising
            # discards the partial output and leaves no stamp.
            raise KeyboardInterrupt(f"{notebook} interrupted") from err
        return Failure(
            notebook=notebook,
            message=str(err),
            cell=err.cell_index,
            exec_count=err.exec_count,
            ename=err.ename,
            evalue=err.evalue,
            source=err.source or "",
        )
    except Exception as err:  # kernel died, timeout, unreadable notebook: still a named failure
        return Failure(notebook=notebook, message=f"{type(err).__name__}: {err}")
    return None


def render_html(executed: Path, with_code: Path, without_code: Path) -> None:
    """Render the executed notebook twice: with code, and as a report without input cells.

    The run folder and notebook id come from `executed`'s place (esa.runner.layout): the pages caption
    the notebook's figures and link its tables and log (esa.runner.pages).
    """
    import nbformat

    nb = nbformat.read(str(executed), as_version=4)
    nb = pages.prepare(nb, executed.stem, executed.parent.parent)
    for dest, exclude in ((with_code, False), (without_code, True)):
        body, _ = pages.exporter(exclude).from_notebook_node(nb)
        with atomic_path(dest) as tmp:
            tmp.write_text(body, encoding="utf-8")
