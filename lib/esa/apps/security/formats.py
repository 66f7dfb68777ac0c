"""Storage formats, so that every flip is a real bit of a real stored value, applied in place, undone exactly.

`FORMATS` holds one `StorageFormat` per name:
- `bf16`, `fp16`, `fp32`: the parameter *as stored*: the model must hold the weights in that dtype (load it
  with `dtype=...`); a flip XORs one bit of the IEEE pattern (esa.perturb.ops.flip_bits).
- `int8`: simulated symmetric int8 with one scale per output channel (row; per (expert, row) for stacked
  3-D expert weights): scale = max|w_row| / 127, code = round(w / scale) clamped to [-127, 127], stored
  as two's complement. A flip XORs one bit of the code; the weight becomes code' * scale. While a `Store`
  is open the model holds the dequantised values (the int8 model is the baseline), and the original
  weights come back bit-exactly when it closes. Memory: the codes (1 byte per weight) and one backup of
  the studied weights, kept on the CPU.

Bit classes name the bits a flip may touch. Floats: esa.perturb.ops's `any`, `exponent`, `sign`,
`msb-exponent`, `lsb-exponent`, plus `mantissa` and `bounded` = sign + mantissa + exponent LSB, the bits
whose flip cannot overflow (|w| at most doubles, or changes sign). int8: `any`, `msb` (= `sign`, the
two's-complement bit worth -128), `lsb`, `magnitude` (bits 0-6); every int8 flip is bounded by the row's
range (|dw| <= 128 * scale ~ max|w_row|), so `bounded` = `any`.

A flip set is `dict[param -> (flat idx (n,) sorted unique, xor mask (n,))]`, relative to the values the
model holds when it is applied; `make_flips` builds one from (idx, bit) pairs (a bit listed twice cancels).
`flipped(store, flips)` applies it in place through esa.perturb.apply.overwritten and restores on exit,
also on error; the yielded `FlipStats` counts the inf/NaN values the flips produced.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from esa import memory
from esa.apps.security.common import resolve_weights
from esa.dispatch import require_resident
from esa.errors import EsaError, unknown
from esa.models.inventory import WeightSpec
from esa.perturb.apply import overwritten
from esa.perturb.ops import BIT_CHOICES, BIT_LAYOUTS, bit_positions, flip_bits
from esa.registry import Registry

FlipSet = dict[str, tuple[torch.Tensor, torch.Tensor]]  # param -> (flat idx (n,), xor mask (n,)), int64

INT8_MAX = 127  # symmetric range: -128 is reachable only by a flip


@dataclass(frozen=True)
class StorageFormat:
    name: str
    n_bits: int  # bits per stored value
    bit_classes: dict[str, tuple[int, ...]]  # class name -> bit positions (0 = least significant)
    worst: str  # the class holding the single most damaging flip (exponent MSB; int8 MSB)
    bounded: str  # the class whose flips cannot overflow: the default for attacks
    exponent: tuple[int, ...]  # exponent bits (empty for int8)
    dtype: torch.dtype | None  # the parameter dtype a float format is; None: simulated (int8)
    description: str

    def positions(self, bits: str) -> tuple[int, ...]:
        if bits not in self.bit_classes:
            raise unknown(f"bit class for format {self.name}", bits, self.bit_classes)
        return self.bit_classes[bits]

    @property
    def simulated(self) -> bool:
        return self.dtype is None


def _float_format(name: str, dtype: torch.dtype) -> StorageFormat:
    _, total, sign, (elo, ehi) = BIT_LAYOUTS[dtype]
    classes = {c: tuple(bit_positions(dtype, c)) for c in BIT_CHOICES}
    classes["mantissa"] = tuple(range(elo))
    classes["bounded"] = (*range(elo), elo, sign)  # |w| at most doubles or halves, or w changes sign
    return StorageFormat(name, total, classes, "msb-exponent", "bounded", tuple(range(elo, ehi + 1)), dtype,
                         f"{dtype} as stored (IEEE bit pattern)")


_INT8_CLASSES = {"any": tuple(range(8)), "msb": (7,), "sign": (7,), "lsb": (0,), "magnitude": tuple(range(7)),
                 "bounded": tuple(range(8))}

FORMATS: Registry[StorageFormat] = Registry("storage format", (
    _float_format("bf16", torch.bfloat16),
    _float_format("fp16", torch.float16),
    _float_format("fp32", torch.float32),
    StorageFormat("int8", 8, _INT8_CLASSES, "msb", "bounded", (), None,
                  "simulated symmetric int8, one scale per output channel (max|w|/127)"),
), base=StorageFormat, describe=lambda f: f.description)


def get_format(name: str) -> StorageFormat:
    return FORMATS.lookup(name)


@dataclass
class FlipStats:
    n_flips: int = 0  # bits flipped
    n_weights: int = 0  # weights touched
    n_changed: int = 0  # of those, how many changed bit pattern (0 only if flips cancelled)
    n_inf: int = 0  # written values that are +-inf
    n_nan: int = 0  # written values that are NaN


# ---------------------------------------------------------------- int8 quantisation
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., rows, cols) float -> (int8 codes, same shape; fp32 scales (..., rows), one per output row)."""
    wf = w.detach().float()
    scale = wf.abs().amax(dim=-1) / INT8_MAX  # (..., rows)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row keeps code 0
    codes = torch.round(wf / safe.unsqueeze(-1)).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, scale


def dequantize_int8(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return codes.float() * scales.unsqueeze(-1)


def code_step(bit: int) -> int:
    """|change of an int8 code| when bit `bit` flips: 2^b, and 128 for the sign bit."""
    return 128 if bit == 7 else 1 << bit


def _signed8(raw: torch.Tensor) -> torch.Tensor:
    """Unsigned 8-bit patterns (int64) -> the int8 two's-complement values they encode."""
    raw = raw & 0xFF
    return torch.where(raw >= 128, raw - 256, raw)


# ---------------------------------------------------------------- the store
class Store:
    """The stored representation of the weights under study, in one format (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, fmt: StorageFormat, specs: list[WeightSpec]) -> None:
        self.model = model
        self.fmt = fmt
        self.specs = {s.name: s for s in specs}
        self.names = [s.name for s in specs]
        params = dict(model.named_parameters())
        self.params = {n: params[n] for n in self.names}
        self.codes: dict[str, torch.Tensor] = {}  # int8: name -> flat int8 codes (numel,)
        self.scales: dict[str, torch.Tensor] = {}  # int8: name -> fp32 scale per channel (numel // cols,)
        self.quant_rel_error: float | None = None  # int8: sum|w - deq| / sum|w| over the studied weights

    def numel(self, name: str) -> int:
        return self.specs[name].numel

    def total_weights(self) -> int:
        return sum(self.numel(n) for n in self.names)

    def total_bits(self, bits: str = "any") -> int:
        return self.total_weights() * len(self.fmt.positions(bits))

    def _flat(self, name: str) -> torch.Tensor:
        return self.params[name].data.view(-1)

    def values(self, name: str, idx: torch.Tensor | None = None) -> torch.Tensor:
        """The weights' current values (parameter dtype), all or at flat `idx`."""
        flat = self._flat(name)
        return flat if idx is None else flat[idx.to(flat.device)]

    def raw(self, name: str, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Current stored bit patterns as unsigned int64 (n,): the IEEE pattern, or the int8 code's byte."""
        if self.fmt.simulated:
            c = self.codes[name]
            return (c if idx is None else c[idx.to(c.device)]).long() & 0xFF
        int_dtype, total, _, _ = BIT_LAYOUTS[self.fmt.dtype]
        return self.values(name, idx).view(int_dtype).long() & ((1 << total) - 1)

    def _decode8(self, name: str, codes: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        s, cols = self.scales[name], self.specs[name].cols
        if idx is None:  # every weight: broadcast the scales over rows, no index tensor
            vals = (codes.to(s.device).float().view(-1, cols) * s.unsqueeze(1)).view(-1)
        else:
            vals = codes.to(s.device).float() * s[idx.to(s.device) // cols]
        return vals.to(self.params[name].dtype)

    def flipped_values(self, name: str, idx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The values (parameter dtype) the weights at `idx` take when their stored bits are XORed."""
        if self.fmt.simulated:
            new = _signed8(self.raw(name, idx) ^ mask.to(self.codes[name].device).long())
            return self._decode8(name, new, idx)
        vals = self.values(name, idx)
        m = mask.to(vals.device).long()
        top = int(m.max()).bit_length() if m.numel() else 0
        for b in range(top):  # flip_bits flips one bit per value: one round per bit in use
            sel = ((m >> b) & 1).bool()
            if bool(sel.any()):
                vals = flip_bits(vals, torch.where(sel, torch.full_like(m, b), torch.full_like(m, -1)))
        return vals

    def delta(self, name: str, bit: int, idx: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 change of each weight's value (all, or at `idx`) if bit `bit` of its stored value flipped.

        int8: the exact step dcode * scale (the value then written is rounded to the parameter dtype); dcode
        is -2^b / +2^b for a set / clear bit b < 7, and +128 / -128 for a set / clear sign bit."""
        if self.fmt.simulated:
            c = self.codes[name]
            c = (c if idx is None else c[idx.to(c.device)]).to(torch.int16)  # int16: no 8-byte temporaries
            on = (c >> bit) & 1  # arithmetic shift of the signed code: bit 7 of the byte is the sign
            dcode = (2 * on - 1) * 128 if bit == 7 else (1 - 2 * on) * (1 << bit)
            s, cols = self.scales[name], self.specs[name].cols
            if idx is None:
                return (dcode.view(-1, cols).float() * s.unsqueeze(1)).view(-1)
            return dcode.float() * s[idx.to(s.device) // cols]
        old = self.values(name, idx)
        new = flip_bits(old, torch.full(old.shape, bit, dtype=torch.long, device=old.device))
        return new.float() - old.float()

    def gain_bound(self, name: str, grad: torch.Tensor, idx: torch.Tensor | None = None) -> float:
        """U such that flipping bit b of any of these weights (all, or at `idx`; `grad` (n,) matches them)
        changes the first-order loss by at most U * step_bound(b): int8 U = max|g * scale|; floats
        U = max|g| * max(|w|, smallest normal) (a subnormal steps like the smallest normal)."""
        if self.fmt.simulated:
            s, cols = self.scales[name], self.specs[name].cols
            if idx is None:
                return float((grad.view(-1, cols).abs() * s.unsqueeze(1).to(grad.device)).max())
            return float((grad.abs() * s[idx.to(s.device) // cols].to(grad.device)).max())
        w = self.values(name, idx).float().abs().clamp(min=torch.finfo(self.fmt.dtype).tiny)
        return float((grad.abs() * w.to(grad.device)).max())

    def step_bound(self, bit: int) -> float:
        """max |dw| / unit for a flip of `bit` (see gain_bound); inf where no bound holds (exponent bits
        above the LSB). int8: the code step. Floats: sign 2 |w|, exponent LSB |w| (doubling or halving),
        mantissa bit b 2^(b - mantissa bits) |w|."""
        if self.fmt.simulated:
            return float(code_step(bit))
        _, _, sign, (elo, _) = BIT_LAYOUTS[self.fmt.dtype]
        if bit == sign:
            return 2.0
        if bit == elo:
            return 1.0
        return 2.0 ** (bit - elo) if bit < elo else math.inf

    def info(self) -> dict[str, object]:
        return dict(format=self.fmt.name, description=self.fmt.description, n_params=len(self.names),
                    n_weights=self.total_weights(), n_bits=self.total_bits(),
                    quant_rel_error=self.quant_rel_error)


def _check_quantisable(name: str, p: torch.Tensor) -> None:
    if not p.is_floating_point() or p.dim() not in (2, 3):
        raise EsaError(f"int8 needs a 2-D (or expert-stacked 3-D) floating weight; {name} is "
                       f"{p.dim()}-D {p.dtype} with shape {tuple(p.shape)}")


# int8 stores open now, by id(model): a nested `stored(model, "int8")` over the same weights reuses the open
# one instead of quantising again (one quantisation for a whole series of int8 analyses)
_OPEN_INT8: dict[int, list[Store]] = {}


@contextlib.contextmanager
def stored(model: torch.nn.Module, fmt: str,
           weights: Sequence[str | WeightSpec] | None = None) -> Iterator[Store]:
    """Open the studied weights (default: the weight inventory) in storage format `fmt` for the block.

    Float formats check that the model stores the weights in that dtype. int8 quantises them in place (the
    block sees the int8 model) and restores the original bits on exit, whatever happens in the block; inside
    an open int8 block over the same weights it reuses that store (nothing is quantised or restored twice)."""
    f = get_format(fmt)
    specs = resolve_weights(model, weights)
    params = dict(model.named_parameters())
    require_resident(model, [s.name for s in specs], f"storage format {fmt}")
    for s in specs:
        p = params[s.name]
        if f.simulated:
            _check_quantisable(s.name, p)
        elif p.dtype != f.dtype:
            want = str(f.dtype).removeprefix("torch.")
            other = [k for k, v in FORMATS.items() if v.dtype == p.dtype] or ["int8"]
            raise EsaError(f"format {fmt} flips the weights as stored, so they must be {f.dtype}; {s.name} "
                           f"is {p.dtype}: load the model with dtype={want!r}, or use format {other}")
        if not p.is_contiguous():
            raise EsaError(f"parameter {s.name} is not contiguous; cannot flip its bits in place")
    if f.simulated:
        names = tuple(s.name for s in specs)
        for outer in _OPEN_INT8.get(id(model), []):
            if outer.model is model and tuple(outer.names) == names:
                yield outer  # already quantised by an enclosing block: share it (its flips restore themselves)
                return
    if not f.simulated and _OPEN_INT8.get(id(model)):
        raise EsaError(f"format {fmt} flips the stored floats, but an int8 block holds this model's weights "
                       "quantised: open it outside that block")
    store = Store(model, f, specs)
    if not f.simulated:
        yield store
        return
    memory.check(model, "int8_store", 1, 1, specs)  # codes, host backup, one matrix's quantisation
    backup: list[tuple[torch.Tensor, torch.Tensor]] = []
    _OPEN_INT8.setdefault(id(model), []).append(store)
    try:
        err = tot = 0.0
        with torch.no_grad():
            for s in specs:
                p = store.params[s.name].data
                if not bool(torch.isfinite(p).all()):
                    raise EsaError(f"cannot quantise {s.name} to int8: it holds inf/NaN values")
                codes, scales = quantize_int8(p)
                deq = dequantize_int8(codes, scales).to(p.dtype)
                err += float((p.float() - deq.float()).abs().sum())
                tot += float(p.float().abs().sum())
                backup.append((p, p.detach().to("cpu", copy=True)))  # raw copy: bit-exact
                p.copy_(deq)
                store.codes[s.name] = codes.reshape(-1)
                store.scales[s.name] = scales.reshape(-1)
        store.quant_rel_error = err / tot if tot > 0 else 0.0
        yield store
    finally:
        with torch.no_grad():
            for p, raw in reversed(backup):
                p.copy_(raw.to(p.device))  # same dtype: a byte copy, so NaN payloads and -0.0 survive
        _OPEN_INT8[id(model)].remove(store)
        if not _OPEN_INT8[id(model)]:
            del _OPEN_INT8[id(model)]


# ---------------------------------------------------------------- flip sets
def _pairs_to_masks(idx: torch.Tensor, bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx, bit) pairs -> (unique idx, xor mask); a pair listed an even number of times cancels."""
    key = idx.long().cpu() * 64 + bits.long().cpu()
    u, counts = torch.unique(key, return_counts=True)
    u = u[counts % 2 == 1]
    w, b = u // 64, u % 64
    uw, inv = torch.unique(w, return_inverse=True)
    mask = torch.zeros_like(uw).scatter_add_(0, inv, torch.ones_like(b) << b)  # distinct bits: sum = or
    return uw, mask


def mask_bits(mask: torch.Tensor, idx: torch.Tensor, n_bits: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx, xor mask) -> the (idx, bit) pairs it flips, one row per flipped bit."""
    out_i, out_b = [], []
    top = min(n_bits, int(mask.max()).bit_length()) if mask.numel() else 0
    for b in range(top):
        sel = ((mask >> b) & 1).bool()
        if bool(sel.any()):
            out_i.append(idx[sel])
            out_b.append(torch.full((int(sel.sum()),), b, dtype=torch.long))
    if not out_i:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(out_i), torch.cat(out_b)


def make_flips(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> FlipSet:
    """param -> (flat idx (n,), bit (n,)) -> flip set (masks), dropping weights whose flips cancel."""
    out: FlipSet = {}
    for name, (idx, bits) in pairs.items():
        idx, bits = torch.as_tensor(idx).reshape(-1), torch.as_tensor(bits).reshape(-1)
        if idx.numel() != bits.numel():
            raise EsaError(f"flips of {name}: {idx.numel()} indices but {bits.numel()} bits")
        if idx.numel():
            u, m = _pairs_to_masks(idx, bits)
            if u.numel():
                out[name] = (u, m)
    return out


def combine(*sets: FlipSet) -> FlipSet:
    """XOR of flip sets: applying the result = applying each in turn."""
    pairs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for fs in sets:
        for name, (idx, mask) in fs.items():
            pairs.setdefault(name, []).append(mask_bits(mask, idx))
    return make_flips({n: (torch.cat([p[0] for p in v]), torch.cat([p[1] for p in v]))
                       for n, v in pairs.items()})


def n_flips(flips: FlipSet) -> int:
    return int(sum(int(popcount(m).sum()) for _, m in flips.values()))


_BYTE_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.long)


def popcount(mask: torch.Tensor) -> torch.Tensor:
    """Set bits of each (non-negative) mask, a byte at a time by table look-up."""
    m = mask.long()
    out = torch.zeros_like(m)
    top = int(m.max()).bit_length() if m.numel() else 0
    table = _BYTE_POPCOUNT.to(m.device)
    for shift in range(0, top, 8):
        out += table[(m >> shift) & 0xFF]
    return out


def check_flips(store: Store, flips: FlipSet) -> None:
    for name, (idx, mask) in flips.items():
        if name not in store.specs:
            raise EsaError(f"flip set names {name!r}, which is not among the stored weights")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= store.numel(name)):
            raise EsaError(f"flip indices of {name} out of range for shape {store.specs[name].shape}")
        if mask.numel() and int(mask.max()) >= (1 << store.fmt.n_bits):
            raise EsaError(f"flip mask of {name} names a bit beyond the {store.fmt.n_bits}-bit "
                           f"{store.fmt.name} value")


@contextlib.contextmanager
def flipped(store: Store, flips: FlipSet) -> Iterator[FlipStats]:
    """Apply `flips` to the stored weights in place for the block, then restore them bit-exactly."""
    check_flips(store, flips)
    updates: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    code_backup: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    stats = FlipStats(n_flips=n_flips(flips))
    try:
        for name, (idx, mask) in flips.items():
            if idx.numel() == 0:
                continue
            updates[name] = (idx, store.flipped_values(name, idx, mask))
            if store.fmt.simulated:
                codes = store.codes[name]
                i = idx.to(codes.device)
                code_backup.append((codes, i, codes[i].clone()))
                codes[i] = _signed8(codes[i].long() ^ mask.to(codes.device)).to(torch.int8)
        with overwritten(store.model, updates) as st:
            stats.n_weights, stats.n_changed = st.n_weights, st.n_changed
            stats.n_inf, stats.n_nan = st.n_inf, st.n_nan
            yield stats
    finally:
        for codes, i, old in reversed(code_backup):
            codes[i] = old


def describe_flips(store: Store, flips: FlipSet) -> pd.DataFrame:
    """One row per flipped bit: param, flat idx, expert, row, col, bit, bit class, value before and after."""
    rows = []
    for name, (idx, mask) in flips.items():
        spec = store.specs[name]
        i, b = mask_bits(mask, idx, store.fmt.n_bits)
        if not i.numel():
            continue
        expert, row, col = spec.unravel(i)
        before = store.values(name, i).float().cpu()
        after = store.flipped_values(name, i, torch.ones_like(b) << b).float().cpu()
        for j in range(i.numel()):
            rows.append(dict(param=name, index=int(i[j]), expert=int(expert[j]), row=int(row[j]),
                             col=int(col[j]), bit=int(b[j]), bit_class=bit_class(store.fmt, int(b[j])),
                             before=float(before[j]), after=float(after[j])))
    return pd.DataFrame(rows, columns=["param", "index", "expert", "row", "col", "bit", "bit_class", "before",
                                       "after"])


def bit_class(fmt: StorageFormat, bit: int) -> str:
    """The finest class of a bit, for tables: sign / exponent-msb / exponent / exponent-lsb / mantissa."""
    if fmt.simulated:
        return "msb" if bit == 7 else "magnitude"
    _, _, sign, (elo, ehi) = BIT_LAYOUTS[fmt.dtype]
    if bit == sign:
        return "sign"
    if bit == ehi:
        return "exponent-msb"
    if bit == elo:
        return "exponent-lsb"
    return "exponent" if elo < bit < ehi else "mantissa"


# ---------------------------------------------------------------- uniform addressing of stored bits
class BitDomain:
    """The (weight, bit) pairs a uniform draw may hit: every studied weight or a target set, x a bit class.

    Pair g addresses weight g // n_bits_class (in parameter order, then flat index) and bit
    positions[g % n_bits_class], so a uniform integer in [0, total) is a uniform stored bit."""

    def __init__(self, store: Store, bits: str = "any",
                 targets: dict[str, torch.Tensor] | None = None) -> None:
        self.store = store
        self.positions = torch.tensor(store.fmt.positions(bits), dtype=torch.long)
        self.targets = targets
        self.names = [n for n in store.names if targets is None or n in targets]
        counts = [store.numel(n) if targets is None else int(targets[n].numel()) for n in self.names]
        self.offsets = np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))])
        self.n_weights = int(self.offsets[-1])
        self.total = self.n_weights * len(self.positions)

    def locate(self, g: np.ndarray) -> FlipSet:
        """Pair indices (k,) -> the flip set that flips those stored bits."""
        g = np.asarray(g, dtype=np.int64)
        nb = len(self.positions)
        w, slot = g // nb, g % nb
        which = np.searchsorted(self.offsets, w, side="right") - 1
        pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for i in np.unique(which):
            sel = which == i
            name = self.names[int(i)]
            local = torch.from_numpy(w[sel] - self.offsets[i]).long()
            idx = local if self.targets is None else self.targets[name][local]
            pairs[name] = (idx, self.positions[torch.from_numpy(slot[sel]).long()])
        return make_flips(pairs)


def draw_distinct(rng: np.random.Generator, total: int, k: int) -> np.ndarray:
    """k distinct integers uniform over [0, total), in draw order (rejection of repeats: k << total here)."""
    if k > total:
        raise EsaError(f"cannot draw {k} distinct stored bits out of {total}")
    if k > total // 4:  # dense draw: a permutation is cheaper than rejection
        return rng.permutation(total)[:k]
    out = np.zeros(0, dtype=np.int64)
    while out.size < k:
        more = rng.integers(0, total, size=k - out.size)
        out = np.concatenate([out, more])
        _, first = np.unique(out, return_index=True)
        out = out[np.sort(first)]  # keep first occurrences, in draw order
    return out
