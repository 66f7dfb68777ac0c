"""Fault cases: what a user sees when things go wrong (issue 20). Each case failed before its fix.

Killed runners and their workers, a second runner on a locked run folder, corrupt cache entries,
malformed profiles and --set values, a typo in --models, a stray kernel interrupt after a clean run,
broken model files and unknown devices. Tiny models and throwaway notebooks only.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from esa import store
from esa.dispatch import check_device
from esa.errors import EsaError
from esa.params import load_profile
from esa.runner import cli
from esa.runner.state import run_lock

REPO = Path(__file__).resolve().parents[1]


def _kernel() -> str:
    from jupyter_client.kernelspec import KernelSpecManager

    return "esa" if "esa" in KernelSpecManager().find_kernel_specs() else "python3"


KERNEL = _kernel()


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, private_cache):
    # Concurrent edits of lib/esa must not make the test notebooks stale; the cache is private (conftest.py).
    monkeypatch.setenv("ESA_CODE_HASH", "test-pinned")
    monkeypatch.delenv(store.VERIFY_ENV, raising=False)


PARAMS = """\
# %% tags=["parameters"]
profile = "smoke"
models = None
run_dir = "reports/interactive"
overrides = {}

# %%
import os, pathlib, time
root = pathlib.Path.cwd()
with open(root / "counts" / "NB.txt", "a") as fh:  # one line per execution: the kernel's PID
    fh.write(f"{os.getpid()}\\n")
"""

GATED = """
# %%
deadline = time.time() + 600  # a bound, not a wait: the test kills the run or removes the gate long before
while (root / "gate").exists() and time.time() < deadline:  # held here until the test removes the gate
    time.sleep(0.1)
"""


def make_project(root: Path, notebooks: dict[str, str], profile: dict | None = None) -> Path:
    (root / "params" / "profiles").mkdir(parents=True)
    (root / "notebooks").mkdir()
    (root / "counts").mkdir()
    (root / "params" / "profiles" / "smoke.yaml").write_text(
        yaml.safe_dump(profile or {"name": "smoke", "models": ["tiny-llama"]})
    )
    entries = [{"id": nb, "phase": 1, "week": i} for i, nb in enumerate(notebooks)]
    (root / "params" / "schedule.yaml").write_text(yaml.safe_dump({"notebooks": entries}))
    for nb, body in notebooks.items():
        (root / "notebooks" / f"{nb}.py").write_text(PARAMS.replace("NB", nb) + textwrap.dedent(body))
    return root


def run_all(root: Path, *args: str) -> int:
    before = os.environ.get("ESA_PARAMS_DIR")
    try:
        return cli.main(["--root", str(root), "--kernel", KERNEL, *args])
    finally:
        os.environ.pop("ESA_PARAMS_DIR", None) if before is None else os.environ.update(ESA_PARAMS_DIR=before)


def lines(root: Path, nb: str) -> list[str]:
    path = root / "counts" / f"{nb}.txt"
    return path.read_text().split() if path.exists() else []


def ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def alive(pid: int) -> bool:
    """Running (a zombie left for an init that does not reap counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def wait_until(cond, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, what
        time.sleep(0.1)


# ------------------------------------------------------------------------------------------- 1. killed runner


def _start_runner(root: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / "run_all.py"), "--root", str(root), "--kernel", KERNEL, *args],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "ESA_PARAMS_DIR"},
    )


@pytest.mark.parametrize(
    ("sig", "executor"),
    [(signal.SIGTERM, "process"), (signal.SIGKILL, "process"), (signal.SIGTERM, "local")],
    ids=["SIGTERM", "SIGKILL", "SIGTERM-submitit-local"],
)
def test_killing_the_runner_takes_its_worker_and_kernel_with_it(tmp_path: Path, sig: int, executor: str) -> None:
    # Only the SIGTERM run of the default executor also checks the resume; the others need one notebook.
    full = sig == signal.SIGTERM and executor == "process"
    root = make_project(tmp_path / "p", {"k1": "x = 1\n", "k2": GATED} if full else {"k2": GATED})
    (root / "gate").touch()
    run_dir = root / "reports" / "smoke"
    proc = _start_runner(root, "--executor", executor)
    kernel = worker = None
    try:
        wait_until(lambda: lines(root, "k2") or proc.poll() is not None, 300, "runner never reached k2")
        kernel = int(lines(root, "k2")[0])
        worker = ppid(kernel)  # a pool worker; with submitit, the job process under submitit's controller
        assert worker and worker != proc.pid, "the kernel is not run by a worker process"
        os.kill(proc.pid, sig)  # the runner alone, as a scheduler or `kill PID` does, not its process group
        proc.wait(timeout=60)
        # Before: the worker was orphaned and ran k2 to the end (and stamped it ok), its kernel with it.
        wait_until(lambda: not alive(worker) and not alive(kernel), 60, "worker or kernel outlived runner")
    finally:
        for pid in (kernel, worker):
            if pid and alive(pid):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read() if proc.stderr else ""
    assert not (run_dir / "state" / "k2.json").exists()
    if sig == signal.SIGKILL:
        with run_lock(run_dir):  # the kernel released the dead runner's lock
            return
    # SIGTERM is handled like Ctrl-C: the run is marked interrupted and resumes where it stopped.
    assert proc.returncode == 143 and "terminated (SIGTERM)" in err, err
    if not full:  # nothing finished in a run folder this run created: the folder and its lock are gone
        assert not run_dir.exists(), sorted(run_dir.rglob("*"))
        return
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    assert {n["notebook"]: n["status"] for n in manifest["notebooks"]}["k2"] == "interrupted"
    assert json.loads((run_dir / "state" / "k1.json").read_text())["status"] == "ok"
    (root / "gate").unlink()
    assert run_all(root) == 0
    assert len(lines(root, "k1")) == 1 and len(lines(root, "k2")) == 2


def test_second_runner_on_a_locked_run_folder_names_the_holder(tmp_path: Path, capsys) -> None:
    root = make_project(tmp_path / "p", {"k1": "x = 1\n"})
    with run_lock(root / "reports" / "smoke"):
        rc = run_all(root)
    err = capsys.readouterr().err
    assert rc == 2 and f"is in use by PID {os.getpid()}" in err and "pick another --run-id" in err, err
    errors = [line for line in err.splitlines() if line.startswith("run_all.py: error:")]
    assert len(errors) == 1 and "Traceback" not in err and lines(root, "k1") == []
    assert run_all(root) == 0  # the lock went with its holder


SIGINT_WATCH = '''
# %%
import subprocess, sys
WATCH = """
import os, pathlib, signal, time
out = pathlib.Path(os.environ["OUT"])
parent = os.getppid()
signal.signal(signal.SIGINT, lambda *a: out.open("a").write("SIGINT\\\\n"))
out.with_suffix(".ready").touch()
while os.getppid() == parent:  # lives in the kernel's process group until the kernel is gone
    time.sleep(0.05)
"""
watcher = subprocess.Popen([sys.executable, "-c", WATCH], env={**os.environ, "OUT": str(root / "sigint.txt")})
while not (root / "sigint.ready").exists():
    time.sleep(0.05)
'''


def test_a_clean_notebook_run_sends_no_interrupt_and_prints_no_error(tmp_path: Path, capfd) -> None:
    # jupyter_client interrupted every kernel (SIGINT to its process group) before shutting it down; a kernel
    # still in a handler logged "[IPKernelApp] ERROR | KeyboardInterrupt caught in kernel" after a clean run.
    root = make_project(tmp_path / "p", {"w1": SIGINT_WATCH})
    assert run_all(root) == 0
    time.sleep(1.0)  # the watcher exits once the kernel is gone; any SIGINT has been recorded by then
    err = capfd.readouterr().err
    assert not (root / "sigint.txt").exists(), "the kernel's process group was sent SIGINT at shutdown"
    assert "KeyboardInterrupt" not in err and "ERROR" not in err, err


# ------------------------------------------------------------------------------------------- 4. run_all input


def test_a_model_typo_lists_known_and_params_models(tmp_path: Path, capsys) -> None:
    root = make_project(tmp_path / "p", {"k1": "x = 1\n"})  # the table (FAULTS) has the one-line checks
    assert run_all(root, "--dry-run", "--models", "tiny-lama") == 2
    err = capsys.readouterr().err
    assert "tiny-llama" in err and "smollm2-135m" in err, err


def test_models_accepts_known_names_micro_refs_and_hub_ids(tmp_path: Path, capsys) -> None:
    root = make_project(tmp_path / "p", {"k1": "x = 1\n"})
    models = "tiny-phi3,micro-llama-33k@smoke,meta-llama/Llama-3.1-8B"
    assert run_all(root, "--dry-run", "--models", models) == 0
    assert run_all(root, "--dry-run", "--models", "micro-llama-33k@nobudget") == 2
    assert "unknown micro-suite budget 'nobudget'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- 3. profiles


def _profile(tmp_path: Path, monkeypatch, text: str) -> Path:
    (tmp_path / "params" / "profiles").mkdir(parents=True)
    path = tmp_path / "params" / "profiles" / "p.yaml"
    path.write_text(text)
    monkeypatch.setenv("ESA_PARAMS_DIR", str(tmp_path / "params"))
    return path


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("name: p\nseeds: [1, 2\ntopk: 3\n", "not valid YAML at line 3, column 5"),
        ("name: p\n  topk: 3\n", "not valid YAML at line 2, column 7: mapping values are not allowed here"),
        ('name: p\n\ntopk: "many"\n', "profile setting topk = 'many' ({path}, line 3): expected an integer"),
        ("name: p\nseqlen: -5\n", "profile setting seqlen = -5 ({path}, line 2): must be >= 2"),
        ("name: p\nmetrics: grad_x_weight\n", "metrics = 'grad_x_weight' ({path}, line 2): expected a list"),
        ("name: p\nx: !!python/object/apply:os.system [ls]\n", "YAML tag !!python/object/apply:os.system"),
        ("- a\n- b\n", "a profile is a mapping of settings"),
    ],
    ids=["unclosed-list", "bad-indent", "wrong-type", "negative-size", "scalar-for-list", "tag", "not-map"],
)
def test_bad_profile_file_names_file_line_and_key(tmp_path: Path, monkeypatch, text, needle) -> None:
    path = _profile(tmp_path, monkeypatch, text)
    with pytest.raises(EsaError) as info:
        load_profile("p")
    msg = str(info.value)
    assert str(path) in msg and needle.format(path=path) in msg and "\n" not in msg, msg


def test_profile_types_are_converted_and_every_shipped_profile_loads(tmp_path: Path, monkeypatch) -> None:
    _profile(tmp_path, monkeypatch, "name: p\nperturb_scale: 2\neval_windows: null\n")
    prof = load_profile("p", {"dose_scales": [1, 0.5]})
    assert prof.perturb_scale == 2.0 and isinstance(prof.perturb_scale, float) and prof.eval_windows is None
    assert prof.dose_scales == [1.0, 0.5]
    with pytest.raises(EsaError, match=r"batch_size = True \(from --set / overrides\): expected an integer"):
        load_profile("p", {"batch_size": True})
    monkeypatch.setenv("ESA_PARAMS_DIR", str(REPO / "params"))
    for name in ("smoke", "standard", "extended"):
        assert load_profile(name).seeds


# ------------------------------------------------------------------------------------------- 2. cache


def _entry(folder: Path) -> Path:
    """A cache entry like a score entry: safetensors, parquet, JSON; written then sealed."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({"w": torch.arange(1000, dtype=torch.float32)}, str(folder / "scores.safetensors"))
    pd.DataFrame({"param": ["a"] * 50, "score": np.arange(50.0)}).to_parquet(folder / "top.parquet")
    (folder / "meta.json").write_text(json.dumps({"metric": "grad_x_weight"}))
    store.seal(folder)
    return folder


def _truncate(path: Path, keep: int) -> None:
    with path.open("r+b") as fh:
        fh.truncate(keep)


def _flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0xFF]))


@pytest.mark.parametrize("name", ["scores.safetensors", "top.parquet", "meta.json"])
def test_truncated_cache_file_is_named_by_the_cheap_check(tmp_path: Path, name: str) -> None:
    entry = _entry(tmp_path / "cache" / "scores" / "k1")
    store.check(entry)
    _truncate(entry / name, (entry / name).stat().st_size // 2)
    with pytest.raises(store.CacheCorrupt) as info:
        store.check(entry)
    assert isinstance(info.value, EsaError) and str(entry) in str(info.value) and name in str(info.value)


@pytest.mark.parametrize("name", ["scores.safetensors", "top.parquet"])
def test_header_damage_is_caught_even_when_a_manifest_is_rewritten(tmp_path: Path, name: str) -> None:
    entry = _entry(tmp_path / "e")
    _truncate(entry / name, (entry / name).stat().st_size - 7)
    store.seal(entry)  # a manifest that agrees with the damaged size: the header check still refuses it
    with pytest.raises(store.CacheCorrupt, match=name):
        store.check(entry)


def test_changed_bytes_are_caught_on_every_read(tmp_path: Path, monkeypatch) -> None:
    entry = _entry(tmp_path / "cache" / "scores" / "k1")
    weights = entry / "scores.safetensors"
    _flip_byte(weights, weights.stat().st_size - 100)  # a byte of tensor data: sizes and headers are fine
    monkeypatch.setenv(store.VERIFY_ENV, "0")  # the old switch no longer matters: every read compares digests
    with pytest.raises(store.CacheCorrupt, match="scores.safetensors: contents differ from its manifest"):
        store.check(entry)
    bad = store.verify_cache()
    assert [(p.name, "contents differ" in why) for p, why in bad] == [("k1", True)]
    assert not entry.exists() and list((tmp_path / "cache" / "quarantine" / "scores").glob("k1.*"))


def test_version_1_manifest_is_checked_by_sha256_and_upgraded(tmp_path: Path) -> None:
    entry = _entry(tmp_path / "e")
    files = {p.name: {"size": p.stat().st_size, "sha256": store.file_sha256(p)} for p in entry.iterdir()
             if p.name != store.MANIFEST_NAME}
    store.write_json(store.manifest_path(entry), {"version": 1, "files": files})
    store.check(entry)
    upgraded = store.read_json(store.manifest_path(entry))
    assert upgraded["version"] == 2 and all(store.DIGEST in w and "sha256" in w for w in upgraded["files"].values())
    store.write_json(store.manifest_path(entry), {"version": 1, "files": files})
    _flip_byte(entry / "top.parquet", 20)
    with pytest.raises(store.CacheCorrupt, match="top.parquet: contents differ from its manifest \\(SHA-256"):
        store.check(entry)


def test_run_all_verify_cache_names_and_moves_aside_a_changed_entry(tmp_path: Path, capsys) -> None:
    root = make_project(tmp_path / "p", {"k1": "x = 1\n"})
    good = _entry(tmp_path / "cache" / "scores" / "good")
    bad = _entry(tmp_path / "cache" / "scores" / "bad")
    _flip_byte(bad / "top.parquet", 10)
    assert run_all(root, "--dry-run") == 0 and bad.exists()  # a dry run reads no entry
    assert run_all(root, "--dry-run", "--verify-cache") == 0
    err = capsys.readouterr().err
    assert f"corrupt, moved aside (it will be recomputed): {bad}: top.parquet: contents differ" in err, err
    assert "1 corrupt entry" in err and not bad.exists() and good.exists()


def test_cached_quarantines_and_rebuilds_a_bad_entry(tmp_path: Path, caplog) -> None:
    builds = []

    def build(tmp: Path) -> None:
        builds.append(tmp)
        np.save(tmp / "ids.npy", np.arange(500))
        (tmp / "complete").write_text("x\n")

    entry = tmp_path / "cache" / "tokens" / "abc"
    dead = subprocess.Popen(["true"])
    dead.wait()  # a PID that has exited: its partial entry is debris of a killed builder
    (tmp_path / "cache" / "tokens" / f".abc.partial-{dead.pid}").mkdir(parents=True)
    assert store.cached(entry, build) == entry and len(builds) == 1
    assert not (tmp_path / "cache" / "tokens" / f".abc.partial-{dead.pid}").exists()
    assert store.cached(entry, build) == entry and len(builds) == 1  # a hit: not rebuilt
    _truncate(entry / "ids.npy", 300)
    with caplog.at_level("WARNING", logger="esa.store"):
        store.cached(entry, build)
    assert len(builds) == 2 and np.load(entry / "ids.npy").shape == (500,)
    assert f"cache entry {entry} is corrupt" in caplog.text and "ids.npy" in caplog.text
    assert list((tmp_path / "cache" / "quarantine" / "tokens").glob("abc.*"))
    store.cached(entry, build, refresh=True)  # --no-cache: rewrite the entry
    assert len(builds) == 3
    assert not list(entry.parent.glob(".abc.partial-*"))


@pytest.mark.parametrize("into", [False, True], ids=["replace", "into"])
def test_atomic_folder_moves_only_a_finished_stage_and_removes_dead_ones(tmp_path: Path, into: bool) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "kept").write_text("earlier")
    dead = subprocess.Popen(["true"])
    dead.wait()
    where, prefix = (out, store.PARTIAL) if into else (tmp_path, f".out{store.PARTIAL}")
    debris = where / f"{prefix}{dead.pid}"
    debris.mkdir()  # a killed writer's staging folder
    with pytest.raises(RuntimeError), store.atomic_folder(out, into=into) as stage:
        assert stage == where / f"{prefix}{os.getpid()}" and not debris.exists()
        (stage / "new").write_text("half")
        raise RuntimeError("killed mid-run")
    assert sorted(p.name for p in out.iterdir()) == ["kept"] and not stage.exists()  # as it was
    with store.atomic_folder(out, into=into) as stage:
        (stage / "new").write_text("done")
    assert sorted(p.name for p in out.iterdir()) == (["kept", "new"] if into else ["new"]) and not stage.exists()


def test_cached_file_entry_and_legacy_adoption(tmp_path: Path) -> None:
    path = tmp_path / "cache" / "tokens" / "k.npy"
    store.cached(path, lambda tmp: np.save(tmp, np.arange(10)), folder=False)
    assert store.manifest_path(path).is_file() and np.load(path).tolist() == list(range(10))
    _truncate(path, 100)
    store.cached(path, lambda tmp: np.save(tmp, np.arange(10)), folder=False)
    assert np.load(path).tolist() == list(range(10))
    # An entry written before manifests existed: adopted (and sealed) when its marker and headers are whole.
    old = _entry(tmp_path / "cache" / "scores" / "old")
    store.manifest_path(old).unlink()
    (old / "complete").write_text("k\n")
    with pytest.raises(store.CacheCorrupt, match="no manifest"):
        store.check(old)
    store.check(old, adopt="complete")
    assert store.manifest_path(old).is_file()
    store.manifest_path(old).unlink()
    _truncate(old / "top.parquet", 100)
    assert not store.usable(old, adopt="complete") and not old.exists()  # quarantined, not adopted


def test_dequantised_model_cache_is_checked_and_rebuilt(tmp_path: Path, monkeypatch, caplog) -> None:
    from esa.models import loader, tiny

    builds = []

    def fake_dequantise(gguf: Path, dest: Path) -> None:  # the real one takes a minute on a real GGUF
        builds.append(gguf)
        tiny.tiny_model("tiny-llama").save_pretrained(dest, safe_serialization=True)
        tiny.tiny_tokenizer().save_pretrained(dest)
        (dest / "complete").write_text(gguf.name + "\n")

    monkeypatch.setattr(loader, "_dequantise", fake_dequantise)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(100))
    folder = loader._dequantised_folder(gguf)
    assert (folder / store.MANIFEST_NAME).is_file() and len(builds) == 1
    assert loader._dequantised_folder(gguf) == folder and len(builds) == 1
    weights = folder / "model.safetensors"
    _truncate(weights, weights.stat().st_size // 2)  # before: SafetensorError at the next load, no path
    with caplog.at_level("WARNING", logger="esa.store"):
        assert loader._dequantised_folder(gguf) == folder
    assert len(builds) == 2 and "model.safetensors" in caplog.text and str(folder) in caplog.text
    lm = loader.load(str(folder))  # loadable again
    assert lm.info.source == "local"


def test_folder_lock_names_the_holder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with store.folder_lock(out), pytest.raises(store.FolderInUse) as info:
        store.folder_lock(out, what="out dir", hint="pass --overwrite").__enter__()
    msg = str(info.value)
    assert info.value.holder["pid"] == os.getpid() and isinstance(info.value, EsaError)
    assert msg.startswith(f"out dir {out} is in use by PID {os.getpid()}") and msg.endswith(
        f"stop it (kill {os.getpid()}), or pass --overwrite"
    ), msg
    with store.folder_lock(tmp_path / "out"):  # released
        pass


# ------------------------------------------------------------------------------------------- 5. model files


def _tiny_gguf(path: Path) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("a.weight", np.arange(64, dtype=np.float32).reshape(8, 8))
    writer.add_tensor("b.weight", np.ones((4, 16), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_truncated_or_random_gguf_is_one_clear_error(tmp_path: Path) -> None:
    import esa.models

    good = _tiny_gguf(tmp_path / "good.gguf")
    data = good.read_bytes()
    cases = {
        "tensor-data-cut.gguf": (data[: len(data) - 10], f"expected {len(data)} bytes"),
        "header-cut.gguf": (data[:100], "expected a readable header: the header is cut short at byte"),
        "random.gguf": (np.random.default_rng(0).bytes(4096), "expected the GGUF magic b'GGUF' at its start"),
        "magic-then-noise.gguf": (b"GGUF" + struct.pack("<I", 3) + bytes([255]) * 40, "more than fit"),
        "empty.gguf": (b"", "0 bytes"),
    }
    for name, (content, needle) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(EsaError) as info:
            esa.models.load(str(path))
        msg = str(info.value)
        assert msg.startswith(f"not a complete GGUF file: {path}, {len(content)} bytes, expected"), msg
        assert needle in msg and "\n" not in msg, (name, msg)
    assert not list((tmp_path / "cache").rglob("*partial*")), "a failed build left a partial cache entry"


def test_incomplete_model_folder_says_what_is_missing(tmp_path: Path) -> None:
    import esa.models
    from esa.models import tiny

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EsaError, match=r"missing config\.json; weights \(model\.safetensors.*; a tokenizer"):
        esa.models.load(str(empty))
    full = tmp_path / "full"
    tiny.tiny_model("tiny-llama").save_pretrained(full, safe_serialization=True)
    tiny.tiny_tokenizer().save_pretrained(full)
    assert esa.models.load(str(full)).info.n_params > 0
    (full / "model.safetensors").rename(tmp_path / "weights.bak")
    with pytest.raises(EsaError, match=r"incomplete: missing weights .*; it holds .*config\.json"):
        esa.models.load(str(full))
    (tmp_path / "weights.bak").rename(full / "model.safetensors")
    _truncate(full / "model.safetensors", (full / "model.safetensors").stat().st_size // 2)
    with pytest.raises(EsaError, match=r"model\.safetensors is damaged: \d+ bytes, its header says \d+"):
        esa.models.load(str(full))


# ------------------------------------------------------------------------------------------- 6. devices


def test_check_device() -> None:
    assert check_device("cpu") == torch.device("cpu") and check_device("CPU") == torch.device("cpu")
    assert check_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(EsaError, match=r"unknown device 'tpu9'; accepted on this machine: cpu"):
        check_device("tpu9")
    with pytest.raises(EsaError, match="'meta' is not available; accepted on this machine: cpu"):
        check_device("meta")
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        assert check_device("cuda:0") == torch.device("cuda:0")
        with pytest.raises(EsaError, match=f"'cuda:{n}' is not available"):
            check_device(f"cuda:{n}")
    else:
        with pytest.raises(EsaError, match=r"'cuda' needs CUDA, but .*; accepted on this machine: cpu$"):
            check_device("cuda")


# ------------------------------------------------------------------------------------------- 7. the fault table
# One row per fault a user can cause or meet (README, "What happens when things go wrong"): the command, its
# exit code, a fragment of its one line, and what must not be left behind. `{t}` is the test's folder; the
# cache is `{t}/cache` (private); esa-runner writes to `{t}/out`; run_all.py runs the project `{t}/p`.
# "cache/scores" and "cache/masks" absent mean that nothing was computed before the refusal.

RUNNER = ["--model", "tiny-llama", "--seeds", "1", "--max-samples", "2", "--seqlen", "32", "--topk", "5", "--quiet"]
PRUNE = ["--prune", "magnitude", "--sparsity", "0.5"]
UNWRITABLE = "/sys/esa-test-unwritable"  # refused even to root (sysfs): chmod cannot make a folder root can't write


def _file(rel: str, data: bytes | str) -> Callable[[Path, Any], None]:
    def setup(t: Path, monkeypatch: Any) -> None:
        path = t / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return setup


def _pickle_folder(t: Path, monkeypatch: Any) -> None:
    from esa.models import tiny

    folder = t / "pickled"
    model = tiny.tiny_model("tiny-llama")
    model.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # what older checkpoints ship
    tiny.tiny_tokenizer().save_pretrained(folder)
    assert (folder / "pytorch_model.bin").is_file() and not list(folder.glob("*.safetensors"))


def _interrupt_esa_runner(t: Path, monkeypatch: Any) -> None:
    from esa.phases import command

    def ctrl_c(cmd: Any) -> Any:
        raise KeyboardInterrupt
    monkeypatch.setattr(command, "load_model", ctrl_c)


def _interrupt_run_all(t: Path, monkeypatch: Any) -> None:
    from esa.runner import executors

    def ctrl_c(*args: Any, **kw: Any) -> Any:
        raise KeyboardInterrupt
    monkeypatch.setattr(executors, "get_executor", lambda name: ctrl_c)


def _disk_full(t: Path, monkeypatch: Any) -> None:
    import errno

    from esa.phases import command

    def full(cmd: Any, lm: Any, stage: Path) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device", str(stage / "topk.parquet"))
    monkeypatch.setattr(command, "run", full)


def _disk_full_run_all(t: Path, monkeypatch: Any) -> None:
    import errno

    from esa.runner import executors

    def full(*args: Any, **kw: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device", str(t / "p" / "reports" / "smoke" / "x.ipynb"))
    monkeypatch.setattr(executors, "get_executor", lambda name: full)


def _cache_at(path: str) -> Callable[[Path, Any], None]:
    return lambda t, monkeypatch: monkeypatch.setenv("ESA_CACHE_DIR", path)


@dataclass(frozen=True)
class Case:
    tool: str  # "esa-runner" (in-process esa.cli.main) or "run_all" (esa.runner.cli.main on {t}/p)
    args: list[str]
    rc: int
    fragment: str
    absent: tuple[str, ...] = ()  # paths under {t} that must not exist afterwards
    setup: Callable[[Path, Any], None] | None = None


FAULTS: dict[str, Case] = {
    # refuse before the work: every output target checked with the flags
    "export-exists": Case("esa-runner", [*PRUNE, "--export-pruned", "{t}/exists", "--out-dir", "{t}/out"], 2,
                          "--export-pruned {t}/exists exists; give a new folder", ("out", "cache/masks", "cache/scores"),
                          _file("exists", "x")),
    "export-under-a-file": Case("esa-runner", [*PRUNE, "--export-pruned", "{t}/afile/model", "--out-dir", "{t}/out"], 2,
                                "{t}/afile is a file, not a folder", ("out", "cache/masks", "cache/scores"),
                                _file("afile", "x")),
    "export-unwritable": Case("esa-runner", [*PRUNE, "--export-pruned", f"{UNWRITABLE}/m", "--out-dir", "{t}/out"], 2,
                              "cannot be created: /sys is not writable", ("out", "cache/masks", "cache/scores")),
    "cache-unwritable": Case("esa-runner", ["--no-cache", "--out-dir", "{t}/out"], 2,
                             f"the cache {UNWRITABLE} cannot be written: /sys is not writable (Permission denied)",
                             ("out",), _cache_at(UNWRITABLE)),
    "run-folder-under-a-file": Case("run_all", [], 2, "the run folder {t}/p/reports/smoke cannot be written: "
                                    "{t}/p/reports is a file, not a folder", ("p/figures/smoke",), _file("p/reports", "x")),
    "out-dir-under-a-file": Case("esa-runner", ["--out-dir", "{t}/afile/out"], 2, "lies under {t}/afile, which is a file",
                                 ("cache/scores",), _file("afile", "x")),
    # Ctrl-C: exit 130, one line, no folder this run created
    "ctrl-c-esa-runner": Case("esa-runner", ["--out-dir", "{t}/out"], 130,
                              "interrupted (Ctrl-C): nothing of this run was kept", ("out",), _interrupt_esa_runner),
    "ctrl-c-run-all": Case("run_all", [], 130, "run_all.py: interrupted; completed notebooks are kept",
                           ("p/reports/smoke", "p/figures/smoke"), _interrupt_run_all),
    "disk-full-run-all": Case("run_all", [], 1, "run_all.py: error: No space left on device: "
                              "{t}/p/reports/smoke/x.ipynb; completed notebooks are kept", (), _disk_full_run_all),
    "disk-full": Case("esa-runner", ["--out-dir", "{t}/out"], 1, "esa-runner: error: No space left on device: "
                      "{t}/out/.partial-", ("out",), _disk_full),
    # files a user gives
    "pickle-only-model": Case("esa-runner", ["--model", "{t}/pickled", "--out-dir", "{t}/out"], 2,
                              "holds its weights only as pickles (pytorch_model.bin)", ("out", "cache/scores"),
                              _pickle_folder),
    "empty-profile": Case("esa-runner", ["--profile", "{t}/empty.yaml", "--out-dir", "{t}/out"], 2,
                          "profile file {t}/empty.yaml is empty", ("out",), _file("empty.yaml", "")),
    "profile-duplicate-seeds": Case("esa-runner", ["--profile", "{t}/dup.yaml", "--out-dir", "{t}/out"], 2,
                                    "seeds = [1337, 1337] ({t}/dup.yaml, line 2): has duplicates", ("out",),
                                    _file("dup.yaml", "name: dup\nseeds: [1337, 1337]\n")),
    "corpus-nul-bytes": Case("esa-runner", ["--corpus", "{t}/random.bin", "--out-dir", "{t}/out"], 2,
                             "corpus file {t}/random.bin is not text: a NUL byte at offset 3", ("out", "cache/tokens"),
                             _file("random.bin", b"abc\x00" + bytes(range(256)) * 40)),
    "corpus-not-utf8": Case("esa-runner", ["--corpus", "{t}/latin1.txt", "--out-dir", "{t}/out"], 2,
                            "is not UTF-8 text: byte 0xe9 at offset 3", ("out", "cache/tokens"),
                            _file("latin1.txt", "caf\u00e9 au lait\n".encode("latin-1") * 50)),
    "flips-above-the-bits": Case("esa-runner", ["--attack", "bfa", "--flips", "1000000000000", "--out-dir", "{t}/out"],
                                 2, "--flips 1000000000000 is more than the", ("out", "cache/scores")),
    # names stay inside their folders
    "profile-traversal": Case("esa-runner", ["--profile", "../../../../tmp/trav", "--out-dir", "{t}/out"], 2,
                              "profile '../../../../tmp/trav': give a profile name", ("out",)),
    "run-id-traversal": Case("run_all", ["--dry-run", "--run-id", "../../x"], 2,
                             "--run-id '../../x' is not a plain name", ("x", "p/reports")),
    "run-id-hidden": Case("run_all", ["--run-id", ".hidden"], 2, "--run-id '.hidden' is not a plain name",
                          ("p/reports/.hidden",)),
    # values that had no effect or made no sense
    "timeout-negative": Case("run_all", ["--timeout", "-5"], 2, "--timeout must be a number of seconds > 0, got -5",
                             ("p/reports",)),
    "timeout-zero": Case("run_all", ["--dry-run", "--timeout", "0"], 2, "--timeout must be a number of seconds > 0"),
    "models-typo": Case("run_all", ["--dry-run", "--models", "tiny-lama"], 2, "unknown model 'tiny-lama'; accepted: "),
    "set-wrong-type": Case("run_all", ["--dry-run", "--set", "eval_windows=abc"], 2,
                           "eval_windows = 'abc' (from --set / overrides): expected an integer"),
    "set-zero-size": Case("run_all", ["--dry-run", "--set", "topk=0"], 2, "topk = 0 (from --set / overrides): must be >= 1"),
    "set-negative-seed": Case("run_all", ["--dry-run", "--set", "seeds=[-1]"], 2,
                              "seed -1 is not accepted; seeds are integers 0 .. 4294967295"),
    "set-duplicate-seeds": Case("run_all", ["--dry-run", "--set", "seeds=[5, 5]"], 2, "seeds = [5, 5] (from --set / "
                                "overrides): has duplicates"),
    "set-malformed-yaml": Case("run_all", ["--dry-run", "--set", "seeds=[1, 2"], 2,
                               "--set seeds=[1, 2: not valid YAML at line 1, column 6"),
    "set-python-tag": Case("run_all", ["--dry-run", "--set", "x=!!python/object:os.system ls"], 2,
                           "the YAML tag !!python/object:os.system at line 1"),
    # --dry-run is general: it prints the plan and loads nothing, with or without a study flag
    "dry-run-prune": Case("esa-runner", ["--dry-run", *PRUNE, "--out-dir", "{t}/out"], 0, "nothing loaded (dry run)",
                          ("out", "cache/masks", "cache/scores")),
    "dry-run-plain": Case("esa-runner", ["--dry-run", "--out-dir", "{t}/out"], 0, "nothing loaded (dry run)",
                          ("out", "cache/scores")),
}


def _fmt(text: str, t: Path) -> str:
    return text.replace("{t}", str(t))


@pytest.mark.parametrize("name", list(FAULTS))
def test_fault_table(name: str, tmp_path: Path, private_cache: Path, monkeypatch, capsys) -> None:
    from esa import cli as esa_cli

    case = FAULTS[name]
    t = tmp_path
    monkeypatch.chdir(t)
    if case.setup is not None:
        case.setup(t, monkeypatch)
    args = [_fmt(a, t) for a in case.args]
    capsys.readouterr()
    if case.tool == "esa-runner":
        rc = esa_cli.main([*RUNNER, *args])
    else:
        rc = run_all(make_project(t / "p", {"k1": "x = 1\n"}), *args)
    captured = capsys.readouterr()
    err = captured.err
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert rc == case.rc and "Traceback" not in err, (rc, err)
    if rc == 0:
        assert _fmt(case.fragment, t) in captured.out, captured.out
    else:
        assert _fmt(case.fragment, t) in last, err
    if rc == 2 or (rc != 0 and case.tool == "esa-runner"):
        assert err.count("\n") == 1, err  # one line (a refusal: before any work)
    for rel in case.absent:
        assert not (t / rel).exists(), f"{rel} was left behind"


def test_a_schedule_id_that_is_not_a_plain_name_is_refused(tmp_path: Path, capsys) -> None:
    root = make_project(tmp_path / "p", {"k1": "x = 1\n"})
    (root / "params" / "schedule.yaml").write_text(yaml.safe_dump({"notebooks": [{"id": "../k1", "phase": 1,
                                                                                  "week": 0}]}))
    assert run_all(root, "--dry-run") == 2
    err = capsys.readouterr().err
    assert "schedule entry id '../k1' is not a plain name" in err and err.count("\n") == 1, err


def test_a_profile_may_be_the_path_of_a_yaml_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("seeds: [7]\n")
    prof = load_profile(str(path))
    assert prof.name == "mine" and prof.seeds == [7]
    for bad in ("../profiles/smoke", "smoke/../smoke", str(tmp_path / "missing.yaml"), ".hidden"):
        with pytest.raises(EsaError, match="give a profile name|unknown profile"):
            load_profile(bad)
    from esa.params import model_params

    (tmp_path / "evil.yaml").write_text("ref: tiny-llama\n")
    assert model_params(f"../../../../{tmp_path}/evil").ref == f"../../../../{tmp_path}/evil"  # a path, not a file
