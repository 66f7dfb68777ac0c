"""One loader for every kind of model reference.

`load(ref)` accepts an embedded name (`smollm2-135m`, `gemma3-270m`, `qwen2.5-coder-0.5b`), a tiny test model (`tiny-llama`,
...), a path to a `.gguf` file, a local model folder, or a hub id. GGUF weights are dequantised once
and cached as safetensors under a content key, so later loads take seconds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import mmap
import os
import re
import struct
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import xxhash

from esa.dispatch import check_device, default_offload_folder, dispatch, input_device
from esa.errors import EsaError, unknown
from esa.models import embedded, micro, tiny
from esa.models.inventory import KINDS, WeightSpec, weight_inventory
from esa.store import cache_dir, cache_root, cached, content_key, structure_problem

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise unknown("dtype", dtype, DTYPES)
    return DTYPES[dtype]


# --device-map strings accelerate understands; --attn kernels every pass here can run (the double backward
# switches SDPA to its math kernel; eager is for readers of attention probabilities)
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
ATTN_KERNELS = ("sdpa", "eager")
_SIZE = re.compile(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$")


def check_device_map(value: str | None) -> str | None:
    if value is not None and value not in DEVICE_MAPS:
        raise unknown("device map", value, DEVICE_MAPS)
    return value


def check_attn(value: str | None) -> str | None:
    if value is not None and value not in ATTN_KERNELS:
        raise unknown("attention kernel", value, ATTN_KERNELS)
    return value


def parse_max_memory(text: str | None) -> dict[int | str, str] | None:
    """`0=70GiB,1=70GiB,cpu=200GiB` -> {0: '70GiB', 1: '70GiB', 'cpu': '200GiB'} (accelerate's max_memory)."""
    if text is None:
        return None
    out: dict[int | str, str] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        key, _, size = part.partition("=")
        key, size = key.strip(), size.strip()
        if not (key.isdigit() or key in ("cpu", "disk")) or not _SIZE.match(size):
            raise EsaError(f"bad --max-memory entry {part!r}; accepted: comma list of DEVICE=SIZE with DEVICE a GPU "
                           "number, cpu or disk and SIZE like 70GiB or 500MB (e.g. 0=70GiB,1=70GiB,cpu=200GiB)")
        out[int(key) if key.isdigit() else key] = size
    if not out:
        raise EsaError("--max-memory is empty; accepted: DEVICE=SIZE pairs, e.g. 0=70GiB,1=70GiB")
    return out


def is_hub_ref(ref: str) -> bool:
    """A hub id (org/name) that is not a local folder, a tiny/micro/embedded name or a .gguf file."""
    return (_looks_like_hub_id(ref) and not Path(ref).exists() and ref not in tiny.TINY_CONFIGS
            and not micro.is_micro(ref) and ref not in embedded.EMBEDDED)


def placement(device: str | None, device_map: str | None, configured_map: str | None,
              where: str) -> tuple[str | None, str | None]:
    """(device, device_map) under one rule: --device and --device-map together are refused; an explicit
    --device wins over the device_map a params file (`where`) sets, and says so in the log; otherwise the
    flag's device map, else the params file's."""
    if device is not None and device_map is not None:
        raise EsaError(f"--device {device} and --device-map {device_map} both place the model; give one of them")
    if device is not None:
        if configured_map is not None:
            log.warning("--device %s wins over device_map %r of %s: the whole model goes to %s",
                        device, configured_map, where, device)
        return device, None
    return None, device_map if device_map is not None else configured_map


def known_models() -> list[str]:
    return sorted(embedded.EMBEDDED) + sorted(tiny.TINY_CONFIGS) + sorted(micro.MICRO_SUITE)


# Published dimensions of the hub models the profiles name, for when their config is not in the local
# Hugging Face cache (what the inventory needs; embeddings and the LM head are not studied, so the
# vocabulary only sizes them). Same shapes as tests/bench/gpu_check.py's "llama-8b".
_PYTHIA = dict(vocab_size=50304, use_parallel_residual=True)
PUBLISHED: dict[str, tuple[str, dict[str, Any]]] = {
    "meta-llama/Llama-3.1-8B": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                              num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)),
    "mistralai/Mistral-7B-v0.3": ("mistral", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                                  num_attention_heads=32, num_key_value_heads=8, vocab_size=32768)),
    "mistralai/Mixtral-8x7B-v0.1": ("mixtral", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                                    num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                                                    num_local_experts=8, num_experts_per_tok=2)),
    "microsoft/Phi-3-mini-4k-instruct": ("phi3", dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                                                      num_attention_heads=32, num_key_value_heads=32,
                                                      vocab_size=32064)),
    **{f"EleutherAI/pythia-{size}": ("gpt_neox", dict(hidden_size=h, intermediate_size=4 * h, num_hidden_layers=n,
                                                      num_attention_heads=a, **_PYTHIA))
       for size, h, n, a in [("14m", 128, 6, 4), ("70m", 512, 6, 8), ("160m", 768, 12, 12),
                             ("410m", 1024, 24, 16), ("1b", 2048, 16, 8), ("1.4b", 2048, 24, 16)]},
}


def inventory_without_weights(ref: str) -> list[WeightSpec] | None:
    """The weights under study of model reference `ref` (as `load` takes it), from its config alone: the
    model is built on the meta device, so no weight is read, nothing is downloaded and no memory is taken.

    Known references, in `load`'s order (`shape_source`): a tiny test model and a micro-suite model (their
    own configs), an embedded model (its dequantised folder when cached, else its GGUF header), a `.gguf`
    file (its header), a local folder with a config.json, a hub id whose config is in the local Hugging Face
    cache, else one of the hub models whose published dimensions are recorded here (`PUBLISHED`).
    None for every other reference: a hub id neither cached nor published (offline its config cannot be
    read, online reading it is a download), a path that does not exist, or a folder without config.json;
    and None wherever the config cannot be built (an embedded model not installed, an unreadable file, an
    unknown architecture): `load` is the one to say what is wrong. A params/models name is resolved to its
    reference by the caller (esa.params is a layer above this one).
    """
    try:
        source = shape_source(ref)
        return None if source is None else meta_inventory(source[1]())
    except (OSError, ValueError, KeyError, ImportError, EsaError):
        return None


def shape_source(ref: str) -> tuple[str, Callable[[], Any]] | None:
    """(where the shape comes from, a function building its transformers config) of the references that
    `inventory_without_weights` knows, None for the others; the config is built only when called."""
    if ref in tiny.TINY_CONFIGS:
        return "tiny config", tiny.TINY_CONFIGS[ref]
    if micro.is_micro(ref):
        spec = micro.MICRO_SUITE[micro.parse_ref(ref)[0]]
        return "micro-suite config", lambda: micro.build_config(spec)
    if ref in embedded.EMBEDDED:
        return "embedded GGUF", lambda: _embedded_config(ref)
    if ref.endswith(".gguf") and Path(ref).is_file():
        return "GGUF header", lambda: _gguf_config(Path(ref))
    if Path(ref).is_dir() and (Path(ref) / "config.json").is_file():
        return "local folder", lambda: _auto_config(ref)
    local = _hub_config(ref)
    if local is not None:
        return "local HF cache config", lambda: local
    if ref in PUBLISHED:
        arch, kw = PUBLISHED[ref]
        return "published shape", lambda: _published(arch, kw)
    return None


def meta_inventory(config: Any) -> list[WeightSpec]:
    """The weight inventory of a model built from `config` on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return weight_inventory(model)


def _auto_config(path: str) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def _gguf_config(gguf: Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def _embedded_config(ref: str) -> Any:
    """An embedded model's config: from its dequantised folder when one is cached (instant), else the GGUF."""
    gguf = embedded.gguf_path(ref)
    for folder in sorted((cache_root() / "models").glob(f"{gguf.stem}-*")):
        if (folder / "config.json").is_file() and not folder.name.startswith("."):
            return _auto_config(str(folder))
    return _gguf_config(gguf)


def _hub_config(ref: str) -> Any | None:
    """The config of a hub id from the local Hugging Face cache only (never the network), or None."""
    if not _looks_like_hub_id(ref):
        return None
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(ref, local_files_only=True)
    except (OSError, ValueError, KeyError):
        return None


def _published(arch: str, kw: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    return AutoConfig.for_model(arch, **kw, tie_word_embeddings=False)


@dataclass
class ModelInfo:
    """What a run needs to know about a model, and what a report prints about it."""

    ref: str
    source: str  # embedded | tiny | gguf | local | hub
    family: str  # config.model_type
    architecture: str
    n_params: int
    n_params_active: int  # per token: MoE counts only the routed experts
    n_layers: int
    hidden_size: int
    vocab_size: int
    max_positions: int
    moe: bool
    n_experts: int
    experts_per_token: int
    instruct: bool
    dtype: str
    n_weights_studied: int
    weights_by_kind: dict[str, int] = field(default_factory=dict)
    provenance: str = ""  # what reports must say about where the weights come from (e.g. quantised twice)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    info: ModelInfo
    inventory: list[WeightSpec]

    @property
    def device(self) -> torch.device:
        """Where inputs go: the input embedding's execution device (also right for a dispatched model)."""
        return input_device(self.model)


def load(
    ref: str,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = None,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[Any, str] | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    seed: int = 0,
    attn_implementation: str | None = None,
    offload_folder: str | Path | None = None,
) -> LoadedModel:
    """Load a model and its tokenizer, in eval mode, with gradients off for every parameter.

    `device_map`/`max_memory` are passed to accelerate for models too big for one device; otherwise
    the model is moved to `device` (default: cuda if available, else cpu). Blocks mapped to "disk" go to
    `offload_folder` (default: a fresh folder under the cache). Tiny and micro models, which are built
    rather than loaded, are dispatched the same way (esa.dispatch); see esa.dispatch for which passes
    can use offloaded weights.
    """
    torch_dtype = parse_dtype(dtype)
    t0 = time.perf_counter()
    hf_kwargs: dict[str, Any] = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code)
    if attn_implementation:
        hf_kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        hf_kwargs.update(device_map=device_map, max_memory=max_memory)
        may_offload = isinstance(device_map, str) and max_memory is not None or (
            isinstance(device_map, dict) and "disk" in device_map.values())
        if offload_folder is None and may_offload:
            offload_folder = default_offload_folder()
        if offload_folder is not None:
            hf_kwargs["offload_folder"] = str(offload_folder)

    if ref in tiny.TINY_CONFIGS:
        model = tiny.tiny_model(ref, seed=seed, dtype=torch_dtype, attn_implementation=attn_implementation or "eager")
        tokenizer, source = tiny.tiny_tokenizer(), "tiny"
    elif micro.is_micro(ref):  # trained here on first use, then cached (esa.models.micro)
        model, tokenizer = micro.load_micro(ref, dtype=torch_dtype, seed=seed,
                                            attn_implementation=attn_implementation or "eager")
        source = "micro"
    elif ref in embedded.EMBEDDED:
        folder = _dequantised_folder(embedded.gguf_path(ref))
        model, tokenizer = _from_pretrained(str(folder), hf_kwargs)
        source = "embedded"
    elif ref.endswith(".gguf"):
        if not Path(ref).is_file():
            raise EsaError(f"GGUF file {ref!r} does not exist")
        folder = _dequantised_folder(Path(ref))
        model, tokenizer = _from_pretrained(str(folder), hf_kwargs)
        source = "gguf"
    elif Path(ref).is_dir():
        _check_model_folder(Path(ref))
        model, tokenizer = _from_pretrained(ref, hf_kwargs, revision=revision)
        source = "local"
    elif _looks_like_hub_id(ref):
        model, tokenizer = _from_hub(ref, hf_kwargs, revision)
        source = "hub"
    else:
        raise EsaError(
            f"unknown model {ref!r}; embedded and test models: {', '.join(known_models())}. "
            "A hub id (org/name) needs network access or a local copy; a local folder or .gguf path must exist."
        )

    if device_map is not None and source in ("tiny", "micro"):
        model = dispatch(model, device_map, max_memory, offload_folder)
    if device_map is None:
        dev = check_device(device)
        model.to(dev)
    model.eval()
    model.requires_grad_(False)
    info = describe(model, ref, source)
    log.info("loaded %s (%s, %.1fM params) in %.1fs", ref, source, info.n_params / 1e6, time.perf_counter() - t0)
    return LoadedModel(model, tokenizer, info, weight_inventory(model))


# model -> (the in-place version of each tensor when hashed, digest): weakly keyed, so a digest goes with its model
_DIGESTS: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple[int, ...], str]] = weakref.WeakKeyDictionary()


def weights_digest(model: torch.nn.Module) -> str | None:
    """xxh3-128 over every parameter's and buffer's name, dtype, shape and raw bytes: the model's content,
    whatever name, id or path it was reached by (buffers carry config-derived tensors such as RoPE's
    inverse frequencies). Cached per model and recomputed when a tensor's in-place version counter moved
    (an optimizer step); writes through `.data` (esa.perturb.apply) are restored bit-exactly by their
    callers. Hashes on the host: a GPU model's tensors are copied once per tensor, not kept. None when a
    tensor is offloaded (meta device): its bytes are not where they can be read cheaply."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    versions = tuple(t._version for _, t in tensors)
    hit = _DIGESTS.get(model)
    if hit is not None and hit[0] == versions:
        return hit[1]
    h = xxhash.xxh3_128()
    for name, t in tensors:
        if t.device.type == "meta":
            return None
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        raw = t.detach().contiguous().reshape(-1).cpu()
        h.update(raw.view(torch.uint8).numpy() if raw.numel() else b"")
    digest = h.hexdigest()
    _DIGESTS[model] = (versions, digest)
    return digest


def _looks_like_hub_id(ref: str) -> bool:
    parts = ref.split("/")
    return len(parts) == 2 and all(parts) and not ref.startswith((".", "/"))


def _from_pretrained(path: str, hf_kwargs: dict[str, Any], revision: str | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(hf_kwargs)
    if revision:
        kw["revision"] = revision
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=None, **kw)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=hf_kwargs.get("trust_remote_code", False))
    return model, tokenizer


def _from_hub(ref: str, hf_kwargs: dict[str, Any], revision: str | None):
    try:
        return _from_pretrained(ref, hf_kwargs, revision)
    except OSError as e:  # transformers raises OSError for unreachable / unknown repos
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise EsaError(
            f"could not load hub model {ref!r}: {str(e).splitlines()[0]}. Hub ids need network access"
            f"{' (HF_HUB_OFFLINE=1 is set)' if offline else ''} or a local copy in the Hugging Face cache; "
            f"offline, use an embedded model ({', '.join(sorted(embedded.EMBEDDED))}), a local folder, or a .gguf file."
        ) from e


def _dequantised_folder(gguf: Path) -> Path:
    """Dequantise a GGUF once into a safetensors folder keyed by the file's identity and library version.

    The folder is an esa.store cache entry: sealed with the size and SHA-256 of its files, checked
    (sizes, safetensors headers) on every load, and quarantined and rebuilt when damaged. Folders from
    before manifests existed are adopted by their `complete` marker.
    """
    import transformers

    st = gguf.stat()
    key = content_key({"gguf": gguf.name, "size": st.st_size, "transformers": transformers.__version__})
    folder = cache_dir("models") / f"{gguf.stem}-{key}"
    # store.cached builds into a per-process temporary folder and renames it into place: parallel
    # workers (run_all --jobs) may dequantise the same file at once, and a crash leaves nothing read back.
    return cached(folder, lambda tmp: _dequantise(gguf, tmp), adopt="complete")


def _dequantise(gguf: Path, dest: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_gguf(gguf)
    log.warning("dequantising %s once (about 15-30 s on 2 CPU cores); cached in %s", gguf.name, dest.parent)
    with _one_parse_per_gguf():
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # transformers refuses to save a model that still carries its GGUF quantizer; the weights are plain
    # fp32 tensors by now, so detaching it is safe.
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        with contextlib.suppress(AttributeError):  # a read-only property in some versions
            model.is_quantized = False
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    (dest / "complete").write_text(gguf.name + "\n")  # what older versions of this loader look for


@contextlib.contextmanager
def _one_parse_per_gguf() -> Any:
    """Parse each GGUF once, on plain arrays, while transformers loads config, weights and tokenizer.

    transformers builds a fresh `gguf.GGUFReader` for each of the three, and the reader slices its
    `np.memmap` once per metadata item: ~10^7 memmap slices for Gemma-3's 262k-token vocabulary, whose
    subclass bookkeeping made up most of a 63 s dequantisation. The reader is read-only, so sharing one
    per file, and slicing an ndarray view of the same mapped bytes, gives the same tensors (a test checks
    the saved weights are byte-identical).
    """
    import gguf
    import numpy as np

    original = gguf.GGUFReader

    class _PlainSlices(original):  # type: ignore[misc, valid-type]
        def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> Any:
            flat = self.__dict__.get("_flat")
            if flat is None:
                flat = self._flat = self.data.view(np.ndarray)
            count = int(count)
            arr = flat[offset:offset + np.dtype(dtype).itemsize * count].view(dtype=dtype)[:count]
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    readers: dict[tuple[str, str], Any] = {}

    def shared(path: Any, mode: str = "r") -> Any:
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = _PlainSlices(path, mode)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = original


# GGUF metadata value types (gguf spec): struct formats of the scalars; 8 is a string, 9 an array.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _check_gguf(path: Path) -> None:
    """One EsaError unless `path` is a whole GGUF file: magic, metadata, tensor list, and all tensor data.

    transformers and the gguf reader fail on a truncated or random file with struct.error or a reshape
    ValueError that names neither the file nor what is wrong.
    """
    size = path.stat().st_size

    def fail(why: str) -> EsaError:
        return EsaError(f"not a complete GGUF file: {path}, {size} bytes, expected {why}")

    with path.open("rb") as fh:
        magic = fh.read(4)
        if magic != b"GGUF":
            raise fail(f"the GGUF magic b'GGUF' at its start, found {magic!r}")
        if size < 24:
            raise fail("at least 24 bytes (magic, version, tensor and metadata counts)")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                end = _gguf_data_end(buf, size)
            except ValueError as err:
                raise fail(f"a readable header: {err}") from None
    if end > size:
        raise fail(f"{end} bytes: its tensor data ends there")


def _gguf_data_end(buf: mmap.mmap, size: int) -> int:
    """Byte offset where the file's last tensor ends, from its header (ValueError saying what is wrong)."""
    import gguf  # deferred: only GGUF files need it (half a second to import)

    pos = 4

    def take(fmt: str) -> Any:
        nonlocal pos
        try:
            value = struct.unpack_from("<" + fmt, buf, pos)[0]
        except struct.error:
            raise ValueError(f"the header is cut short at byte {pos}") from None
        pos += struct.calcsize("<" + fmt)
        return value

    def skip(n: int) -> None:
        nonlocal pos
        if n > size - pos:
            raise ValueError(f"a field of {n} bytes at byte {pos} runs past the end of the file")
        pos += n

    def string() -> bytes:
        n = take("Q")
        start = pos
        skip(n)
        return bytes(buf[start:pos])

    def value(kind: int) -> Any:
        if kind == 8:
            return string()
        if kind == 9:
            item, n = take("I"), take("Q")
            if item in _GGUF_SCALARS:  # numeric arrays (token scores, types) are skipped, not read
                skip(n * struct.calcsize(_GGUF_SCALARS[item]))
            else:
                for _ in range(n):
                    value(item)
            return None
        if kind not in _GGUF_SCALARS:
            raise ValueError(f"unknown metadata value type {kind} at byte {pos}")
        return take(_GGUF_SCALARS[kind])

    version = take("I")
    if version < 2:
        raise ValueError(f"GGUF version {version} (only 2 and later are read)")
    n_tensors, n_kv = take("Q"), take("Q")
    if (n_tensors + n_kv) * 12 > size:  # every entry takes at least 12 bytes
        raise ValueError(f"its header lists {n_kv} metadata entries and {n_tensors} tensors, more than fit")
    alignment = 32
    for _ in range(n_kv):
        key, kind = string(), take("I")
        v = value(kind)
        if key == b"general.alignment" and isinstance(v, int) and v > 0:
            alignment = v
    end = 0
    for _ in range(n_tensors):
        string()
        n_dims = take("I")
        if n_dims > 8:
            raise ValueError(f"a tensor with {n_dims} dimensions")
        dims = [take("Q") for _ in range(n_dims)]
        kind, offset = take("I"), take("Q")
        try:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            raise ValueError(f"unknown tensor type {kind}") from None
        end = max(end, offset + math.prod(dims) // block * type_size)
    data_start = -(-pos // alignment) * alignment
    return data_start + end


# A loadable local folder: its config, its weights in one of these layouts, and a tokenizer.
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def check_local_model(ref: str) -> None:
    """Refuse, before any work, a local model folder that cannot be loaded (files missing or damaged, weights
    only as pickles); any other reference passes (it is checked when loaded)."""
    if Path(ref).is_dir():
        _check_model_folder(Path(ref))


def _check_model_folder(folder: Path) -> None:
    """One EsaError naming what a local model folder lacks (or which weight file is damaged)."""
    present = sorted(p.name for p in folder.iterdir())
    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    weights = [folder / n for n in _WEIGHT_FILES if (folder / n).is_file()]
    for index in [w for w in weights if w.name.endswith(".index.json")]:
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as err:
            raise EsaError(f"model folder {folder}: {index.name} is not a readable index ({err})") from None
        missing += [f"{s} (listed in {index.name})" for s in shards if not (folder / s).is_file()]
        weights += [folder / s for s in shards if (folder / s).is_file()]
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES and p.is_file())
    if pickles and not any(w.suffix == ".safetensors" for w in weights):
        raise EsaError(f"model folder {folder} holds its weights only as pickles ({', '.join(pickles[:3])}), which "
                       "are never loaded here (unpickling can run code): convert them to safetensors where you trust "
                       "them, e.g. AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR, "
                       "safe_serialization=True)")
    if not weights:
        missing.append("weights (model.safetensors, or model.safetensors.index.json and its shards)")
    if not any((folder / n).is_file() for n in _TOKENIZER_FILES):
        missing.append(f"a tokenizer ({', '.join(_TOKENIZER_FILES)})")
    if missing:
        has = ", ".join(present[:12]) + (f" and {len(present) - 12} more" if len(present) > 12 else "")
        raise EsaError(f"model folder {folder} is incomplete: missing {'; '.join(missing)}; "
                       f"it holds {has or 'nothing (empty)'}")
    for path in [folder / "config.json", *weights]:
        problem = structure_problem(path)
        if problem:
            raise EsaError(f"model folder {folder}: {path.name} is damaged: {problem}")


def describe(model: torch.nn.Module, ref: str, source: str) -> ModelInfo:
    cfg = model.config
    inventory = weight_inventory(model)
    n_params = sum(p.numel() for p in model.parameters())
    n_experts = int(getattr(cfg, "num_local_experts", 0) or getattr(cfg, "num_experts", 0) or 0)
    per_tok = int(getattr(cfg, "num_experts_per_tok", 0) or 0)
    active = n_params
    if n_experts and per_tok:
        expert_params = sum(s.numel for s in inventory if s.kind == "expert")
        active = n_params - expert_params + expert_params * per_tok // n_experts
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    by_kind = {k: sum(s.numel for s in inventory if s.kind == k) for k in KINDS}
    lowered = ref.lower()
    name_or_path = str(getattr(cfg, "_name_or_path", "")).lower()
    instruct = ref in embedded.EMBEDDED and embedded.EMBEDDED[ref].instruct or any(
        t in lowered or t in name_or_path for t in ("instruct", "-it", "chat")
    )
    return ModelInfo(
        ref=ref,
        source=source,
        family=cfg.model_type,
        architecture=type(model).__name__,
        n_params=n_params,
        n_params_active=active,
        n_layers=int(text_cfg.num_hidden_layers),
        hidden_size=int(text_cfg.hidden_size),
        vocab_size=int(text_cfg.vocab_size),
        max_positions=int(getattr(text_cfg, "max_position_embeddings", 0) or 0),
        moe=bool(n_experts),
        n_experts=n_experts,
        experts_per_token=per_tok,
        instruct=bool(instruct),
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
        n_weights_studied=sum(s.numel for s in inventory),
        provenance=embedded.EMBEDDED[ref].provenance if ref in embedded.EMBEDDED else "",
        weights_by_kind={k: v for k, v in by_kind.items() if v},
    )
