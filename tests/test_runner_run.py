"""run_all.py end to end on tiny throwaway notebooks (seconds each) in a temporary project folder.

Each fixture writes its own params/ (profiles, schedule) and notebooks/ under a temp root and runs the
real runner against it (`--root`), so the repository's notebooks and reports are never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nbformat
import pytest
import yaml

from esa.runner import cli, executors, schedule
from esa.runner.layout import outputs

REPO = Path(__file__).resolve().parents[1]


def _kernel() -> str:
    from jupyter_client.kernelspec import KernelSpecManager

    # The Makefile installs the 'esa' kernel spec into the venv; a bare venv still has python3.
    return "esa" if "esa" in KernelSpecManager().find_kernel_specs() else "python3"


KERNEL = _kernel()


@pytest.fixture(autouse=True)
def _pinned_code_hash(monkeypatch):
    # Other edits of lib/esa during a test (a developer saving a file) must not make its notebooks stale.
    monkeypatch.setenv("ESA_CODE_HASH", "test-pinned")


HEADER = """\
# %% [markdown]
# # {title}

# %% tags=["parameters"]
profile = "smoke"
models = None
run_dir = "reports/interactive"
overrides = {{}}

# %%
import pathlib, time
root = pathlib.Path.cwd()
with open(root / "counts" / "{id}.txt", "a") as fh:  # one line per execution
    fh.write(f"{{time.time()}}\\n")
"""


def make_project(
    root: Path, notebooks: dict[str, str], entries: list[dict], profile: dict | None = None
) -> Path:
    (root / "params" / "profiles").mkdir(parents=True)
    (root / "notebooks").mkdir()
    (root / "counts").mkdir()
    prof = {"name": "smoke", "models": ["tiny-llama"], "phase1_models": ["tiny-llama", "tiny-gptneox"]}
    (root / "params" / "profiles" / "smoke.yaml").write_text(yaml.safe_dump(profile or prof))
    (root / "params" / "profiles" / "standard.yaml").write_text(yaml.safe_dump({"name": "standard"}))
    (root / "params" / "schedule.yaml").write_text(yaml.safe_dump({"notebooks": entries}))
    for nb_id, body in notebooks.items():
        title = next(e.get("title", nb_id) for e in entries if e["id"] == nb_id)
        (root / "notebooks" / f"{nb_id}.py").write_text(
            HEADER.format(id=nb_id, title=title) + textwrap.dedent(body)
        )
    return root


def run_all(root: Path, *args: str, capsys=None) -> tuple[int, str]:
    """Call the CLI in-process; keep ESA_PARAMS_DIR (which the runner sets) from leaking into other tests."""
    before = os.environ.get("ESA_PARAMS_DIR")
    try:
        rc = cli.main(["--root", str(root), "--kernel", KERNEL, *args])
    finally:
        if before is None:
            os.environ.pop("ESA_PARAMS_DIR", None)
        else:
            os.environ["ESA_PARAMS_DIR"] = before
    err = capsys.readouterr().err if capsys else ""
    return rc, err


def count(root: Path, nb_id: str) -> int:
    path = root / "counts" / f"{nb_id}.txt"
    return len(path.read_text().splitlines()) if path.exists() else 0


# ------------------------------------------------------------------------------------------- main project

MAIN_NOTEBOOKS = {
    "fail_nb": """
        # %%
        from esa.errors import EsaError
        raise EsaError("model 'llama-3.1-8b' needs the Hugging Face hub, which is unreachable")
        """,
    "ok_nb": """
        # %%
        from PIL import Image
        from esa.report.scorecard import write_rows
        from esa.stats.verdicts import Criterion
        fig = root / "figures" / pathlib.Path(run_dir).name / "ok_nb"
        fig.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 48), (200, 30, 30)).save(fig / "red_square.png")
        write_rows(run_dir, "ok_nb", [
            Criterion("P1.good", 1, "good thing holds", 0.9, "> 0.5", True, "ok_nb table"),
            Criterion("P1.bad", 1, "bad thing holds", 0.1, "> 0.5", False, "ok_nb table"),
            Criterion("P1.none", 1, "cannot tell", None, "> 0.5", None, "ok_nb", "needs a GPU"),
        ])
        secret_code_marker = 42
        print("models are", models)
        """,
    "dep_nb": """
        # %%
        assert (pathlib.Path(run_dir) / "scorecard" / "ok_nb.json").is_file(), "ran before its dependency"
        """,
}
MAIN_ENTRIES = [
    {"id": "fail_nb", "phase": 1, "week": 0, "title": "Fails like an offline hub model", "models": "profile"},
    {"id": "ok_nb", "phase": 1, "week": 1, "title": "Works", "models": "phase1"},
    {
        "id": "dep_nb",
        "phase": 2,
        "week": 0,
        "title": "Needs ok_nb",
        "models": ["tiny-mixtral"],
        "depends_on": ["ok_nb"],
    },
]


@pytest.fixture(scope="module")
def main_project(tmp_path_factory) -> Path:
    return make_project(tmp_path_factory.mktemp("runner_main"), MAIN_NOTEBOOKS, MAIN_ENTRIES)


def test_run_reports_failures_skips_and_forces(main_project: Path, capsys) -> None:
    root = main_project
    rc, err = run_all(root, capsys=capsys)
    assert rc == 1  # one notebook failed
    # The failure names the notebook, the cell, and the notebook's own error text.
    assert "fail_nb failed in cell" in err and "needs the Hugging Face hub" in err and "EsaError" in err
    run_dir = root / "reports" / "smoke"
    for nb_id in ("ok_nb", "dep_nb", "fail_nb"):  # the others still ran
        out = outputs(run_dir, nb_id)
        assert out.executed.is_file() and out.html.is_file() and out.html_nocode.is_file()
        assert out.input.is_file()
    assert not list((root / "notebooks").glob("*.ipynb")), "executed into the notebook sources"
    ok = outputs(run_dir, "ok_nb")
    executed = nbformat.read(ok.executed, as_version=4)
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected and "tiny-gptneox" in injected[0].source and "reports/smoke" in injected[0].source
    assert (
        "secret_code_marker" in ok.html.read_text() and "secret_code_marker" not in ok.html_nocode.read_text()
    )

    index = (run_dir / "index.html").read_text()
    for needle in (
        "fail_nb",
        "ok_nb",
        "dep_nb",
        "notebooks/ok_nb.ipynb",
        "html/ok_nb.html",
        "html/ok_nb.nocode.html",
        "PASS",
        "FAIL",
        "n/a",
        "needs a GPU",
        "data:image/png;base64",
        "../../figures/smoke/ok_nb/red_square.png",
        "needs the Hugging Face hub",
    ):
        assert needle in index, needle
    assert "<script" not in index

    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert "git_commit" in manifest["environment"] and "torch" in manifest["environment"]["packages"]
    assert manifest["profile_settings"]["models"] == ["tiny-llama"]
    statuses = {n["notebook"]: n["status"] for n in manifest["notebooks"]}
    assert statuses == {"fail_nb": "failed", "ok_nb": "ok", "dep_nb": "ok"}
    assert all(n["seconds"] > 0 for n in manifest["notebooks"])

    # Rerun: the successful ones are up to date and skipped (nothing executes).
    rc, err = run_all(root, "--only", "1/1,2", capsys=capsys)
    assert rc == 0 and count(root, "ok_nb") == 1 and count(root, "dep_nb") == 1
    assert "skip (up to date)" in err

    # --force reruns what was selected, and only that.
    rc, _ = run_all(root, "--only", "ok_nb", "--force", capsys=capsys)
    assert rc == 0 and count(root, "ok_nb") == 2 and count(root, "dep_nb") == 1

    # --dry-run plans without executing: the failed notebook is due again, dep_nb is up to date.
    rc, _ = run_all(root, "--dry-run", capsys=None)
    out = capsys.readouterr().out
    assert rc == 0 and "last run failed" in out and count(root, "fail_nb") == 1

    # A different parameter (models) makes the notebook stale.
    rc, out = run_all(root, "--only", "2", "--models", "tiny-phi3", "--dry-run", capsys=capsys)
    assert rc == 0

    # generate-docs re-renders without executing.
    (run_dir / "html" / "ok_nb.html").unlink()
    rc, _ = run_all(root, "--generate-docs", "--run-id", "smoke", capsys=capsys)
    assert rc == 0 and (run_dir / "html" / "ok_nb.html").is_file() and count(root, "ok_nb") == 2


def test_fail_fast_stops(main_project: Path, capsys) -> None:
    rc, err = run_all(main_project, "--run-id", "ff", "--fail-fast", capsys=capsys)
    assert rc == 1
    run_dir = main_project / "reports" / "ff"
    assert json.loads((run_dir / "state" / "fail_nb.json").read_text())["status"] == "failed"
    assert (
        not (run_dir / "state" / "ok_nb.json").exists() and not (run_dir / "state" / "dep_nb.json").exists()
    )
    assert "--fail-fast" in err


def test_submitit_local_executor(main_project: Path, capsys) -> None:
    rc, _ = run_all(main_project, "--run-id", "sub", "--executor", "local", "--only", "2", capsys=capsys)
    assert rc == 0
    run_dir = main_project / "reports" / "sub"
    for nb_id in ("ok_nb", "dep_nb"):  # dep_nb's dependency was added and ran in an earlier array
        stamp = json.loads((run_dir / "state" / f"{nb_id}.json").read_text())
        assert stamp["status"] == "ok"
        assert outputs(run_dir, nb_id).html_nocode.is_file()
    assert (run_dir / "submitit").is_dir() and (run_dir / "index.html").is_file()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["executor"] == "local"


# ------------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bad_project(tmp_path_factory) -> Path:
    root = make_project(
        tmp_path_factory.mktemp("runner_bad"),
        {"fine": "x = 1\n"},
        [{"id": "fine", "phase": 1, "week": 0}, {"id": "noparams", "phase": 3, "week": 1}],
    )
    (root / "notebooks" / "noparams.py").write_text("# %%\nprofile = 'smoke'\n")
    return root


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--profile", "nope"], "unknown profile 'nope'; accepted: smoke, standard"),
        (["--only", "9"], "--only '9' matches no notebook; accepted: a phase (1, 3)"),
        (["--only", "1/7"], "1/0, 3/1"),
        (["--only", "nosuch"], "notebook id (fine, noparams)"),
        (["--only", "3"], "has no cell tagged 'parameters'"),
        (["--models", ","], "--models is empty"),
        (["--jobs", "0"], "--jobs must be >= 1"),
        (["--set", "nonsense_knob=3", "--only", "1"], "unknown profile setting(s) ['nonsense_knob']"),
        (["--kernel", "no-such-kernel", "--only", "1"], "unknown kernel 'no-such-kernel'"),
    ],
)
def test_bad_input_is_one_clear_error(bad_project: Path, capsys, args: list[str], needle: str) -> None:
    before = os.environ.get("ESA_PARAMS_DIR")
    try:
        rc = cli.main(["--root", str(bad_project), *args])
    finally:
        os.environ.pop("ESA_PARAMS_DIR", None) if before is None else os.environ.update(ESA_PARAMS_DIR=before)
    err = capsys.readouterr().err
    assert rc == 2 and needle in err, err
    assert not list((bad_project / "reports").glob("*/notebooks/*.ipynb")), "something was executed"


def test_slurm_plan_and_missing_cluster(bad_project: Path, capsys) -> None:
    (bad_project / "params" / "cluster.yaml").write_text(
        yaml.safe_dump({"slurm": {"partition": "big-gpu", "gpus": 2, "time_min": 30}})
    )
    rc, _ = run_all(bad_project, "--only", "1", "--executor", "slurm", "--dry-run")
    out = capsys.readouterr().out
    assert rc == 0 and "--partition=big-gpu" in out and "--gpus-per-node=2" in out and "--time=30" in out
    if shutil.which("sbatch") is None:
        rc, err = run_all(bad_project, "--only", "1", "--executor", "slurm", capsys=capsys)
        assert rc == 2 and "use --executor local" in err
    (bad_project / "params" / "cluster.yaml").write_text(yaml.safe_dump({"slurm": {"partitoin": "x"}}))
    rc, err = run_all(bad_project, "--only", "1", "--executor", "slurm", "--dry-run", capsys=capsys)
    assert rc == 2 and "unknown slurm setting(s) ['partitoin']" in err
    (bad_project / "params" / "cluster.yaml").unlink()


def test_schedule_selection_and_cycles() -> None:
    items = schedule.entries(
        [
            {"id": "a", "phase": 1, "week": 0},
            {"id": "b", "phase": 2, "week": 1, "depends_on": ["a"]},
            {"id": "c", "phase": 2, "week": 2, "depends_on": ["b"]},
            {"id": "d", "phase": 1, "week": 1},
        ]
    )
    chosen, added = schedule.select(items, ["2/2"])
    assert [e.id for e in chosen] == ["a", "b", "c"] and added == ["a", "b"]
    chosen, _ = schedule.select(items, ["1", "d"])
    assert [e.id for e in chosen] == ["a", "d"]
    chosen, added = schedule.select(items, ["2/2"], with_deps=False)  # run_all.py --no-deps
    assert [e.id for e in chosen] == ["c"] and added == []
    with pytest.raises(ValueError, match="cycle"):
        schedule.entries(
            [
                {"id": "x", "phase": 1, "week": 0, "depends_on": ["y"]},
                {"id": "y", "phase": 1, "week": 0, "depends_on": ["x"]},
            ]
        )
    with pytest.raises(ValueError, match="unknown notebook"):
        schedule.entries([{"id": "x", "phase": 1, "week": 0, "depends_on": ["zz"]}])


def test_workers_leave_gpus_to_their_tasks(monkeypatch) -> None:
    """A worker no longer pins a GPU: each task gets the GPUs its plan needs (GpuPool, tests/test_runner_gpus)."""
    import queue

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    gpus = executors.visible_gpus()
    assert gpus == ["3", "5"]
    slots: queue.Queue[int] = queue.Queue()
    for i in range(3):
        slots.put(i)
    for _ in range(3):
        executors._pin_worker(slots, gpus)
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "3,5"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert executors.visible_gpus() == []


def test_cpu_workers_share_the_cores_and_a_users_setting_wins(monkeypatch) -> None:
    import queue

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(8)), raising=False)
    assert [executors.cpu_threads_per_worker(j) for j in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
    slots: queue.Queue[int] = queue.Queue()
    slots.put(0)
    slots.put(1)
    for var in executors.THREAD_VARS:
        monkeypatch.delenv(var, raising=False)
    executors._pin_worker(slots, [], threads=4)
    assert all(os.environ[v] == "4" for v in executors.THREAD_VARS)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's own choice is kept
    executors._pin_worker(slots, [], threads=1)
    assert os.environ["OMP_NUM_THREADS"] == "3"


# ------------------------------------------------------------------------------------------- --jobs 2

TIMED = """
    # %%
    import json
    t0 = time.time()
    time.sleep(2.5)
    (root / "counts" / "{id}.json").write_text(json.dumps({{"start": t0, "end": time.time()}}))
    """


def test_jobs_run_in_parallel_respecting_dependencies(tmp_path: Path, capsys) -> None:
    root = make_project(
        tmp_path,
        {"p1": TIMED.format(id="p1"), "p2": TIMED.format(id="p2"), "p3": TIMED.format(id="p3")},
        [
            {"id": "p1", "phase": 1, "week": 0},
            {"id": "p2", "phase": 1, "week": 1},
            {"id": "p3", "phase": 2, "week": 0, "depends_on": ["p1", "p2"]},
        ],
    )
    rc, _ = run_all(root, "--jobs", "2", capsys=capsys)
    assert rc == 0
    t = {k: json.loads((root / "counts" / f"{k}.json").read_text()) for k in ("p1", "p2", "p3")}
    assert t["p1"]["start"] < t["p2"]["end"] and t["p2"]["start"] < t["p1"]["end"], (
        "p1 and p2 did not overlap"
    )
    assert t["p3"]["start"] >= max(t["p1"]["end"], t["p2"]["end"]), "p3 started before its dependencies ended"


# ------------------------------------------------------------------------------------------- resume after kill

GATED = """
    # %%
    gate = root / "gate"
    deadline = time.time() + 90
    while gate.exists() and time.time() < deadline:  # hold here until the test removes the gate
        time.sleep(0.1)
    """


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_resume_after_kill(tmp_path: Path, capsys, sig: int) -> None:
    root = make_project(
        tmp_path,
        {"k1": "x = 1\n", "k2": GATED, "k3": "x = 3\n"},
        [
            {"id": "k1", "phase": 1, "week": 0},
            {"id": "k2", "phase": 1, "week": 1},
            {"id": "k3", "phase": 1, "week": 2},
        ],
    )
    (root / "gate").touch()
    run_dir = root / "reports" / "smoke"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "run_all.py"), "--root", str(root), "--kernel", KERNEL],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={k: v for k, v in os.environ.items() if k != "ESA_PARAMS_DIR"},
        # A suite started as `cmd &` from a non-interactive shell runs with SIGINT ignored (POSIX), and an
        # ignored signal survives exec: give the runner a terminal's default disposition, as at a prompt.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.time() + 90
        while count(root, "k2") == 0:  # k1 has completed and k2 is executing
            assert time.time() < deadline and proc.poll() is None, "runner never reached k2"
            time.sleep(0.2)
        time.sleep(0.5)
        os.killpg(proc.pid, sig)  # the whole process group: runner and its worker processes
        proc.wait(timeout=120)  # a liveness bound: kernel shutdown is slow on a loaded machine
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert json.loads((run_dir / "state" / "k1.json").read_text())["status"] == "ok"
    assert not (run_dir / "state" / "k2.json").exists() and not outputs(run_dir, "k2").executed.exists()
    if sig == signal.SIGKILL:  # nobody could clean up: papermill's in-progress file is still there
        assert list(run_dir.rglob(".*.tmp")), "expected papermill's in-progress file under its temporary name"

    (root / "gate").unlink()
    rc, err = run_all(root, capsys=capsys)
    assert rc == 0
    assert count(root, "k1") == 1, "a completed notebook was recomputed"
    assert count(root, "k2") == 2 and count(root, "k3") == 1
    assert not list(run_dir.rglob(".*.tmp"))
    if sig == signal.SIGKILL:
        assert "removed partial file" in err
    for nb_id in ("k1", "k2", "k3"):
        nbformat.read(outputs(run_dir, nb_id).executed, as_version=4)  # complete, parseable


def test_kernel_interrupt_is_an_interrupted_run_not_a_failure(tmp_path: Path, capsys) -> None:
    # Ctrl-C signals the kernel too; if its KeyboardInterrupt reaches papermill before the runner's own,
    # the run must still end as interrupted: no failed stamp, no executed copy, resumable.
    root = make_project(
        tmp_path,
        {"i1": "x = 1\n", "i2": "raise KeyboardInterrupt\n"},
        [{"id": "i1", "phase": 1, "week": 0}, {"id": "i2", "phase": 1, "week": 1}],
    )
    run_dir = root / "reports" / "smoke"
    rc, err = run_all(root, capsys=capsys)
    assert rc == 130 and "interrupted" in err
    assert json.loads((run_dir / "state" / "i1.json").read_text())["status"] == "ok"
    assert not (run_dir / "state" / "i2.json").exists() and not outputs(run_dir, "i2").executed.exists()
    assert not list(run_dir.rglob(".*.tmp"))


def test_cpu_share_follows_the_running_notebooks(monkeypatch, tmp_path) -> None:
    """With --jobs on CPU the runner writes cores // running to the share file; kernels' loops follow it, so the
    last notebook running gets every core. Off with GPUs, with --jobs 1 and under a user's OMP_NUM_THREADS."""
    import torch

    from esa import progress

    for var in executors.THREAD_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(4)), raising=False)
    assert executors.CpuShare(tmp_path, 1, []).path is None
    assert executors.CpuShare(tmp_path, 2, ["0"]).path is None
    share = executors.CpuShare(tmp_path, 2, [])
    assert share.path == tmp_path / "state" / "cpu-share"
    monkeypatch.setenv(progress.CPU_SHARE_ENV, str(share.path))
    before = torch.get_num_threads()
    try:
        share.update(2)
        assert share.path.read_text() == "2\n"
        progress._share_read_at[0] = 0.0
        assert list(progress.progress(range(3), disable=True)) == [0, 1, 2]  # a loop follows the share
        assert torch.get_num_threads() == 2
        share.update(1)
        progress.follow_cpu_share(interval_s=0.0)
        assert share.path.read_text() == "4\n" and torch.get_num_threads() == 4
        share.update(7)
        assert share.path.read_text() == "1\n"
        share.close()
        assert not share.path.exists() and progress.CPU_SHARE_ENV not in os.environ
        progress.follow_cpu_share(interval_s=0.0)  # nothing to follow: unchanged, no error
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert executors.CpuShare(tmp_path, 2, []).path is None


def test_manifest_states_tf32_when_a_gpu_ran(monkeypatch):
    from esa.runner import manifest

    monkeypatch.setattr(manifest, "gpus", lambda: ["GPU 0: NVIDIA H100 80GB HBM3"])
    env = manifest.environment()
    assert env["gpus"] and "off for matmuls" in env["tf32"] and "full fp32" in env["tf32"]
    monkeypatch.setattr(manifest, "gpus", lambda: [])
    assert manifest.environment()["tf32"] is None
