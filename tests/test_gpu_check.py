"""The GPU check script (tests/bench/gpu_check.py) runs end to end on CPU with --tiny shapes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "bench" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def test_gpu_check_tiny_runs_every_pass(tmp_path):
    """Every pass of the memory ledger, guarded, run and measured against its plan (CPU: the allocator trace)."""
    mod = _module()
    out = mod.main(["--tiny", "--device", "cpu", "--out", str(tmp_path / "check.json"), "--seqlen", "16"])
    rep = json.loads(Path(out).read_text())
    assert rep["tiny"] and rep["device_type"] == "cpu"
    (lay,) = rep["layouts"]
    assert lay["model"] == "llama-8b" and lay["devices"] == ["cpu"]
    by = {p["pass"]: p for p in lay["passes"]}
    assert list(by) == list(mod.ledger().PASSES)
    for name, p in by.items():
        assert p["status"] == "ok", (name, p.get("error"), p.get("traceback"))
        assert p["measured"]["cpu"] > 0 and p["plan"]["cpu"] > 0 and p["ratio"]["cpu"] > 0


def test_gpu_check_splits_layers_over_two_devices():
    mod = _module()
    model = mod.build(mod.TINY_SHAPES["llama-8b"], __import__("torch").device("cpu"), __import__("torch").float32)
    dmap = mod.split_map(model, ["cuda:0", "cuda:1"])
    assert dmap["model.layers.0"] == "cuda:0" and dmap["model.layers.1"] == "cuda:1"
    assert dmap["model.embed_tokens"] == "cuda:0" and dmap["lm_head"] == "cuda:1"
    assert {n for n, _ in model.named_children()} <= {"model", "lm_head"}


def test_gpu_check_refuses_full_shapes_without_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit):
        _module().main(["--out", str(tmp_path / "x.json")])
