"""The runner gives a notebook as many GPUs as its memory plan needs (esa.phases.memplan), not one each."""

from __future__ import annotations

import os

from esa.runner import driver, executors, task


def test_gpu_pool_hands_out_the_lowest_free_ids_and_takes_them_back():
    pool = executors.GpuPool(["0", "1", "2", "3"])
    a = pool.take(3)
    assert a == ["0", "1", "2"] and pool.take(2) is None  # one left: a two-GPU task waits
    b = pool.take(1)
    assert b == ["3"] and pool.take(1) is None
    pool.give(a)
    assert pool.take(2) == ["0", "1"] and pool.free == ["2"]


def test_an_8b_extended_notebook_is_planned_on_several_gpus(monkeypatch):
    # make_plan sets it; setenv (not delenv, which records nothing when the variable is absent) restores it
    monkeypatch.setenv("ESA_PARAMS_DIR", str(driver.REPO_ROOT / "params"))
    monkeypatch.setattr(executors, "visible_gpus", lambda: ["0", "1", "2", "3"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    plan = driver.make_plan(driver.RunConfig(profile="extended", only=["phase2_week1_metric_validation"],
                                             models=["llama-3.1-8b"], with_deps=False))
    (item,) = plan.items
    # hutchinson_diag's double backward at 2048 tokens does not fit one 80 GiB GPU (the dry run prints it)
    assert item.task.gpus >= 2
    small = driver.make_plan(driver.RunConfig(profile="extended", only=["phase2_week1_metric_validation"],
                                              models=["tiny-llama"], with_deps=False))
    assert small.items[0].task.gpus == 1


def test_cpu_machine_plans_no_gpus(monkeypatch):
    monkeypatch.setenv("ESA_PARAMS_DIR", str(driver.REPO_ROOT / "params"))
    monkeypatch.setattr(executors, "visible_gpus", lambda: [])
    plan = driver.make_plan(driver.RunConfig(profile="extended", only=["phase2_week1_metric_validation"],
                                             models=["llama-3.1-8b"], with_deps=False))
    assert plan.items[0].task.gpus == 1  # nothing planned (and nothing to hand out)


def test_the_task_kernel_sees_exactly_its_gpus(monkeypatch, tmp_path):
    seen = {}

    def fake_execute(*a, **k):
        seen["cvd"] = os.environ.get("CUDA_VISIBLE_DEVICES")

    monkeypatch.setattr(task.nbrun, "write_input", lambda *a, **k: None)
    monkeypatch.setattr(task.nbrun, "execute", fake_execute)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    monkeypatch.setenv("ESA_PARAMS_DIR", str(tmp_path))  # run_task sets both: restored after the test
    t = task.Task("nb", "t", 2, 1, "nb.py", str(tmp_path), str(tmp_path), str(tmp_path), "esa", {}, "k",
                  gpus=2, gpu_ids=["2", "3"])
    stamp = task.run_task(t.as_dict())
    assert seen["cvd"] == "2,3" and stamp["cuda_visible_devices"] == "2,3"


def test_a_phase5_notebook_gets_the_gpus_of_its_studys_passes_at_8b(monkeypatch):
    """The runner plans a Phase 5 notebook with its study's passes (esa.phases.memplan.gpus_for), on the meta
    device at Llama-3.1-8B's shape: a fine-tuning notebook needs the GPUs of full fine-tuning's fp32 AdamW step,
    the pruning, security and interpretability ones fit one GPU. One metric that fits one GPU is scored."""
    monkeypatch.setenv("ESA_PARAMS_DIR", str(driver.REPO_ROOT / "params"))
    monkeypatch.setattr(executors, "visible_gpus", lambda: ["0", "1", "2", "3"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from esa.params import load_profile
    from esa.phases import memplan
    from esa.recipes import Recipe

    prof = load_profile("extended", {"metrics": ["grad_x_weight"]})
    recipe = Recipe.of(prof)
    rows, _ = memplan.rows_of("llama-3.1-8b", recipe, prof, studies=("finetune",))
    by_pass = {r.pass_name: r for r in rows}
    assert {"gradient", "finetune_sparse", "finetune_lora", "finetune_full"} <= set(by_pass)
    assert by_pass["finetune_full"].gpus == 3 and by_pass["finetune_full"].estimate.autocast  # ~150 GiB
    assert by_pass["gradient"].gpus == 1
    assert memplan.gpus_for(["llama-3.1-8b"], recipe, profile=prof) == 1  # scoring alone
    need = {s: memplan.gpus_for(["llama-3.1-8b"], recipe, profile=prof, study=s) for s in memplan.STUDIES}
    assert need == {"prune": 1, "finetune": 3, "security": 1, "interpret": 1}, need
    plan = driver.make_plan(driver.RunConfig(profile="extended", overrides={"metrics": ["grad_x_weight"]},
                                             only=["phase5_week13_finetune", "phase5_week14_security"],
                                             models=["llama-3.1-8b"], with_deps=False))
    assert {i.entry.id: i.task.gpus for i in plan.items} == {"phase5_week13_finetune": 3,
                                                             "phase5_week14_security": 1}
