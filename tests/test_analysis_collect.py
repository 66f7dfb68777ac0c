"""End to end on tiny models: Phase 2/3 engines -> per-model measures -> scaling and architecture analyzers."""

from __future__ import annotations

from esa.analysis import architecture, scaling
from esa.params import load_profile
from esa.phases import phase4 as collect


def test_collect_feeds_both_analyzers(private_cache_shared_text):
    P = load_profile("smoke", {"seqlen": 32, "eval_windows": 2, "max_samples": 2, "seeds": [1], "topk": 4,
                               "batch_size": 2})
    measures, tables = collect.collect(["tiny-llama", "tiny-mixtral"], P)
    assert list(measures["model"]) == ["tiny-llama", "tiny-mixtral"]
    mix = measures.set_index("model").loc["tiny-mixtral"]
    assert mix["moe"] and mix["n_params_active"] < mix["n_params"]
    assert (measures["dlogppl_topk_zero"].notna()).all() and (measures["frac_selected"] > 0).all()
    assert set(tables["tiny-llama"]["seed"]) == {1}
    fits = scaling.scaling_fits(measures, ["tail_top1pct_over_median"], n_boot=50)
    assert fits["descriptive_only"].all()
    out = architecture.compare_architectures(tables, measures[["model", "family", "moe", "n_layers"]], n_perm=200)
    assert set(out["attn_ffn"]["model"]) == {"tiny-llama", "tiny-mixtral"}
    assert set(out["moe_by_kind"]["model"]) == {"tiny-mixtral"}
