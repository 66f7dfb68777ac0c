"""Interpretability of critical weights (issue 19): role catalogue, chain trace, sinks, probes, localisation.

Tiny random models with a planted massive activation, where the right answer is known: layer 0's
down_proj[5, 10] is set to 300, so residual channel 5 spikes after block 0 (about 100x the median
channel), and layer 1's input norm weight of channel 5 is set to 1000, so the q/k/v projections of block 1
read a massive input column 5.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from esa.apps.interpret import anatomy as anat_mod
from esa.apps.interpret import localise, probes, roles, sinks
from esa.apps.interpret.chain import trace_chain
from esa.apps.interpret.correlation import spearman_ci
from esa.apps.interpret.passes import Capture
from esa.apps.interpret.tokens import sink_mask, stopword_ids
from esa.errors import EsaError
from esa.models import load
from esa.perturb.apply import weights_hash
from esa.sensitivity.metrics import MetricConfig
from esa.stats.inference import holm

DOWN0 = "model.layers.0.mlp.down_proj.weight"
Q1 = "model.layers.1.self_attn.q_proj.weight"
FAST = roles.RoleConfig(n_boot=300, show_progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _planted(name: str = "tiny-llama", attn: str | None = None):
    lm = load(name, attn_implementation=attn)
    with torch.no_grad():
        lm.model.get_parameter(DOWN0)[5, 10] = 300.0
        lm.model.get_submodule("model.layers.1.input_layernorm").weight[5] = 1000.0
    return lm


@pytest.fixture(scope="module")
def lm():
    return _planted()


@pytest.fixture(scope="module")
def inputs() -> torch.Tensor:
    return torch.randint(3, 259, (12, 16), generator=torch.Generator().manual_seed(0))


def _sel(*rows: tuple[str, int, int, str]) -> pd.DataFrame:
    return pd.DataFrame([{"param": p, "row": r, "col": c, "metric": m} for p, r, c, m in rows])


@pytest.fixture(scope="module")
def report(lm, inputs):
    sel = _sel((DOWN0, 5, 10, "planted"), (DOWN0, 7, 33, "random"), (Q1, 3, 5, "planted"), (Q1, 3, 6, "random"))
    h0 = weights_hash(lm.model)
    rep = roles.run_roles(lm.model, lm.tokenizer, lm.inventory, sel, inputs, cfg=FAST)
    assert weights_hash(lm.model) == h0  # every ablation restored bit-exactly
    return rep


def _row(rep: roles.RoleReport, param: str, row: int, col: int, role: str) -> pd.Series:
    t = rep.tests
    return t[(t["param"] == param) & (t["row"] == row) & (t["col"] == col) & (t["role"] == role)].iloc[0]


# ------------------------------------------------------------------ the catalogue
def test_catalogue_has_the_seven_roles_each_with_a_hypothesis():
    assert list(roles.ROLES) == ["creates_massive", "feeds_sink", "suppresses_stopwords", "bias_like",
                                 "reads_massive", "first_token", "unexplained"]
    cat = roles.catalogue()
    assert cat["hypothesis"].str.len().min() > 20 and cat["captures"].str.len().min() > 5
    assert set(cat.loc[cat["passes_per_weight"] == 2, "role"]) == {"creates_massive", "feeds_sink",
                                                                     "suppresses_stopwords"}


def test_unknown_role_is_one_clear_error():
    with pytest.raises(EsaError, match=r"unknown role 'superweight'.*accepted: .*creates_massive"):
        roles.parse_roles("creates_massive,superweight")


def test_planted_weight_creates_the_massive_activation_and_a_random_one_does_not(report):
    planted = _row(report, DOWN0, 5, 10, "creates_massive")
    assert planted["verdict"] == "pass"
    assert planted["effect"] > 10 and planted["ci_lo"] > 10  # zeroing it shrinks channel 5's peak > 10x
    assert abs(planted["control_effect"] - 1) < 0.05  # the matched random weight barely moves it
    assert planted["p_holm"] < 0.05
    rand = _row(report, DOWN0, 7, 33, "creates_massive")
    assert rand["verdict"] == "not applicable"  # channel 7 is not massive: nothing to create
    downstream = _row(report, Q1, 3, 6, "creates_massive")  # a q weight of block 1 does not create channel 5
    assert downstream["verdict"] != "pass"
    w = report.weights.set_index(["param", "row", "col"])
    assert w.loc[(DOWN0, 5, 10), "explained"] and "creates_massive" in w.loc[(DOWN0, 5, 10), "roles"]


def test_reads_massive_for_the_planted_column_only(report):
    assert _row(report, Q1, 3, 5, "reads_massive")["verdict"] == "pass"
    assert _row(report, Q1, 3, 5, "reads_massive")["effect"] > 100
    for r, c in ((3, 6), (7, 33)):
        param = Q1 if r == 3 else DOWN0
        assert _row(report, param, r, c, "reads_massive")["verdict"] == "fail"


def test_holm_is_applied_across_the_whole_catalogue(report):
    t = report.tests
    finite = t["p"].notna()
    assert finite.sum() >= 10
    assert np.allclose(t.loc[finite, "p_holm"], holm(t.loc[finite, "p"].to_numpy()))
    decided = t["verdict"].isin(["pass", "fail"])
    assert ((t.loc[decided, "p_holm"] < FAST.alpha) == (t.loc[decided, "verdict"] == "pass")).all()
    # a p that passes alone can fail after the correction: the correction is real, not cosmetic
    assert (t.loc[finite, "p_holm"] >= t.loc[finite, "p"]).all()


def test_summaries_criterion_table_and_wide_layout(report):
    c = roles.criterion(report)
    assert c["n"] == 4 and 0 < c["share"] < 1 and c["ci_lo"] < c["share"] < c["ci_hi"]
    planted = roles.criterion(report, "planted")
    assert planted["n"] == 2 and planted["explained"] == 2
    ablation_only = roles.criterion(report, "planted", roles=["creates_massive", "feeds_sink", "suppresses_stopwords"])
    assert ablation_only["explained"] == 1  # the q weight is explained by reads_massive, a baseline-only role
    with pytest.raises(EsaError, match="unknown metric"):
        roles.criterion(report, "nope")
    tab = roles.role_metric_table(report)
    assert set(tab.columns) == {"planted", "random", "all"} and tab.loc["creates_massive", "planted"] == 0.5
    assert tab.loc["unexplained", "random"] == 1.0
    wide = roles.wide_table(report)
    assert len(wide) == 4 and {"creates_massive_effect", "creates_massive_p_holm", "first_token_verdict"} <= set(wide)


def test_heads_table_lists_every_later_head(report, lm):
    heads = report.heads
    one = heads[(heads["param"] == DOWN0) & (heads["row"] == 5)]
    assert set(one["layer"]) == {1} and len(one) == lm.model.config.num_attention_heads


# ------------------------------------------------------------------ statistics of a role, on known evidence
def _evidence(x_weight: np.ndarray, x_control: np.ndarray) -> roles.Evidence:
    """Evidence whose baseline input columns are given (n, T): col 0 = the weight's, col 1 = the control's."""
    spec = roles.WeightSpec("m.layers.0.mlp.down_proj.weight", 0, "down", "mlp", (4, 8))
    w = roles.WeightRef(spec.name, -1, 0, 0, 0, 0, spec)
    c = roles.WeightRef(spec.name, -1, 1, 1, 9, 0, spec)
    x = torch.tensor(np.stack([x_weight, x_control], -1), dtype=torch.float32)  # (n, T, 2)
    base = Capture(inputs={spec.module: x}, input_median_peak={spec.module: torch.ones(x.shape[0])})
    anat = anat_mod.Anatomy(("m.layers.0",), ("m.layers.0.self_attn",), "lm_head", "eager", 2, 2, 2, 4)
    return roles.Evidence(w, c, base, None, None, anat, FAST, x.shape[1], {(spec.module, 0): 0, (spec.module, 1): 1})


def test_bias_like_and_first_token_on_constructed_inputs():
    rng = np.random.default_rng(0)
    const = 2.0 + 0.01 * rng.standard_normal((10, 16))
    noise = rng.standard_normal((10, 16))
    res = roles._test(roles.ROLES["bias_like"], roles._bias_like(_evidence(const, noise)), FAST)
    assert res["p"] < 0.01 and res["effect"] > 50 and res["control_effect"] < 5
    res = roles._test(roles.ROLES["bias_like"], roles._bias_like(_evidence(noise, const)), FAST)
    assert res["p"] > 0.5  # reversed: the weight is the noisy one
    spike = 0.1 * rng.standard_normal((10, 16))
    spike[:, 0] = 50.0
    res = roles._test(roles.ROLES["first_token"], roles._first_token(_evidence(spike, noise)), FAST)
    assert res["p"] < 0.01 and res["effect"] > 0.8
    # against the uniform floor 1/T as well: a flat column is not first-token handling even if the control is lower
    flat = np.ones((10, 16))
    lower = np.ones((10, 16))
    lower[:, 0] = 0.5
    res = roles._test(roles.ROLES["first_token"], roles._first_token(_evidence(flat, lower)), FAST)
    assert res["p"] == 1.0 and math.isclose(res["effect"], 1 / 16)


def test_too_few_usable_inputs_is_not_estimable():
    m = roles.Measure(np.array([1.0, np.nan, np.inf, 2.0, 3.0, 4.0, 5.0]), np.zeros(7))
    res = roles._test(roles.ROLES["feeds_sink"], m, FAST)
    assert math.isnan(res["p"]) and "not estimable" in res["note"] and res["n_inputs"] == 5


def test_a_weight_that_is_already_zero_is_not_estimable(lm, inputs):
    with torch.no_grad():
        p = lm.model.get_parameter(DOWN0)
        old = p[9, 9].clone()
        p[9, 9] = 0.0
    try:
        rep = roles.run_roles(lm.model, lm.tokenizer, lm.inventory, _sel((DOWN0, 9, 9, "m")), inputs,
                              roles=["creates_massive", "suppresses_stopwords", "first_token"], cfg=FAST)
    finally:
        with torch.no_grad():
            p[9, 9] = old
    v = rep.tests.set_index("role")["verdict"]
    assert v["suppresses_stopwords"] == "not estimable"
    assert v["creates_massive"] == "not applicable"  # its premise (a massive channel 9) is checked first
    assert v["first_token"] in ("pass", "fail")  # baseline-only roles still run
    assert rep.timing["forward_passes"] == 1  # no ablation pass was wasted on a no-op


def test_no_ablation_pass_for_a_role_whose_premise_fails(lm, inputs):
    # channel 7 is not massive after block 0: role (a) does not apply and no pass is spent on it
    rep = roles.run_roles(lm.model, lm.tokenizer, lm.inventory, _sel((DOWN0, 7, 33, "m")), inputs,
                          roles=["creates_massive"], cfg=FAST)
    assert rep.tests["verdict"].tolist() == ["not applicable"] and "not massive" not in rep.tests["note"][0]
    assert "peaks at" in rep.tests["note"][0] and rep.timing["forward_passes"] == 1
    rep = roles.run_roles(lm.model, lm.tokenizer, lm.inventory, _sel((DOWN0, 5, 10, "m")), inputs,
                          roles=["creates_massive"], cfg=FAST)
    assert rep.timing["forward_passes"] == 3  # baseline + weight zeroed + control zeroed


# ------------------------------------------------------------------ bad input
def test_model_without_attention_probabilities_is_one_clear_error(inputs):
    lm = load("tiny-llama")
    lm.model.config._attn_implementation = "sdpa"  # tiny models are built eager; sdpa returns no probabilities
    with pytest.raises(EsaError, match="attention probabilities.*attn_implementation='eager'"):
        roles.run_roles(lm.model, lm.tokenizer, lm.inventory, _sel((DOWN0, 5, 10, "m")), inputs,
                        roles=["feeds_sink"], cfg=FAST)
    # the roles that do not read attention still run on it
    rep = roles.run_roles(lm.model, lm.tokenizer, lm.inventory, _sel((DOWN0, 5, 10, "m")), inputs,
                          roles=["reads_massive"], cfg=FAST)
    assert len(rep.tests) == 1


def test_model_without_decoder_blocks_is_one_clear_error(lm, inputs):
    bare = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(EsaError, match="decoder blocks"):
        roles.run_roles(bare, lm.tokenizer, lm.inventory, _sel((DOWN0, 5, 10, "m")), inputs, cfg=FAST)
    with pytest.raises(EsaError, match="decoder blocks"):
        sinks.head_sink_strength(bare, inputs)


def test_bad_selections_are_clear_errors(lm, inputs):
    run = lambda sel: roles.run_roles(lm.model, lm.tokenizer, lm.inventory, sel, inputs, cfg=FAST)  # noqa: E731
    with pytest.raises(EsaError, match=r"lacks columns \['col'\]"):
        run(pd.DataFrame({"param": [DOWN0], "row": [1]}))
    with pytest.raises(EsaError, match="not in the model's weight inventory"):
        run(_sel(("model.nope.weight", 0, 0, "m")))
    with pytest.raises(EsaError, match="out of range"):
        run(_sel((DOWN0, 999, 0, "m")))
    with pytest.raises(EsaError, match=r"role inputs must be"):
        roles.run_roles(lm.model, lm.tokenizer, lm.inventory, _sel((DOWN0, 5, 10, "m")), inputs[:3], cfg=FAST)


def test_k_larger_than_the_candidates_is_one_clear_error():
    sel = pd.DataFrame({"param": ["a"] * 3 + ["b"] * 5, "row": range(8), "col": 0, "metric": ["x"] * 3 + ["y"] * 5,
                        "rank": [1, 2, 3, 1, 2, 3, 4, 5]})
    assert len(roles.top_selection(sel, 3)) == 6
    with pytest.raises(EsaError, match="k=4 is larger than the 3 candidates available for metric 'x'"):
        roles.top_selection(sel, 4)


def test_stopwords_single_tokens_only(lm):
    ids = stopword_ids(lm.tokenizer)  # byte-level: punctuation, "a", "I", newline
    decoded = {lm.tokenizer.decode([int(i)]) for i in ids}
    assert {".", ",", "a"} <= decoded and "the" not in decoded

    class NoStop:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1] * (len(text) + 1)}  # never one token

    with pytest.raises(EsaError, match="single tokens"):
        stopword_ids(NoStop())


def test_sink_mask_first_and_delimiters(lm):
    ids = torch.tensor([lm.tokenizer("ab. c,d", add_special_tokens=False)["input_ids"]])
    assert sink_mask(ids, lm.tokenizer, "first").tolist() == [[True] + [False] * (ids.shape[1] - 1)]
    d = sink_mask(ids, lm.tokenizer, "delimiters")[0].tolist()
    assert d == [True, False, True, True, False, True, False]  # a b . ␣ c , d
    with pytest.raises(EsaError, match="unknown sink definition"):
        sink_mask(ids, lm.tokenizer, "bos")


# ------------------------------------------------------------------ chain and sinks
def test_chain_trace_matches_hidden_states_and_restores(lm):
    h0 = weights_hash(lm.model)
    tr = trace_chain(lm.model, lm.tokenizer, lm.inventory, DOWN0, 5, 10, text="Hello world. Again.")
    assert weights_hash(lm.model) == h0
    ids = lm.tokenizer("Hello world. Again.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hs = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
    # hidden_states[b + 1] is the residual after block b (the last one is after the final norm: skipped)
    assert math.isclose(tr.depth.loc[0, "max_base"], float(hs[1][0, :, 5].abs().max()), rel_tol=1e-5)
    assert tr.summary["factor_at_block"] > 10 and abs(tr.summary["control_factor_at_block"] - 1) < 0.05
    # the output spike of row 5 is the planted 300 times the input spike of column 10 (other terms are small)
    assert tr.summary["output_spike"] == pytest.approx(300 * tr.summary["input_spike"], rel=0.1)
    assert len(tr.heads) == lm.model.config.num_hidden_layers * lm.model.config.num_attention_heads
    assert tr.channel == 5 and tr.tokens[0] == "H"
    import matplotlib  # the figure only: the package itself imports without matplotlib

    matplotlib.use("Agg")
    from esa.apps.interpret.chain import plot_chain

    axes = plot_chain(tr)
    assert len(axes[0].lines) == 4 and axes[0].get_yscale() == "log"  # 3 conditions + the block marker


def test_sink_strength_equals_output_attentions(lm, inputs):
    s = sinks.head_sink_strength(lm.model, inputs)
    with torch.no_grad():
        att = lm.model(input_ids=inputs, output_attentions=True).attentions
    ref = torch.stack([a[:, :, 1:, 0].mean(-1).mean(0) for a in att])  # (L, heads)
    assert np.allclose(s.pivot(index="layer", columns="head", values="sink_mass").to_numpy(), ref.numpy(), atol=1e-6)


def test_head_sensitivity_slices_heads_including_gqa_and_fused(lm):
    anat = anat_mod.anatomy(lm.model)
    d = anat.head_dim
    scores = {s.name: torch.zeros(s.shape) for s in lm.inventory}
    scores["model.layers.0.self_attn.q_proj.weight"][2 * d : 3 * d] = 1.0  # head 2's query rows
    scores["model.layers.0.self_attn.k_proj.weight"][d : 2 * d] = 1.0  # key group 1 = heads 2, 3
    scores["model.layers.0.self_attn.o_proj.weight"][:, 0:d] = 1.0  # head 0's output columns
    hs = sinks.head_sensitivity(scores, lm.inventory, lm.model).set_index(["layer", "head"])
    cols = lm.model.config.hidden_size
    assert hs.loc[(0, 2), "q"] == d * cols and hs.loc[(0, 1), "q"] == 0
    assert hs.loc[(0, 2), "k"] == hs.loc[(0, 3), "k"] == d * cols and hs.loc[(0, 0), "k"] == 0
    assert hs.loc[(0, 0), "o"] == d * cols and hs.loc[(0, 0), "total"] == d * cols
    phi = load("tiny-phi3")
    pa = anat_mod.anatomy(phi.model)
    qkv = next(s for s in phi.inventory if s.component == "qkv")
    parts = anat_mod.head_slices_fused(pa, qkv)
    rows = sorted(r for comp in parts.values() for r in {(sl.start, sl.stop) for sl, _ in comp})
    assert rows[0] == (0, pa.head_dim) and rows[-1][1] == qkv.rows  # q | k | v tile the fused rows
    with pytest.raises(EsaError, match="unknown aggregate"):
        sinks.head_sensitivity(scores, lm.inventory, lm.model, agg="median")


def test_sink_correlation_overall_and_per_layer():
    strength = pd.DataFrame({"layer": np.repeat([0, 1], 10), "head": np.tile(range(10), 2),
                             "sink_mass": np.linspace(0, 1, 20)})
    sens = strength.assign(q=0.0, k=0.0, v=0.0, o=0.0, total=np.linspace(0, 1, 20) ** 2)[
        ["layer", "head", "q", "k", "v", "o", "total"]]
    res = sinks.sink_correlation(strength, sens)
    assert res.overall["rho"] == pytest.approx(1.0) and res.overall["ci_lo"] == pytest.approx(1.0)
    assert np.allclose(res.per_layer["rho"], 1.0) and len(res.per_layer) == 2
    assert res.within_layer["rho"] == pytest.approx(1.0) and res.within_layer["n_layers"] == 2
    # a between-layer trend alone: pooled rho high, within-layer rho negative
    trend = strength.assign(sink_mass=np.repeat([0.1, 0.9], 10) - np.tile(np.linspace(0, 0.05, 10), 2))
    res = sinks.sink_correlation(trend, sens)
    assert res.overall["rho"] > 0.5 and res.within_layer["rho"] == pytest.approx(-1.0)
    assert "not estimable" in res.per_component.set_index("component").loc["q", "note"]
    assert "underpowered" in spearman_ci(np.arange(5), np.arange(5))["note"]


# ------------------------------------------------------------------ probes
_PLAY = """{title}

Persons Represented.

{a}, a Lord.
{b}, Daughter to {a}.
{c}, Friend to {a}.
Servants.

ACT I.

Scene I. A room.

{A}.
{line_a} and this is the {title_l} speech of {a}, which is long enough.

{B}.
{line_b} spoken in the {title_l} by {b}, and it too is long enough.

{C}.
Some words from {c} in {title_l}, a line of at least twenty-five characters.

{A}.
Again {a} speaks in {title_l}, naming {b} and {c} once more, at length here.
"""


def _plays() -> dict[str, str]:
    out = {}
    for title, (a, b, c) in {"Alpha": ("Orsino", "Viola", "Feste"), "Beta": ("Duncan", "Portia", "Cato"),
                             "Gamma": ("Leontes", "Perdita", "Camillo")}.items():
        body = _PLAY.format(title=title, title_l=title.lower(), a=a, b=b, c=c, A=a.upper(), B=b.upper(),
                            C=c.upper(), line_a=f"Hear me, {b}, {c}", line_b=f"Yes, {a}, I hear")
        out[title] = body + f"\n{a} {a} {a} {a} {a} {a} {a} {b} {b} {b} {b} {b} {b} {b} {c} {c} {c} {c} {c} {c}\n"
    return out


def test_probe_set_is_deterministic_and_well_formed():
    ps = probes.build_probes(_plays())
    assert ps == probes.build_probes(_plays())
    kinds = {i.kind for i in ps.items}
    assert kinds == {"character_play", "relation", "speaker_line"}
    for i in ps.items:
        assert i.answer in i.candidates and len(set(i.candidates)) == len(i.candidates)
    rel = [i for i in ps.items if i.kind == "relation"]
    assert any(i.prompt == "In Shakespeare's Alpha, Viola is the daughter of" and i.answer == "Orsino" for i in rel)
    cp = {i.prompt.split("character ")[1].split(" is from")[0]: i.answer for i in ps.items if i.kind == "character_play"}
    assert cp["Orsino"] == "Alpha" and cp["Perdita"] == "Gamma"
    assert "Servants" not in cp  # a role word, not a name
    assert ps.chance == pytest.approx(np.mean([1 / len(i.candidates) for i in ps.items]))
    assert len(ps.subset(n=1)) == 3
    with pytest.raises(EsaError, match="unknown probe kind"):
        probes.build_probes(_plays(), kinds=["character_play", "birthday"])


def test_probe_file_round_trip_and_malformed_lines(tmp_path):
    ps = probes.build_probes(_plays())
    path = probes.write_probes(tmp_path / "p.tsv", ps)
    assert probes.read_probes(path).items == ps.items
    header = "\t".join(probes.HEADER)
    good = "relation\tAlpha\tIn Alpha, Viola is the daughter of\tOrsino\tOrsino|Feste"
    cases = {
        "x\ty": r"line 1: expected the header",
        f"{header}\n{good}\n# comment\n\nrelation\tAlpha\tprompt\tOrsino": r"line 5: 4 tab-separated fields, expected 5",
        f"{header}\n{good}\nrelation\tAlpha\tprompt\tIago\tOrsino|Feste": r"line 3: answer 'Iago' is not among",
        f"{header}\nrelation\tAlpha\tprompt\tOrsino\tOrsino|Orsino": r"line 2: duplicate candidates",
        f"{header}\nrelation\tAlpha\tprompt\tOrsino\tOrsino": r"line 2: needs at least 2",
        f"{header}\n\tAlpha\tprompt\tOrsino\tOrsino|Feste": r"line 2: empty kind",
        f"{header}\n": r"header but no items",
        "": r"empty",
    }
    for i, (text, msg) in enumerate(cases.items()):
        p = tmp_path / f"bad{i}.tsv"
        p.write_text(text, encoding="utf-8")
        with pytest.raises(EsaError, match=msg):
            probes.read_probes(p)
    with pytest.raises(EsaError, match="does not exist"):
        probes.read_probes(tmp_path / "missing.tsv")


def test_shared_prompt_scoring_equals_whole_sequences(lm):
    ps = probes.build_probes(_plays()).subset(n=2)
    sc = probes.score_probes(lm.model, lm.tokenizer, ps)
    seqs, spans = [], []
    for it in ps.items:
        for c in it.candidates:
            s, sp = probes._encode(lm.tokenizer, it.prompt, c)
            seqs.append(s)
            spans.append(sp)
    ref = probes.sequence_logliks(lm.model, seqs, spans)
    assert np.allclose(np.concatenate(sc.loglik), ref, atol=1e-4)
    ans = probes.answer_nll(lm.model, lm.tokenizer, ps)
    assert np.allclose(ans, sc.answer_nll, atol=1e-5)


def test_probe_summary_accuracy_chance_and_exact_p():
    sc = probes.ProbeScores([np.array([0.0, -1.0]), np.array([-1.0, 0.0]), np.array([0.0, -1.0, -2.0, -3.0])],
                            [np.ones(2), np.ones(2), np.ones(4)], np.array([0, 0, 0]), np.array(["a", "a", "b"]),
                            np.array([2, 2, 4]), np.array(["x", "x", "y"]), "sum")
    s = probes.probe_summary(sc).set_index("kind")
    assert s.loc["all", "accuracy"] == pytest.approx(2 / 3) and s.loc["all", "chance"] == pytest.approx(5 / 12)
    # P(>= 2 right) with p = (1/2, 1/2, 1/4): exactly 2 = 3/16 + 2/16, all 3 = 1/16
    assert s.loc["all", "p_vs_chance"] == pytest.approx(6 / 16)
    assert s.loc["a", "accuracy"] == 0.5 and s.loc["a", "majority"] == 1.0


# ------------------------------------------------------------------ localisation
def test_selectivity_and_direct_test_run_and_restore(lm):
    ps = probes.build_probes(_plays())
    pids = localise.probe_windows(lm.tokenizer, ps, seqlen=48)
    gids = torch.randint(3, 259, (4, 48), generator=torch.Generator().manual_seed(1))
    cfg = MetricConfig(show_progress=False)
    p_scores = localise.metric_scores(lm.model, lm.inventory, pids, "act_mag", cfg)
    g_scores = localise.metric_scores(lm.model, lm.inventory, gids, "act_mag", cfg)
    h0 = weights_hash(lm.model)
    sets = localise.ablation_sets(lm.model, lm.inventory, p_scores, g_scores, k=20, seed=0)
    assert {n: sum(int(v.numel()) for v in t.values()) for n, t in sets.items()} == dict.fromkeys(localise.CONDITIONS, 20)
    best, _ = localise.top_targets(p_scores, lm.inventory, 1)  # the probe score's top weight
    (name, idx), = best.items()
    assert int(idx[0]) in sets["probe_top_k"][name].tolist()
    kept = localise.ablation_sets(lm.model, lm.inventory, p_scores, g_scores, k=20, seed=0, exclude=best)
    assert all(int(idx[0]) not in kept[c].get(name, torch.zeros(0)).tolist() for c in ("probe_top_k", "generic_top_k"))
    assert sum(int(v.numel()) for v in kept["probe_top_k"].values()) == 20
    res = localise.selectivity(lm.model, lm.tokenizer, ps, gids, sets, n_boot=200, show_progress=False)
    assert weights_hash(lm.model) == h0
    t = res.table.set_index("condition")
    assert list(t.index) == list(localise.CONDITIONS)
    assert t.loc["probe_top_k", "n_weights"] == 20 and np.isfinite(t["rise_log_ppl"]).all()
    for _, r in t.iterrows():
        if math.isnan(r["selectivity_nll"]):
            assert "not estimable" in r["note"]
    assert set(res.comparisons["measure"]) == {"rise_answer_nll", "rise_log_ppl"} and "p_holm" in res.comparisons
    cand = localise.direct_candidates(lm.model, lm.inventory, p_scores, g_scores, n_top=4, n_random=4, seed=0)
    assert list(cand["group"]).count("probe_top") == 4 and len(cand) == 8
    dt = localise.direct_test(lm.model, lm.tokenizer, ps.subset(n=2), cand, lm.inventory, n_boot=200,
                              show_progress=False)
    assert weights_hash(lm.model) == h0
    assert len(dt.table) == 8 and dt.rho()["n"] == 8 and dt.rho("specificity", "effect", "probe_top")["n"] == 4
    assert len(dt.correlations) == 3 * 2 * 2 and (dt.table["abs_effect"] == dt.table["effect"].abs()).all()
    with pytest.raises(EsaError, match="no correlation"):
        dt.rho("magnitude")


def test_localisation_k_too_large(lm):
    scores = {s.name: torch.rand(s.shape) for s in lm.inventory}
    total = sum(s.numel for s in lm.inventory)
    with pytest.raises(EsaError, match=f"k={total + 1} is larger than the {total} candidate weights"):
        localise.top_targets(scores, lm.inventory, total + 1)
    with pytest.raises(EsaError, match="positive integer"):
        localise.top_targets(scores, lm.inventory, 0)


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-gptneox", "tiny-phi3"])
def test_catalogue_runs_on_other_architectures(name, inputs):
    lm = load(name)
    spec = next(s for s in lm.inventory if s.component == "down" and s.layer == 0)
    sel = pd.DataFrame([{"param": spec.name, "expert": 1 if spec.n_experts else -1, "row": 2, "col": 3, "metric": "m"},
                        {"param": next(s.name for s in lm.inventory if s.kind == "attention" and s.layer == 0),
                         "expert": -1, "row": 1, "col": 1, "metric": "m"}])
    h0 = weights_hash(lm.model)
    rep = roles.run_roles(lm.model, lm.tokenizer, lm.inventory, sel, inputs, cfg=FAST)
    assert weights_hash(lm.model) == h0
    assert len(rep.tests) == 2 * 6 and set(rep.tests["verdict"]) <= set(roles.VERDICTS)
    if spec.n_experts:  # a routed expert's input column is not one tensor: baseline-only roles do not apply
        t = rep.tests[rep.tests["param"] == spec.name].set_index("role")
        assert (t.loc[["bias_like", "reads_massive", "first_token"], "verdict"] == "not applicable").all()
        assert t.loc["suppresses_stopwords", "verdict"] in ("pass", "fail")
    else:
        assert not (rep.tests["verdict"] == "not estimable").any()
