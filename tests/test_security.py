"""esa.apps.security: storage formats and real bit flips, collapse share, BFA, fault campaigns, protection,
weight-space PGD and the backdoor detector, on tiny models (one of them trained for a few seconds on a
periodic byte text, so that damage is measurable: PPL ~1.1 and 97% next-token accuracy)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from esa.apps import security as sec
from esa.apps.security.common import contains
from esa.apps.security.defences import apply_guard, make_guard
from esa.apps.security.formats import (
    BitDomain,
    combine,
    dequantize_int8,
    mask_bits,
    n_flips,
    popcount,
    quantize_int8,
)
from esa.errors import EsaError
from esa.evaluate import evaluate
from esa.models import load
from esa.perturb import overwritten, weights_hash
from esa.perturb.ops import BIT_LAYOUTS
from esa.sensitivity.metrics import batch_loss

TEXT = ("the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 40
        ).encode()


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matmuls on one thread


def _windows(n: int, length: int, seed: int) -> torch.Tensor:
    stream = torch.tensor(list(TEXT)) + 3  # ByT5 byte ids
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - length, (n,), generator=g)
    return torch.stack([stream[s : s + length] for s in starts])  # (n, length)


@pytest.fixture(scope="module")
def trained():
    """tiny-llama trained 80 Adam steps on the periodic text (fp32); held-out and attack windows."""
    lm = load("tiny-llama")
    model = lm.model
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for step in range(80):
        b = _windows(4, 64, step)
        loss = model(input_ids=b, labels=b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    return lm, _windows(4, 64, 10_000), _windows(2, 64, 20_000)


def _raw(p: torch.Tensor) -> torch.Tensor:
    int_dtype, total, _, _ = BIT_LAYOUTS[p.dtype]
    return p.detach().reshape(-1).view(int_dtype).long() & ((1 << total) - 1)


# ---------------------------------------------------------------- formats
def test_int8_round_trip():
    w = torch.randn(16, 40, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 3, 16)[:, None]
    w[3] = 0.0  # an all-zero channel keeps code 0
    codes, scales = quantize_int8(w)
    assert codes.dtype == torch.int8 and scales.shape == (16,)
    assert int(codes.abs().max()) <= 127 and int(codes.abs().amax(dim=1).min()) in (0, 127)
    deq = dequantize_int8(codes, scales)
    assert bool(((deq - w).abs() <= scales[:, None] / 2 + 1e-6).all())  # rounding error at most half a step
    again, scales2 = quantize_int8(deq)
    assert torch.equal(again, codes) and torch.allclose(scales2, scales)  # the int8 grid is a fixed point
    assert bool((deq[3] == 0).all())


def test_int8_store_quantises_in_place_and_restores(trained):
    lm, held, _ = trained
    h0 = weights_hash(lm.model)
    base = evaluate(lm.model, held, show_progress=False)
    with sec.stored(lm.model, "int8") as store:
        assert weights_hash(lm.model) != h0
        name = store.names[0]
        p = store.params[name]
        expect = dequantize_int8(store.codes[name].view(p.shape), store.scales[name].view(-1)).to(p.dtype)
        assert torch.equal(p.detach(), expect)
        assert 0 < store.quant_rel_error < 0.02
        q = evaluate(lm.model, held, show_progress=False)
        assert abs(q.log_ppl - base.log_ppl) < 0.05  # int8 per channel barely moves a tiny model
    assert weights_hash(lm.model) == h0


def test_nested_int8_blocks_share_one_quantisation(trained):
    lm, held, _ = trained
    h0 = weights_hash(lm.model)
    with sec.stored(lm.model, "int8") as outer:
        q = weights_hash(lm.model)
        with sec.stored(lm.model, "int8") as inner:
            assert inner is outer  # reused: not quantised again
            fs = sec.make_flips({outer.names[0]: (torch.tensor([1, 2]), torch.tensor([7, 3]))})
            with sec.flipped(inner, fs):
                assert weights_hash(lm.model) != q
        assert weights_hash(lm.model) == q  # the inner block restored nothing it did not change
        with pytest.raises(EsaError, match="an int8 block holds"):
            sec.stored(lm.model, "fp32").__enter__()
        sub = [s.name for s in lm.inventory][:2]
        with sec.stored(lm.model, "int8", sub) as other:
            assert other is not outer  # another set of weights: its own store
    assert weights_hash(lm.model) == h0


@pytest.mark.parametrize("fmt,dtype", [("fp32", "float32"), ("bf16", "bfloat16"), ("fp16", "float16")])
def test_every_float_flip_is_one_stored_bit(fmt, dtype):
    lm = load("tiny-llama", dtype=dtype)
    model = lm.model
    h0 = weights_hash(model)
    rng = np.random.default_rng(1)
    with sec.stored(model, fmt) as store:
        f = store.fmt
        name = store.names[2]
        n = store.numel(name)
        idx = torch.from_numpy(rng.choice(n, 50, replace=False)).long()
        bits = torch.from_numpy(rng.integers(0, f.n_bits, 50)).long()
        before = _raw(store.params[name]).clone()
        others = {k: _raw(store.params[k]).clone() for k in store.names if k != name}
        with sec.flipped(store, sec.make_flips({name: (idx, bits)})) as st:
            after = _raw(store.params[name])
            diff = before ^ after
            assert torch.equal(diff[idx], torch.ones_like(bits) << bits)  # exactly the named bit of each
            rest = torch.ones(n, dtype=torch.bool)
            rest[idx] = False
            assert int(diff[rest].abs().sum()) == 0  # and nothing else in the matrix
            assert all(torch.equal(_raw(store.params[k]), v) for k, v in others.items())
            assert st.n_flips == 50 and st.n_weights == 50 and st.n_changed == 50
            vals = store.params[name].detach().reshape(-1)[idx]
            assert st.n_inf == int(torch.isinf(vals).sum()) and st.n_nan == int(torch.isnan(vals).sum())
        assert torch.equal(_raw(store.params[name]), before)
    assert weights_hash(model) == h0


def test_every_int8_flip_is_one_bit_of_the_code(trained):
    lm, _, _ = trained
    h0 = weights_hash(lm.model)
    rng = np.random.default_rng(2)
    with sec.stored(lm.model, "int8") as store:
        name = store.names[5]
        spec = store.specs[name]
        idx = torch.from_numpy(rng.choice(spec.numel, 40, replace=False)).long()
        bits = torch.from_numpy(rng.integers(0, 8, 40)).long()
        codes0 = store.codes[name].clone()
        with sec.flipped(store, sec.make_flips({name: (idx, bits)})):
            codes1 = store.codes[name]
            diff = (codes0.long() & 0xFF) ^ (codes1.long() & 0xFF)
            assert torch.equal(diff[idx], torch.ones_like(bits) << bits)
            assert int(diff.sum()) == int((torch.ones_like(bits) << bits).sum())
            vals = store.params[name].detach().reshape(-1)
            expect = (codes1.float().view(spec.rows, spec.cols) * store.scales[name][:, None]).reshape(-1)
            assert torch.equal(vals, expect.to(vals.dtype))  # every weight = its (flipped) code x its scale
        assert torch.equal(store.codes[name], codes0)
        for b in range(8):  # the attack's ranking step equals the real flip's change (up to fp32 rounding)
            after = store.flipped_values(name, idx, torch.full_like(idx, 1 << b)).float()
            real = after - store.values(name, idx)
            assert torch.allclose(store.delta(name, b, idx), real, rtol=1e-4, atol=1e-8)
            assert torch.allclose(store.delta(name, b)[idx], real, rtol=1e-4, atol=1e-8)
    assert weights_hash(lm.model) == h0


def test_flip_sets_cancel_combine_and_count_nan(trained):
    lm, _, _ = trained
    name = "model.layers.0.mlp.down_proj.weight"
    fs = sec.make_flips({name: (torch.tensor([4, 4, 4, 9]), torch.tensor([3, 3, 5, 0]))})
    assert torch.equal(fs[name][0], torch.tensor([4, 9])) and torch.equal(fs[name][1], torch.tensor([32, 1]))
    assert n_flips(fs) == 2
    both = combine(fs, sec.make_flips({name: (torch.tensor([9]), torch.tensor([0]))}))
    assert torch.equal(both[name][0], torch.tensor([4])) and n_flips(both) == 1  # the same bit twice: undone
    i, b = mask_bits(torch.tensor([0b1011]), torch.tensor([7]))
    assert i.tolist() == [7, 7, 7] and b.tolist() == [0, 1, 3]
    h0 = weights_hash(lm.model)
    one = torch.tensor([1.5])  # exponent 0b01111111: its MSB flip gives exponent 255 with a mantissa: NaN
    flip = sec.make_flips({name: (torch.tensor([7]), torch.tensor([30]))})
    with (overwritten(lm.model, {name: (torch.tensor([7]), one)}), sec.stored(lm.model, "fp32") as store,
          sec.flipped(store, flip) as st):
        assert st.n_nan == 1 and st.n_inf == 0
        assert math.isnan(float(store.values(name, torch.tensor([7]))[0]))
    assert weights_hash(lm.model) == h0


def test_bit_domain_addresses_each_stored_bit_once(trained):
    lm, _, _ = trained
    with sec.stored(lm.model, "int8") as store:
        targets = {store.names[1]: torch.tensor([0, 5, 9]), store.names[3]: torch.tensor([2])}
        dom = BitDomain(store, "any", targets)
        assert dom.total == 4 * 8
        fs = dom.locate(np.arange(dom.total))
        assert n_flips(fs) == 32
        idx, mask = fs[store.names[1]]
        assert torch.equal(idx, torch.tensor([0, 5, 9])) and int(mask[0]) == 255
        full = BitDomain(store, "msb")
        assert full.total == store.total_weights()


# ---------------------------------------------------------------- collapse share
def test_collapse_share(trained):
    lm, held, _ = trained
    h0 = weights_hash(lm.model)
    res = sec.collapse_share(lm.model, held, "fp32", n_samples=24, seed=3, show_progress=False)
    assert weights_hash(lm.model) == h0
    t = res.table
    assert len(t) == 24 == res.n and set(t["bit"]) == {30}  # fp32 exponent MSB
    assert t.groupby("param")["index"].apply(lambda s: s.is_unique).all()
    assert (t["collapsed"] == (t["damage"] >= math.log(100))).all()
    assert 0 <= res.lo <= res.share <= res.hi <= 1 and res.n_collapsed == int(t["collapsed"].sum())
    # the exponent MSB flip of a weight with |w| < 1 multiplies it by exactly 2^128
    small = (t["before"].abs() < 1) & (t["before"] != 0)
    assert small.sum() > 20 and (t.loc[small, "after"] / t.loc[small, "before"] == 2.0**128).all()
    assert res.n_collapsed > 0  # a trained model has single points of failure in fp32


# ---------------------------------------------------------------- BFA
def test_bfa_int8_increases_loss_monotonically_and_beats_random(trained):
    lm, held, att = trained
    h0 = weights_hash(lm.model)
    cfg = sec.AttackConfig(fmt="int8", max_flips=8, show_progress=False)
    res = sec.run_attack("bfa", lm.model, att, held, cfg=cfg)
    assert weights_hash(lm.model) == h0
    h = res.history
    assert len(h) == 8 and res.stop_reason == "flip budget spent"
    losses = [res.base["attack_loss"], *h["attack_loss"]]
    assert all(b > a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert (h["bit"].between(0, 7)).all() and (h["n_inf"] == 0).all() and (h["n_nan"] == 0).all()
    assert res.timing["n_forward_backward"] == 8
    assert (h["net_flips"] <= h["step"]).all() and int(h["net_flips"].iloc[-1]) == n_flips(res.flips)
    assert set(res.iterations_to) == set(res.flips_to) == {"ppl_x100", "ppl_x1000", "acc_below_0.01"}
    assert res.timing["n_cross_layer_forwards"] == 8 * len(lm.inventory)  # one per candidate matrix
    # the same number of uniformly random int8 flips moves the attack loss far less
    with sec.stored(lm.model, "int8") as store:
        dom = BitDomain(store, "any")
        gains = []
        for s in range(3):
            fs = dom.locate(np.random.default_rng(s).choice(dom.total, 8, replace=False))
            with sec.flipped(store, fs):
                gains.append(float(batch_loss(lm.model, att)) - res.base["attack_loss"])
        with sec.flipped(store, res.flips):  # replaying the found flips reproduces the last loss
            assert float(batch_loss(lm.model, att)) == pytest.approx(losses[-1], rel=1e-5)
    assert losses[-1] - losses[0] > 5 * max(max(gains), 1e-6)
    assert weights_hash(lm.model) == h0


def test_bfa_candidates_are_the_best_first_order_flips(trained):
    lm, _, att = trained
    from esa.apps.security.bfa import _in_layer

    for fmt in ("int8", "fp32"):
        with sec.stored(lm.model, fmt) as store:
            bits = store.fmt.positions("bounded")
            found, seconds = _in_layer(store, att, {n: None for n in store.names}, bits, None)
            cands = {c.name: c for c in found}
            assert seconds > 0 and len(cands) == len(store.names)
            params = [store.params[n] for n in store.names]
            for p in params:
                p.requires_grad_(True)
            batch_loss(lm.model, att).backward()
            for n, p in zip(store.names, params, strict=True):
                g = p.grad.reshape(-1).float()
                gains = torch.stack([g * store.delta(n, b) for b in bits])  # (bits, n): brute force
                assert cands[n].gain == pytest.approx(float(gains.max()), rel=1e-6)
                at = float(gains[bits.index(cands[n].bit), cands[n].index])
                assert at == pytest.approx(cands[n].gain, rel=1e-6)
                p.grad = None
                p.requires_grad_(False)


def test_bfa_respects_target_set_guard_and_layer_limit(trained):
    lm, held, att = trained
    names = [s.name for s in lm.inventory]
    targets = {names[4]: torch.arange(0, 400, 3), names[9]: torch.arange(100, 200)}
    cfg = sec.AttackConfig(fmt="int8", max_flips=4, layer_candidates=1, show_progress=False)
    res = sec.progressive_bit_search(lm.model, att, held, targets=targets, cfg=cfg)
    for _, r in res.history.iterrows():
        assert r["param"] in targets and int(r["index"]) in set(targets[r["param"]].tolist())
    assert res.timing["n_cross_layer_forwards"] == 4 and res.settings["target_size"] == 134 + 100
    # protect what the unguarded search chose: the guarded search must find other flips
    three = sec.AttackConfig(fmt="int8", max_flips=3, show_progress=False)
    free = sec.progressive_bit_search(lm.model, att, held, cfg=three)
    chosen = {}
    for _, r in free.history.iterrows():
        chosen.setdefault(r["param"], []).append(int(r["index"]))
    guard = sec.Guard("ecc", {k: torch.tensor(sorted(set(v))) for k, v in chosen.items()})
    h0 = weights_hash(lm.model)
    guarded = sec.progressive_bit_search(lm.model, att, held, cfg=three, guard=guard)
    assert weights_hash(lm.model) == h0
    for _, r in guarded.history.iterrows():
        assert int(r["index"]) not in chosen.get(r["param"], [])


def test_bfa_float_bounded_bits_and_random_attack(trained):
    lm, held, att = trained
    cfg = sec.AttackConfig(fmt="fp32", max_flips=3, show_progress=False)
    res = sec.progressive_bit_search(lm.model, att, held, cfg=cfg)
    allowed = set(sec.FORMATS["fp32"].positions("bounded"))
    assert set(res.history["bit"]) <= allowed and (res.history["n_inf"] == 0).all()
    ratio = (res.history["after"].abs() / res.history["before"].abs().clip(lower=1e-30))
    assert (ratio <= 2.0 + 1e-6).all()  # bounded: |w| at most doubles
    rnd = sec.run_attack("random", lm.model, att, held, cfg=sec.AttackConfig(fmt="int8", max_flips=50,
                                                                             show_progress=False, seed=4))
    assert list(rnd.history["step"]) == [1, 2, 5, 10, 20, 50] and n_flips(rnd.flips) == 50


# ---------------------------------------------------------------- faults and protection
def test_fault_campaign_near_zero_rate_does_nothing(trained):
    lm, held, _ = trained
    h0 = weights_hash(lm.model)
    res = sec.fault_campaign(lm.model, held, "fp32", [1e-12], 6, show_progress=False)
    t = res.trials
    assert (t["n_flips"] == 0).all() and not t["evaluated"].any() and not t["catastrophic"].any()
    assert (t["damage"] == 0).all()
    assert res.summary["catastrophic_rate"].iloc[0] == 0 and res.summary["catastrophic_hi"].iloc[0] < 0.5
    assert weights_hash(lm.model) == h0


def test_fault_campaign_counts_and_attribution(trained):
    lm, held, _ = trained
    h0 = weights_hash(lm.model)
    crit = sec.top_fraction({s.name: torch.rand(s.shape, generator=torch.Generator().manual_seed(0))
                             for s in lm.inventory}, 0.05)
    kw = dict(seed=1, critical=crit, show_progress=False)
    res = sec.fault_campaign(lm.model, held, "fp32", [1e-5, 1e-4], 8, **kw)
    assert weights_hash(lm.model) == h0
    t = res.trials
    n_bits = res.settings["n_stored_bits"]
    assert n_bits == 32 * sum(s.numel for s in lm.inventory)
    mean_hi = t[t["rate"] == 1e-4]["n_drawn"].mean()
    assert abs(mean_hi - 1e-4 * n_bits) < 4 * math.sqrt(1e-4 * n_bits / 8)  # binomial mean, 4 sigma
    assert (t["n_exponent_flips"] <= t["n_flips"]).all() and (t["n_critical_flips"] <= t["n_flips"]).all()
    cat = t[t["catastrophic"]]
    assert len(cat) > 0 and (cat["n_exponent_flips"] > 0).all()  # fp32 catastrophes come from exponent bits
    summ = res.summary.set_index("rate")
    assert summ.loc[1e-4, "catastrophes_hit_exponent"] == 1.0
    assert 0 <= summ.loc[1e-4, "catastrophes_hit_critical"] <= 1  # a critical set was given: estimable
    assert summ["n_catastrophic"].sum() == len(cat) and (summ["n_trials"] == 8).all()
    again = sec.fault_campaign(lm.model, held, "fp32", [1e-5, 1e-4], 8, **kw)
    pd.testing.assert_frame_equal(t, again.trials)  # seeded: the same faults and results


def test_protection_excludes_protected_indices(trained):
    lm, held, _ = trained
    with sec.stored(lm.model, "fp32") as store:
        dom = BitDomain(store, "any")
        flips = dom.locate(np.random.default_rng(0).choice(dom.total, 3000, replace=False))
        # two flips in one protected weight, so that parity has an even pattern to miss
        name = store.names[0]
        flips = combine(flips, sec.make_flips({name: (torch.tensor([11, 11]), torch.tensor([2, 7]))}))
        prot = {n: flips[n][0][::2].clone() for n in list(flips)[:6]}
        empty = torch.zeros(0, dtype=torch.long)
        prot[name] = torch.unique(torch.cat([prot.get(name, empty), torch.tensor([11])]))
        for mode in ("ecc", "parity", "bounded"):
            guard = sec.Guard(mode, prot)
            through, stopped = apply_guard(guard, store, flips)
            assert n_flips(through) + stopped == n_flips(flips)
            for n, (idx, mask) in through.items():
                inside = contains(prot, n, idx)
                if mode == "ecc":
                    assert not inside.any()
                elif mode == "parity":
                    assert bool((popcount(mask[inside]) % 2 == 0).all())
                else:
                    bounded = sum(1 << b for b in store.fmt.positions("bounded"))
                    assert bool(((mask[inside] & ~bounded) == 0).all())
            if mode == "parity":  # the rule agrees with the real parity of the stored bits
                assert int(popcount(through[name][1][through[name][0] == 11]).sum()) == 2  # even: unseen
                ref = sec.parity_bits(store, prot)
                with sec.flipped(store, flips):
                    now = sec.parity_bits(store, prot)
                for n in prot:
                    idx, mask = flips.get(n, (empty, empty))
                    odd = set(idx[popcount(mask) % 2 == 1].tolist())
                    detected = set(prot[n][ref[n] != now[n]].tolist())
                    assert detected == odd & set(prot[n].tolist())


def test_protected_set_builders(trained):
    lm, _, _ = trained
    scores = {s.name: torch.arange(s.numel, dtype=torch.float32).reshape(s.shape) * (i + 1)
              for i, s in enumerate(lm.inventory)}
    top = sec.top_fraction(scores, 0.001)
    total = sum(s.numel for s in lm.inventory)
    assert sum(int(v.numel()) for v in top.values()) == round(0.001 * total)
    last = lm.inventory[-1]  # the largest multiplier: its highest indices score highest
    assert list(top) == [last.name] and int(top[last.name][-1]) == last.numel - 1
    flat = {s.name: torch.ones(s.shape) for s in lm.inventory}  # all tied: the earliest weights win
    flat[lm.inventory[1].name].view(-1)[7] = 2.0
    tied = sec.top_fraction(flat, 3 / total)
    first = lm.inventory[0].name
    assert tied[first].tolist() == [0, 1] and tied[lm.inventory[1].name].tolist() == [7]
    u = sec.uniform_targets(lm.inventory, 50, seed=0, exclude=top)
    assert sum(int(v.numel()) for v in u.values()) == 50
    assert not any(bool(contains(top, n, v).any()) for n, v in u.items())
    again = sec.uniform_targets(lm.inventory, 50, seed=0, exclude=top)
    assert all(torch.equal(v, again[n]) for n, v in u.items())
    with sec.stored(lm.model, "fp32") as store:
        ctrl = sec.random_like(top, store, seed=1)
        assert {k: int(v.numel()) for k, v in ctrl.items()} == {k: int(v.numel()) for k, v in top.items()}
        assert not contains(top, last.name, ctrl[last.name]).any()
        assert torch.equal(ctrl[last.name], sec.random_like(top, store, seed=1)[last.name])


def test_protection_curve_shares_the_faults(trained):
    lm, held, _ = trained
    all_w = {s.name: torch.arange(s.numel) for s in lm.inventory}
    h0 = weights_hash(lm.model)
    curve = sec.protection_curve(lm.model, held, "fp32", 1e-4, 6, {"all": all_w}, mode="ecc", seed=2,
                                 show_progress=False)
    assert weights_hash(lm.model) == h0
    assert list(curve["protected"]) == ["none", "all"] and curve["protected_fraction"].tolist() == [0.0, 1.0]
    full = curve.iloc[1]
    assert full["mean_flips"] == 0 and full["n_catastrophic"] == 0 and full["mean_flips_stopped"] > 0
    assert full["mean_flips_stopped"] == curve.iloc[0]["mean_flips"]  # the same faults, all stopped


def test_protection_reuse_equals_fresh_evaluation(trained):
    lm, held, _ = trained
    name = lm.inventory[3].name
    prot = {name: torch.arange(0, lm.inventory[3].numel, 50)}
    free = sec.fault_campaign(lm.model, held, "fp32", [3e-5], 6, seed=5, show_progress=False)
    kw = dict(seed=5, guard=sec.Guard("parity", prot), show_progress=False)
    fresh = sec.fault_campaign(lm.model, held, "fp32", [3e-5], 6, **kw)
    reused = sec.fault_campaign(lm.model, held, "fp32", [3e-5], 6, reuse=free, **kw)
    assert reused.trials["reused"].sum() > 0 and not fresh.trials["reused"].any()
    pd.testing.assert_frame_equal(fresh.trials.drop(columns="reused"), reused.trials.drop(columns="reused"))
    with pytest.raises(EsaError, match="reuse needs an unguarded campaign"):
        sec.fault_campaign(lm.model, held, "fp32", [3e-5], 6, seed=6, reuse=free, show_progress=False)


def _fake(flips_to: dict, budget: int = 10) -> sec.AttackResult:
    return sec.AttackResult("bfa", pd.DataFrame(), flips_to, "", {}, {}, settings=dict(max_flips=budget))


def test_wilson_ci_brackets_the_share():
    for n in range(1, 120):
        for k in (0, 1, n // 2, n - 1, n):
            p, lo, hi = sec.wilson_ci(k, n)
            assert 0 <= lo <= p <= hi <= 1, (k, n, lo, p, hi)


def test_attack_summaries_and_vulnerability_ratio():
    crit = [_fake({"ppl_x100": v}) for v in (2, 3, 4)]
    rand = [_fake({"ppl_x100": v}) for v in (8, None, 6)]  # one run never got there within 10 flips
    t = sec.summarise_attacks({"critical": crit, "random_k": rand}, n_boot=500)
    row = t.set_index("set").loc["random_k"]
    assert row["n_reached"] == 2 and row["censored"] and row["flips_mean"] == pytest.approx((8 + 11 + 6) / 3)
    assert not t.set_index("set").loc["critical", "censored"]
    r = sec.flips_ratio(rand, crit, "ppl_x100", n_boot=500)
    assert r["ratio"] == pytest.approx((25 / 3) / 3) and r["lo"] <= r["ratio"] <= r["hi"]
    assert "censored" in r["note"]
    with pytest.raises(EsaError, match="unknown attack goal"):
        sec.flips_ratio(rand, crit, "ppl_x7")


# ---------------------------------------------------------------- adversarial PGD
def test_pgd_increases_loss_within_budget(trained):
    lm, held, att = trained
    names = [s.name for s in lm.inventory]
    targets = {names[0]: torch.arange(0, 1024, 4), names[6]: torch.arange(0, 256)}
    h0 = weights_hash(lm.model)
    t = sec.pgd_attack(lm.model, att, targets, [0.05, 0.5], radius="abs", steps=5, heldout=held,
                       show_progress=False)
    assert weights_hash(lm.model) == h0
    assert (t["loss_increase"] > 0).all() and t["loss_increase"].iloc[1] > t["loss_increase"].iloc[0]
    assert (t["realised_linf"] <= 1 + 1e-5).all() and (t["n_targets"] == 512).all()
    sets = {"a": targets, "b": {names[1]: torch.arange(512)}}
    cmp = sec.pgd_compare(lm.model, att, sets, [0.1], radius="std", steps=3, show_progress=False)
    assert set(cmp["set"]) == {"a", "b"} and cmp["equal_size"].all()
    assert weights_hash(lm.model) == h0


# ---------------------------------------------------------------- backdoor detector
def _maps(n: int, seed: int, hot: bool) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        m = {"a.weight": torch.rand(8, 16, generator=g), "b.weight": torch.rand(16, 8, generator=g)}
        if hot:
            m["a.weight"][3] *= 4.0  # a planted hot channel: the sensitivity of one output row
        out.append(m)
    return out


def test_backdoor_detector_auroc():
    clean = _maps(12, 0, False)
    bad = _maps(12, 1, True)
    feats = pd.DataFrame({f"c{i}": sec.map_features(m) for i, m in enumerate(clean)}
                         | {f"b{i}": sec.map_features(m) for i, m in enumerate(bad)}).T
    labels = {f"c{i}": 0 for i in range(12)} | {f"b{i}": 1 for i in range(12)}
    res = sec.detect(feats, labels, n_boot=500)
    assert res.auroc > 0.95 and res.lo > 0.8 and res.note == ""
    clean_only = feats.loc[[f"c{i}" for i in range(12)]]
    null = sec.detect(clean_only, {f"c{i}": int(i < 6) for i in range(12)}, n_boot=500)
    assert null.lo < 0.5 < null.hi and "underpowered" in null.note  # no signal, and 6 per class is too few
    s, y = res.scores["score"].to_numpy(), res.scores["label"].to_numpy().astype(bool)
    pairs = [(a > b) + 0.5 * (a == b) for a in s[y] for b in s[~y]]  # the definition, pair by pair
    assert sec.auroc(s, y) == pytest.approx(np.mean(pairs))
    assert sec.auroc([1, 1, 0, 0], [1, 0, 1, 0]) == 0.5  # ties count half


def test_spectral_features_and_sensitivity_features(trained):
    lm, _, att = trained
    u, v = torch.randn(8, 1), torch.randn(1, 12)
    f = sec.spectral_features({"w": u @ v})
    assert f["w|sigma1_share"] == pytest.approx(1.0, abs=1e-5)
    assert f["w|effective_rank"] == pytest.approx(1, abs=1e-3)
    g = sec.spectral_features({"w": torch.eye(8)})
    assert g["w|effective_rank"] == pytest.approx(8, rel=1e-4)
    names = [s.name for s in lm.inventory][:4]
    params = dict(lm.model.named_parameters())
    states = {}
    for k in range(3):
        gen = torch.Generator().manual_seed(k)
        states[f"m{k}"] = {n: params[n].detach() + 0.01 * torch.randn(params[n].shape, generator=gen)
                           for n in names}
    h0 = weights_hash(lm.model)
    feats = sec.sensitivity_features(lm.model, states, att, weights=names, channels=False)
    assert weights_hash(lm.model) == h0
    assert list(feats.index) == ["m0", "m1", "m2"] and feats.shape[1] == 5 * len(names)
    assert np.isfinite(feats.to_numpy()).all() and not (feats.iloc[0] == feats.iloc[1]).all()


# ---------------------------------------------------------------- bad input
def test_bad_inputs_fail_before_any_work(trained):
    lm, held, att = trained
    model = lm.model
    h0 = weights_hash(model)
    norm = "model.layers.0.input_layernorm.weight"
    cases = [
        (lambda: sec.stored(model, "int4").__enter__(), "unknown storage format 'int4'"),
        (lambda: sec.run_attack("rowhammer", model, att, held), "unknown attack 'rowhammer'"),
        (lambda: sec.fault_campaign(model, held, "fp32", [0.0], 2), "(0, 1)"),
        (lambda: sec.fault_campaign(model, held, "fp32", [1.0], 2), "(0, 1)"),
        (lambda: sec.fault_campaign(model, held, "fp32", [1e-6], 0), "number of trials"),
        (lambda: sec.progressive_bit_search(model, att, held, cfg=sec.AttackConfig(max_flips=0)),
         "flip budget"),
        (lambda: sec.run_attack("bfa", model, att, held, cfg=sec.AttackConfig(max_flips=-3)), "flip budget"),
        (lambda: sec.collapse_share(model, held, "int8", weights=[s.name for s in lm.inventory] + [norm]),
         "int8 needs a 2-D"),
        (lambda: sec.collapse_share(model, held, "bf16"), "load the model with dtype='bfloat16'"),
        (lambda: sec.collapse_share(model, held, "fp32", bits="nibble"), "unknown bit class"),
        (lambda: sec.fault_campaign(model, held, "int8", [1e-6], 2, guard=sec.Guard("bounded", {})),
         "protection 'bounded'"),
        (lambda: sec.fault_campaign(model, held, "fp32", [1e-6], 2, guard=sec.Guard("tmr", {})),
         "unknown protection 'tmr'"),
        (lambda: sec.pgd_attack(model, att, {lm.inventory[0].name: torch.tensor([0])}, [0.0]), "budget"),
        (lambda: sec.pgd_attack(model, att, {lm.inventory[0].name: torch.tensor([0])}, [0.1], radius="l2"),
         "unknown L-infinity radius"),
    ]
    for fn, msg in cases:
        with pytest.raises(EsaError, match=None) as e:
            fn()
        assert msg in str(e.value), (msg, str(e.value))
        assert "\n" not in str(e.value)
        assert weights_hash(model) == h0


def test_bfa_ranking_on_the_device_finds_the_same_candidates(trained, monkeypatch):
    """The GPU path (every bit ranked on the device, one read after the backward) against the CPU path (host
    reads and the exact early stop): the same weight, bit and gain per matrix, guard and target set included."""
    from esa.apps.security import bfa

    lm, _, att = trained
    names = [s.name for s in lm.inventory]
    for fmt in ("int8", "fp32"):
        with sec.stored(lm.model, fmt) as store:
            bits = store.fmt.positions("bounded")
            space = {n: None for n in store.names} | {names[4]: torch.arange(0, 400, 3)}
            guard = make_guard("ecc", {names[2]: torch.arange(0, 50)}, store.fmt, lm.inventory)
            host, _ = bfa._in_layer(store, att, space, bits, guard)
            monkeypatch.setattr(bfa, "host_reads_are_free", lambda device: False)
            dev, _ = bfa._in_layer(store, att, space, bits, guard)
            monkeypatch.undo()
            key = {c.name: (c.index, c.bit) for c in host}
            assert {c.name: (c.index, c.bit) for c in dev} == key and len(key) == len(store.names)
            assert [c.gain for c in sorted(dev, key=lambda c: c.name)] == pytest.approx(
                [c.gain for c in sorted(host, key=lambda c: c.name)], rel=1e-12)
