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
    out = _module().main(["--tiny", "--device", "cpu", "--out", str(tmp_path / "check.json"), "--seqlen", "16",
                          "--eval-windows", "2", "--calib-windows", "2", "--k", "4"])
    rep = json.loads(Path(out).read_text())
    assert rep["tiny"] and rep["device_type"] == "cpu"
    assert [m["model"] for m in rep["models"]] == ["mixtral-small", "llama-8b"]
    for m in rep["models"]:
        assert m.get("status") != "error", m.get("traceback")
        for p in ("eval", "grad_x_weight", "sweep"):
            entry = m["passes"][p]
            assert entry["status"] == "ok" and entry["seconds"] > 0 and entry["peak_bytes"] > 0
            assert entry["estimate"]["total"] > 0
        conds = {c["group"]: c for c in m["passes"]["sweep"]["conditions"]}
        assert set(conds) == {"top_k", "random_k"} and conds["top_k"]["k"] == conds["random_k"]["k"] > 0
    moe = rep["models"][0]
    assert moe["shape"]["num_local_experts"] == 4 and moe["n_studied"] < moe["n_params"]


def test_gpu_check_refuses_full_shapes_without_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit):
        _module().main(["--out", str(tmp_path / "x.json")])
