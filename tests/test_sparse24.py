"""The 2:4 export (compressed-tensors' sparse-24-bitmask layout): the tensors round-trip bit-exactly, an
independent reader (compressed-tensors' own decompressor) agrees, a 2:4-pruned tiny model loads back from
the compressed folder and scores identically to the pruned dense model; a non-2:4 mask is refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from esa.apps.pruning import PruneSpec, export_pruned, prune
from esa.apps.pruning.masks import applied
from esa.apps.pruning.sparse24 import FOLDER, FORMAT, compress, decompress, load_state
from esa.data import calibration, evaluation
from esa.errors import EsaError
from esa.evaluate import evaluate
from esa.models import load
from esa.zeroshot import build_next_line, score_next_line


def _two_of_four(rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    keep_idx = torch.rand(rows, cols // 4, 4, generator=g).argsort(-1)[..., :2]
    keep = torch.zeros(rows, cols // 4, 4, dtype=torch.bool).scatter_(-1, keep_idx, True).view(rows, cols)
    return w * keep, ~keep


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compress_round_trips_bit_exactly(dtype):
    w, pruned = _two_of_four(12, 40)
    w = w.to(dtype)
    t = compress(w, pruned)
    assert t["compressed"].shape == (12, 20) and t["compressed"].dtype == dtype
    assert t["bitmask"].shape == (12, 5) and t["bitmask"].dtype == torch.uint8
    assert t["shape"].flatten().tolist() == [12, 40]
    assert torch.equal(decompress(t["compressed"], t["bitmask"], t["shape"]), w)


def test_independent_reader_agrees():
    """compressed-tensors' decompressor (a test-only reference, the Makefile's REFERENCE_PKGS) reads our layout."""
    from compressed_tensors.compressors.sparse_compressors import sparse_24_bitmask as ct

    w, pruned = _two_of_four(8, 64, seed=3)
    t = compress(w, pruned)
    theirs = ct.Sparse24BitMaskTensor.from_compressed_data(t["shape"], t["compressed"], t["bitmask"]).decompress()
    assert torch.equal(theirs, w)
    mine = ct.Sparse24BitMaskTensor.from_dense(w).dict("m.weight")  # their writer, on a 2:4 matrix
    assert torch.equal(decompress(mine["m.compressed"], mine["m.bitmask"], mine["m.shape"]), w)


def test_not_two_of_four_is_refused():
    w, pruned = _two_of_four(4, 8)
    pruned[0, 0] = ~pruned[0, 0]  # a group keeping 1 or 3
    with pytest.raises(EsaError, match="exactly 2 of every 4"):
        compress(w, pruned)
    with pytest.raises(EsaError, match="multiple of 4"):
        compress(torch.zeros(2, 6), torch.zeros(2, 6, dtype=torch.bool))


def test_export_writes_a_sparse24_copy_that_scores_identically(tmp_path):
    lm = load("tiny-llama")
    calib = calibration(lm.tokenizer, "shakespeare", 32, 2, seed=0)
    res = prune(lm, PruneSpec("wanda", 0.5, pattern="2:4"), calib=calib, use_cache=False)
    folder = export_pruned(lm, res, tmp_path / "pruned")
    info = json.loads((folder / "pruning.json").read_text())["sparse24"]
    assert info["written"] and info["format"] == FORMAT and info["sparse24_bytes"] < info["dense_bytes"]
    sparse = folder / FOLDER
    cfg = json.loads((sparse / "config.json").read_text())["quantization_config"]
    assert cfg["sparsity_config"]["format"] == FORMAT and cfg["sparsity_config"]["sparsity_structure"] == "2:4"
    stored = load_file(sparse / "model.safetensors")
    assert not any(n in stored for n in res.masks.names)  # every pruned matrix is stored compressed
    # loaded back from the compressed folder alone: the same weights, the same logits, the same scores
    state = load_state(sparse)
    config = AutoConfig.from_pretrained(sparse)
    del config.quantization_config
    back = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    missing, unexpected = back.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    back.tie_weights()
    back.eval()
    ev = evaluation(lm.tokenizer, "shakespeare", 32, 3)
    task = build_next_line(n_items=6)
    with applied(lm.model, res.masks):
        for n in res.masks.names:
            assert torch.equal(back.get_parameter(n), lm.model.get_parameter(n))
        ref, ref_zs = evaluate(lm.model, ev), score_next_line(lm.model, lm.tokenizer, task, root=tmp_path)
    got, got_zs = evaluate(back, ev), score_next_line(back, lm.tokenizer, task, root=tmp_path)
    assert got.log_ppl == ref.log_ppl and got.accuracy == ref.accuracy
    assert got_zs.loglik == ref_zs.loglik and got_zs.accuracy == ref_zs.accuracy


def test_unstructured_export_has_no_sparse24_copy(tmp_path):
    lm = load("tiny-llama")
    res = prune(lm, PruneSpec("magnitude", 0.5), use_cache=False)
    folder = export_pruned(lm, res, tmp_path / "pruned")
    assert not (folder / FOLDER).exists() and "sparse24" not in json.loads((folder / "pruning.json").read_text())
