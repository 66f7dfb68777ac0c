"""esa-runner's loading flags (--device-map, --max-memory, --attn, --revision) and the one placement rule:
bad values are one line naming what is accepted, before anything loads; a folder honours the flags; an
explicit --device wins over a params file's device_map, and --device with --device-map is refused."""

from __future__ import annotations

import logging

import pytest

from esa import cli
from esa.models import load, tiny_tokenizer
from esa.models.loader import parse_max_memory, placement
from esa.params import ModelParams
from esa.phases import command


@pytest.mark.parametrize("argv, says", [
    (["--attn", "flash"], "unknown attention kernel 'flash'; accepted: eager, sdpa"),
    (["--device-map", "everywhere"], "accepted: auto, balanced, balanced_low_0, sequential"),
    (["--device-map", "auto", "--max-memory", "0=70G"], "bad --max-memory entry '0=70G'"),
    (["--max-memory", "0=70GiB"], "--max-memory budgets a device map; add --device-map"),
    (["--device", "cpu", "--device-map", "auto"], "--device cpu and --device-map auto both place the model"),
    (["--revision", "main"], "--revision picks a version of a hub id; 'tiny-llama' is not one"),
])
def test_bad_loading_flags_are_one_line_before_any_work(argv, says, capsys, monkeypatch):
    monkeypatch.setattr(command, "load_model", lambda cmd: pytest.fail("loaded a model"))
    assert cli.main(["--model", "tiny-llama", "--dry-run", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1


def test_max_memory_parses_gpu_numbers_cpu_and_disk():
    assert parse_max_memory("0=70GiB, 1=70GiB,cpu=200GiB,disk=1TB") == {0: "70GiB", 1: "70GiB", "cpu": "200GiB",
                                                                        "disk": "1TB"}


def test_device_wins_over_a_params_device_map_and_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="esa.models.loader"):
        assert placement("cpu", None, "auto", "params/models/x.yaml") == ("cpu", None)
    assert "--device cpu wins over device_map 'auto' of params/models/x.yaml" in caplog.text
    assert placement(None, None, "auto", "") == (None, "auto")  # no flag: the params file's map
    assert placement(None, "sequential", "auto", "") == (None, "sequential")  # the flag's map


def test_device_flag_places_a_configured_model_whole(monkeypatch):
    """A params file that sets device_map: --device puts the whole model on that device (no accelerate map)."""
    import esa.recipes as R

    monkeypatch.setattr(R, "model_params", lambda name: ModelParams(name=name, ref="tiny-llama", device_map="auto"))
    assert hasattr(R.load_configured("x").model, "hf_device_map")  # the params file's map, without --device
    assert not hasattr(R.load_configured("x", device="cpu").model, "hf_device_map")


def test_a_local_folder_honours_device_map_max_memory_and_attn(tmp_path):
    folder = tmp_path / "model"
    load("tiny-llama", device="cpu").model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    args = cli.build_parser().parse_args(["--model", str(folder), "--device-map", "auto", "--max-memory",
                                          "cpu=150KB", "--attn", "eager"])
    cmd = cli.resolve(args)
    assert (cmd.device_map, cmd.max_memory, cmd.attn) == ("auto", {"cpu": "150KB"}, "eager")
    lm = command.load_model(cmd)
    assert set(lm.model.hf_device_map.values()) == {"cpu", "disk"}  # the budget split it
    assert lm.model.config._attn_implementation == "eager"
    cmd = cli.resolve(cli.build_parser().parse_args(["--model", str(folder)]))
    lm = command.load_model(cmd)  # no flags: one device, sdpa (Recipe.load's default)
    assert not hasattr(lm.model, "hf_device_map") and lm.model.config._attn_implementation == "sdpa"
