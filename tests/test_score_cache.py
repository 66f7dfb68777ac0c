"""The score cache at scale: compact candidates by default, bf16 full maps on request, derived scores folded
at scoring time, bottom_k's tie draw from candidates, and clear refusals where the stored depth runs out."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from esa.data import Calibration, Windows
from esa.errors import EsaError
from esa.models import load
from esa.params import load_profile
from esa.perturb.controls import CONTROLS, ControlInput, make_control
from esa.sensitivity import engine
from esa.sensitivity.engine import score
from esa.sensitivity.metrics import MetricConfig, get_metric
from esa.sensitivity.select import (
    BottomSource,
    bottom_ties,
    compact_candidates,
    expand_candidates,
    matrix_candidates,
    select_topk,
)
from esa.stats import stability

pytestmark = pytest.mark.usefixtures("private_cache")  # tests/conftest.py


def _windows(seed: int, n: int = 4) -> Windows:
    ids = torch.randint(3, 259, (n, 24), generator=torch.Generator().manual_seed(seed))
    return Windows(ids, "random", "calib", 24, False, "byt5", 100, tuple(range(n)))


CFG = MetricConfig(batch_size=2, show_progress=False)


@pytest.mark.parametrize("ref", ["tiny-llama", "tiny-mixtral"])
def test_compact_candidates_expand_back_exactly(ref):
    lm = load(ref, device="cpu")
    scores = get_metric("grad_x_weight")(lm.model, lm.inventory, _windows(1).ids, CFG).scores
    for largest in (True, False):
        cands = matrix_candidates(scores, lm.inventory, 7, largest)
        back = expand_candidates(compact_candidates(cands), lm.inventory)
        pd.testing.assert_frame_equal(back, cands)
    assert (cands["expert"] >= 0).any() == (ref == "tiny-mixtral")


def test_entry_holds_candidates_only_by_default_and_reads_back_the_same_selections(lm_tiny):
    fresh = score(lm_tiny, "grad_squared", Calibration(seed=1), CFG, windows=_windows(1), depth=20)
    again = score(lm_tiny, "grad_squared", Calibration(seed=1), CFG, windows=_windows(1), depth=20)
    assert again.from_cache and fresh.scores is None and again.scores is None
    folder = engine.cache_dir("scores") / fresh.key
    assert not list(folder.glob("*.safetensors"))
    for mode in ("per_layer", "global"):
        pd.testing.assert_frame_equal(fresh.topk(20, mode, lm_tiny.inventory), again.topk(20, mode, lm_tiny.inventory))
        pd.testing.assert_frame_equal(fresh.bottomk(5, mode), again.bottomk(5, mode))
    pd.testing.assert_frame_equal(fresh.derived_topk("obd", 20), again.derived_topk("obd", 20))
    assert fresh.settings["depth"] == 20 and fresh.settings["full_map"] is None
    with pytest.raises(EsaError, match="needs candidates 21 deep per matrix; this entry stores 20"):
        again.topk(21)
    # the depth is part of the key: a deeper request is another entry, not a stale read
    deeper = score(lm_tiny, "grad_squared", Calibration(seed=1), CFG, windows=_windows(1), depth=40)
    assert deeper.key != fresh.key and not deeper.from_cache


def test_derived_obd_equals_the_times_w2_metric(lm_tiny):
    fisher = score(lm_tiny, "grad_squared", Calibration(seed=2), CFG, windows=_windows(2))
    direct = score(lm_tiny, "grad_squared", Calibration(seed=2), MetricConfig(batch_size=2, times_w2=True,
                                                                                show_progress=False),
                   windows=_windows(2))
    assert "obd" in fisher.derived and not direct.derived  # times_w2 already is the OBD saliency
    cols = ["param", "expert", "row", "col", "score", "rank"]
    pd.testing.assert_frame_equal(fisher.derived_topk("obd", 30)[cols], direct.topk(30)[cols])


def test_full_map_on_request_is_bf16_and_keeps_the_topk(lm_tiny):
    run = score(lm_tiny, "grad_x_weight", Calibration(seed=3), CFG, windows=_windows(3), keep_scores=True)
    path = engine.cache_dir("scores") / run.key / "scores.bf16.safetensors"
    n = sum(s.numel for s in lm_tiny.inventory)
    assert path.stat().st_size <= 2 * n + 64 * 1024  # 2 bytes a weight plus the header
    fp32 = get_metric("grad_x_weight")(lm_tiny.model, lm_tiny.inventory, _windows(3).ids, CFG).scores
    for name in fp32:
        assert run.scores[name].dtype == torch.float32
        torch.testing.assert_close(run.scores[name], fp32[name].to(torch.bfloat16).float(), rtol=0, atol=0)
    # top-k within the candidates comes from the exact fp32 candidates, whatever the map's rounding
    pd.testing.assert_frame_equal(run.topk(50, "global", lm_tiny.inventory).drop(columns=["metric", "seed"]),
                                  select_topk(fp32, lm_tiny.inventory, 50, "global").drop(columns=["metric", "seed"]))
    # deeper than the candidates: from the stored map (bf16-rounded), which a run without it refuses
    shallow = score(lm_tiny, "grad_x_weight", Calibration(seed=3), CFG, windows=_windows(3), keep_scores=True, depth=8)
    deep = shallow.topk(40, "per_layer", lm_tiny.inventory)
    assert len(deep) == 40 * len(lm_tiny.inventory)
    exact = stability.weight_set(select_topk(fp32, lm_tiny.inventory, 40, "per_layer"))
    assert len(stability.weight_set(deep) & exact) / len(exact) > 0.95


def test_recipe_full_scores_recompute_the_cached_candidates_exactly(lm_tiny, tmp_path):
    from esa.recipes import Recipe

    R = Recipe(corpus="shakespeare", seqlen=16, max_samples=2, seeds=(5,), metrics=("grad_x_weight",), batch_size=2)
    calib_windows = R.calibration(5).windows(lm_tiny.tokenizer)
    run = R.score_model(lm_tiny, "tiny-llama", ["grad_x_weight"], seeds=[5])[("grad_x_weight", 5)]
    assert run.scores is None
    full = run.full()
    pd.testing.assert_frame_equal(matrix_candidates(full, lm_tiny.inventory, engine.DEPTH_DEFAULT, True), run.top)
    assert run.full() is full  # held for the next reader, not recomputed
    cached = R.score_model(lm_tiny, "tiny-llama", ["grad_x_weight"], seeds=[5])[("grad_x_weight", 5)]
    assert cached.from_cache
    for name in full:
        assert torch.equal(cached.full()[name], full[name])
    assert calib_windows.n_windows == 2


def test_recipe_full_map_memo_goes_with_its_model():
    import gc
    import weakref

    from esa import recipes

    R = recipes.Recipe(corpus="shakespeare", seqlen=16, max_samples=2, seeds=(5,), metrics=("grad_x_weight",),
                       batch_size=2)
    lm = load("tiny-llama", device="cpu")
    run = R.score_model(lm, "tiny-llama", ["grad_x_weight"], seeds=[5])[("grad_x_weight", 5)]
    run.full()
    assert lm.model in recipes._FULL_MAPS  # held for this model's later readers ...
    model = weakref.ref(lm.model)
    others = [m for m in recipes._FULL_MAPS if m is not lm.model]  # other tests' models, kept alive here
    del lm, run  # the run's provider holds the model too
    gc.collect()
    assert model() is None and list(recipes._FULL_MAPS) == others  # ... and freed with it


def _zeroed_model(frac: float = 0.3):
    lm = load("tiny-llama", device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for s in lm.inventory:
            p = lm.model.get_parameter(s.name)
            p[torch.rand(p.shape, generator=g) < frac] = 0.0  # a quantised checkpoint's exact zeros
    return lm


@pytest.mark.parametrize("case", ["weight_zero", "weight_zero_plus_extra", "nonzero_value"])
def test_bottom_k_from_candidates_draws_the_same_ties_as_from_the_full_map(case):
    lm = _zeroed_model()
    scores = get_metric("grad_x_weight")(lm.model, lm.inventory, _windows(4).ids, CFG).scores
    scores = {n: t.clone() for n, t in scores.items()}
    if case == "weight_zero_plus_extra":  # a live weight whose score is 0 too (a dead input column)
        for t in scores.values():
            nz = torch.nonzero(t.view(-1)).flatten()[:3]
            t.view(-1)[nz] = 0.0
    if case == "nonzero_value":  # ties at a nonzero score past the depth
        for t in scores.values():
            t.add_(1.0)
            t.view(-1)[: t.numel() // 2] = 1e-3
    depth = 10
    bottom = matrix_candidates(scores, lm.inventory, depth, largest=False)
    ties = bottom_ties(scores, lm.inventory, bottom, lm.model)
    assert len(ties.groups) > 0  # the tie group runs past the stored depth in every matrix
    assert set(ties.groups["base"]) == {"none" if case == "nonzero_value" else "weight_zero"}
    if case == "weight_zero":
        assert len(ties.diff) == 0  # the tie set is exactly the zero weights: nothing stored per weight
    top = select_topk(scores, lm.inventory, 6, "per_layer")
    from esa.perturb.apply import targets_from_selection

    t = targets_from_selection(top, lm.inventory)
    full = make_control("bottom_k", ControlInput(lm.model, lm.inventory, t, seed=9, scores=scores))
    cand = make_control("bottom_k", ControlInput(lm.model, lm.inventory, t, seed=9,
                                                 bottom=BottomSource(bottom, ties, depth)))
    assert full.keys() == cand.keys()
    for name in full:
        assert torch.equal(full[name], cand[name]), name
    # a changed tie set (weights edited since scoring) is refused, not silently drawn from
    if case != "nonzero_value":
        name = lm.inventory[0].name
        with torch.no_grad():
            lm.model.get_parameter(name).view(-1)[torch.nonzero(lm.model.get_parameter(name).view(-1) == 0)[0]] = 1.0
        with pytest.raises(EsaError, match="weights changed since"):
            make_control("bottom_k", ControlInput(lm.model, lm.inventory, t, seed=9,
                                                  bottom=BottomSource(bottom, ties, depth)))


def test_bottom_k_needs_depth_and_says_how_deep():
    lm = load("tiny-llama", device="cpu")
    scores = get_metric("grad_x_weight")(lm.model, lm.inventory, _windows(4).ids, CFG).scores
    bottom = matrix_candidates(scores, lm.inventory, 4, largest=False)
    src = BottomSource(bottom, bottom_ties(scores, lm.inventory, bottom, lm.model), 4)
    from esa.perturb.apply import targets_from_selection

    t = targets_from_selection(select_topk(scores, lm.inventory, 5, "per_layer"), lm.inventory)
    with pytest.raises(EsaError, match="needs the 5 lowest scores .* stores 4"):
        CONTROLS["bottom_k"](ControlInput(lm.model, lm.inventory, t, seed=1, bottom=src))


def test_union_spearman_from_candidates_equals_the_full_map_or_is_not_estimable(lm_tiny):
    from esa.phases import phase2

    runs, full = {}, {}
    for seed in (1, 2):
        runs[("grad_x_weight", seed)] = score(lm_tiny, "grad_x_weight", Calibration(seed=seed), CFG,
                                              windows=_windows(seed), depth=4096)  # every weight
        full[seed] = get_metric("grad_x_weight")(lm_tiny.model, lm_tiny.inventory, _windows(seed).ids, CFG).scores
    table = phase2.selections(runs, 5, "per_layer", lm_tiny)
    row = phase2.stability_table(runs, table, lm_tiny).iloc[0]
    sels = {s: table[table["seed"] == s] for s in (1, 2)}
    exact = stability.rank_correlation(stability.union_scores(sels, full, lm_tiny.inventory))
    assert row["n_beyond_depth"] == 0 and row["spearman_union"] == pytest.approx(exact["mean"], abs=0)
    # shallow candidates: a union weight below another seed's depth makes the statistic not estimable
    shallow = {k: score(lm_tiny, "grad_x_weight", Calibration(seed=k[1]), CFG, windows=_windows(k[1]), depth=5)
               for k in runs}
    u = phase2.candidate_union(sels, {s: shallow[("grad_x_weight", s)].top for s in (1, 2)})
    # the merge equals the full-map look-up where a seed stored the weight, and is NaN exactly where it did not
    want = stability.union_scores(sels, full, lm_tiny.inventory)
    for s in (1, 2):
        top = shallow[("grad_x_weight", s)].top
        stored = u[stability.KEY].merge(top[stability.KEY].assign(hit=True), on=stability.KEY, how="left")["hit"]
        stored = stored.fillna(False).astype(bool).to_numpy()
        col = f"seed_{s}"
        assert np.array_equal(u[col].to_numpy()[stored], want[col].to_numpy()[stored])
        assert u[col].isna().to_numpy().tolist() == (~stored).tolist()
    row = phase2.stability_table(shallow, table, lm_tiny).iloc[0]
    assert u.isna().any().any() and np.isnan(row["spearman_union"]) and row["n_beyond_depth"] > 0
    assert "not estimable" in row["spearman_note"]


def test_old_format_entries_are_refused_with_the_rebuild_line(lm_tiny):
    run = score(lm_tiny, "grad_x_weight", Calibration(seed=1), CFG, windows=_windows(1))
    folder = engine.cache_dir("scores") / run.key
    old = folder.with_name("old")
    shutil.copytree(folder, old)
    meta = engine.read_json(old / "meta.json")
    meta.pop("format")
    engine.write_json(old / "meta.json", meta)
    with pytest.raises(EsaError, match="format 1, this code reads 2: rescore it"):
        engine.load_cached(old, lm_tiny.inventory)


def test_disk_guard_stops_before_scoring_with_the_numbers(lm_tiny, monkeypatch):
    monkeypatch.setattr(engine.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 1000))
    with pytest.raises(EsaError, match=r"need .* GiB, .* has 0.00 GiB free"):
        score(lm_tiny, "grad_x_weight", Calibration(seed=1), CFG, windows=_windows(1))
    assert not list(engine.cache_dir("scores").iterdir())  # nothing written


def test_profile_refuses_a_topk_deeper_than_the_candidates():
    with pytest.raises(EsaError, match="topk = 2000 is deeper than candidate_depth = 1000"):
        load_profile("smoke", {"topk": 2000})
    assert load_profile("smoke", {"topk": 2000, "candidate_depth": 2000}).candidate_depth == 2000


@pytest.fixture
def lm_tiny():
    return load("tiny-llama", device="cpu")


@pytest.mark.slow
def test_smollm2_entry_size_and_stored_topk_equal_fp32(tmp_path, monkeypatch):
    """On the embedded default: an entry is <= 0.05 bytes a studied weight without the map and <= 2 with it,
    and the top-k sets a researcher reads from the stored forms are the fp32 ones."""
    from esa.recipes import load_configured

    monkeypatch.delenv("ESA_CACHE_DIR")  # the model from the usual cache; the scores into this test's own
    lm = load_configured("smollm2-135m")
    monkeypatch.setenv("ESA_CACHE_DIR", str(tmp_path / "scores-only"))
    ids = torch.tensor(np.random.default_rng(0).integers(100, 40000, size=(1, 64)))
    w = Windows(ids, "random", "calib", 64, False, "smollm2", 1, (0,))
    n = sum(s.numel for s in lm.inventory)
    plain = score(lm, "grad_x_weight", Calibration(seed=1), CFG, windows=w)
    folder = engine.cache_dir("scores") / plain.key
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size / n <= 0.05, f"{size / n:.4f} bytes a weight"
    assert abs(engine.entry_bytes(lm.inventory) - size) / size < 0.25  # the disk guard's estimate
    kept = score(lm, "grad_x_weight", Calibration(seed=1), CFG, windows=w, keep_scores=True)
    kfolder = engine.cache_dir("scores") / kept.key
    ksize = sum(p.stat().st_size for p in kfolder.rglob("*") if p.is_file())
    assert ksize / n <= 2.05, f"{ksize / n:.4f} bytes a weight"
    print(f"SmolLM2 entry: {size / 2**20:.2f} MiB = {size / n:.4f} B/weight; with the bf16 map "
          f"{ksize / 2**20:.1f} MiB = {ksize / n:.3f} B/weight; estimate {engine.entry_bytes(lm.inventory) / 2**20:.2f} MiB")
    fp32 = get_metric("grad_x_weight")(lm.model, lm.inventory, ids, CFG).scores
    for k, mode in ((100, "per_layer"), (200, "per_layer"), (1000, "global")):
        want = stability.weight_set(select_topk(fp32, lm.inventory, k, mode))
        assert stability.weight_set(plain.topk(k, mode, lm.inventory)) == want
        assert stability.weight_set(kept.topk(k, mode, lm.inventory)) == want
    # the bf16 map alone, deeper than any candidates: the share of the fp32 top-k it recovers
    bf16 = {name: kept.scores[name] for name in kept.scores}
    deep = stability.weight_set(select_topk(bf16, lm.inventory, 5000, "per_layer"))
    exact = stability.weight_set(select_topk(fp32, lm.inventory, 5000, "per_layer"))
    print(f"bf16 map alone, per-matrix top-5000: {len(deep & exact) / len(exact):.5f} of the fp32 set")
    assert len(deep & exact) / len(exact) > 0.99


@pytest.mark.slow
def test_the_attention_kernel_is_part_of_the_key_and_a_recipe_loads_one_kernel(monkeypatch):
    """eager and sdpa attention give different gradients (up to 1e-4 relative on SmolLM2): an entry scored under
    one must never be read for the other, and every phase of a recipe loads the same kernel."""
    from esa.recipes import Recipe

    eager = load("tiny-llama", device="cpu")
    eager.model.set_attn_implementation("eager")
    sdpa = load("tiny-llama", device="cpu")
    sdpa.model.set_attn_implementation("sdpa")
    assert engine.attention_of(eager.model) == "eager" and engine.attention_of(sdpa.model) == "sdpa"
    a = score(eager, "grad_x_weight", Calibration(seed=1), CFG, windows=_windows(1))
    b = score(sdpa, "grad_x_weight", Calibration(seed=1), CFG, windows=_windows(1))
    assert a.key != b.key and not b.from_cache
    assert a.settings["attention"] == "eager" and b.settings["attention"] == "sdpa"
    monkeypatch.delenv("ESA_CACHE_DIR")  # SmolLM2 from the usual model cache (nothing is scored below)
    hutch = Recipe(metrics=("grad_x_weight", "hutchinson_diag"))  # a double backward no longer forces eager
    plain = Recipe(metrics=("grad_x_weight",))
    model = hutch.load("smollm2-135m").model
    assert engine.attention_of(model) == "sdpa" and engine.attention_of(plain.load("smollm2-135m").model) == "sdpa"
    assert engine.pass_attention(model, "hutchinson_diag") == "sdpa-math"  # the math kernel, around that pass only
    assert engine.pass_attention(model, "grad_x_weight") == "sdpa"
    assert engine.attention_of(plain.load("smollm2-135m", eager=True).model) == "eager"


def test_the_key_is_the_weights_content_not_the_name_and_holds_the_device_type(tmp_path):
    """The same weights reached by name and by a local folder find one entry; another device type, another
    weight value or another dtype is another entry."""
    from esa.models.loader import weights_digest
    from esa.models.tiny import tiny_tokenizer
    from esa.sensitivity.engine import score_key, settings_for

    by_name = load("tiny-llama", device="cpu")
    folder = tmp_path / "copy"
    by_name.model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    by_path = load(str(folder), device="cpu", attn_implementation=engine.attention_of(by_name.model))
    assert weights_digest(by_path.model) == weights_digest(by_name.model)
    a = score(by_name, "grad_x_weight", Calibration(seed=1), CFG, windows=_windows(1))
    b = score(by_path, "grad_x_weight", Calibration(seed=1), CFG, windows=_windows(1))
    assert not a.from_cache and b.from_cache and a.key == b.key
    assert a.settings["model"] == "tiny-llama"  # the entry keeps the first name as its label
    w = _windows(1)
    args = ("tiny-llama", w, "hutchinson_diag", 1, "float32", CFG, by_name.inventory)
    digest = weights_digest(by_name.model)
    cpu = score_key(settings_for(*args, weights_digest=digest, device_type="cpu"))
    assert cpu == score_key(settings_for("another/name", *args[1:], weights_digest=digest, device_type="cpu"))
    assert cpu != score_key(settings_for(*args, weights_digest=digest, device_type="cuda"))
    with torch.no_grad():
        next(by_path.model.parameters()).add_(1.0)  # an in-place change moves the version counter: a new digest
    assert weights_digest(by_path.model) != digest
