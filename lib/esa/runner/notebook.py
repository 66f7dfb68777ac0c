"""One notebook: jupytext source -> unexecuted .ipynb -> papermill execution -> HTML renderings.

Following the pydoit/papermill pattern: jupytext reads the percent-format `.py`, writes an unexecuted
`.ipynb` into the run folder (never beside the paired source), papermill executes it in a fresh kernel
with an explicit kernel name and cwd, and nbconvert renders it with and without code. Every file is
written under a temporary name and renamed, so nothing half-written is ever read back.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esa.errors import EsaError
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
    if papermill wrote nothing at all, no executed copy is left.
    """
    try:
        with atomic_path(output_path) as tmp:
            failure = _papermill(notebook, input_path, tmp, parameters, kernel, cwd, timeout)
            if tmp.stat().st_size == 0:  # mkstemp's empty file: papermill never got to write
                raise _NoOutput(failure or Failure(notebook, "papermill wrote no output"))
    except _NoOutput as err:
        return err.failure
    return failure


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
    """Render the executed notebook twice: with code, and as a report without input cells."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(executed), as_version=4)
    for dest, exclude in ((with_code, False), (without_code, True)):
        exporter = HTMLExporter(
            exclude_input=exclude, exclude_input_prompt=exclude, exclude_output_prompt=exclude
        )
        body, _ = exporter.from_notebook_node(nb)
        with atomic_path(dest) as tmp:
            tmp.write_text(body, encoding="utf-8")
