"""Memory guard: estimate what a pass needs before running it, and fail early with a usable message.

`estimate(model, pass_name, batch_size, seqlen)` returns a `MemoryEstimate`: a breakdown in bytes
(weights, fp32 accumulators, gradients in flight, activations, logits, Hutchinson overhead, offload
staging) in total and per device. `check(...)` compares it with the free memory of each target device
(`torch.cuda.mem_get_info` on GPUs, MemAvailable on the CPU) and raises `EsaError` naming the estimate,
what is available and concrete remedies, instead of letting the pass die with an OOM half-way.

The model of memory (bytes; b = bytes per element of the model dtype, B = batch, T = seqlen, h = hidden,
I = MLP intermediate (x experts_per_token for MoE), kv = key/value width, a = attention heads, L = layers,
V = vocab, N = studied weights, n_max = the largest studied parameter). Its factors are measured, not assumed:
tests/bench/memory_ledger.py runs every pass on the CPU allocator (esa.memtrace) for tiny-llama, SmolLM2-135M
and Qwen2.5-0.5B's shape in fp32 and bf16 and checks each estimate within +-15% (reports/bench/memory-ledger.json).
- weights: every parameter, b each (already allocated when the model is loaded: `check` then counts
  only the rest against free memory).
- accumulators: gradient metrics, Hutchinson and act_mag keep one fp32 score per studied weight: 4N.
- gradients in flight: the metrics fold each .grad into its accumulator in a post-accumulate-grad hook
  and free it at once, so at most the largest studied gradient plus its fp32 copy live: n_max (b + 4). They
  exist only once the loss's logits buffers are freed, so a backward plans the larger of the two.
- activations kept for backward (SDPA): L B T (b (4h + 4I + 2kv) + 4 (2h + a)): the linear layers' inputs
  and outputs, the RMSNorms' fp32 upcasts and SDPA's log-sum-exp; eager attention adds its (a, T, T)
  probabilities. Without backward (evaluation, act_mag, perturbation) the peak is the larger of one layer's
  working set, B T (b (4h + 3I) + 8h), and the logits phase.
- logits: evaluation holds the (B, T, V) logits and, one window at a time, their fp32 copy (bf16 only) and
  log-softmax: B T V b + T V (4 + 4 [b != 4]); a backward through the fp32 loss starts holding the
  log-softmax, its gradient and the logits' fp32 gradient: 12 B T V (the cast to the model dtype comes after
  the first two are freed); act_mag keeps the last position's logits only (its peak is its fp32 scores, built
  after the forward).
- Hutchinson (double backward, one window at a time): on top of a gradient pass, 3 N b (the create_graph
  gradients, the probe cast to the model dtype, the second backward's products), 3.5 more activation sets
  (the first backward's graph) and 30 bytes per (a, T, T) element per layer for SDPA's math kernel; all P
  int8 probes (P N) are kept between windows while that fits PROBE_CACHE_BYTES, else redrawn per window
  (layer-sequential pruning probes one block at a time: N is then one block's weights).
- perturbation: the raw-bit backup of the written weights (with their int64 index on an accelerator), at
  most a copy of each matrix (esa.perturb.apply backs up whichever is smaller).
- offload staging: accelerate loads an offloaded block's weights for its forward: the largest block.
- application passes (Phase 5; `work` gives their counts): pruning's restore backup (a copy of each matrix
  once that is cheaper than index + bits), masks, calibration inputs and per-block decision; SparseGPT's are
  counted from what its code allocates, phase by phase: the block's fp32 Hessians, then one group of matrices
  at a time either the factorisation (four (cols, cols)) or the column loop (fp32 copies and masks), then the
  writes (index, values and an int64 count per weight) and the mask set's kept values; one-shot calibration
  writes nothing and holds every block's statistics (SparseGPT: every block's Hessians) instead; a gradient
  scorer (grad_x_weight, obd, hutchinson_diag) is its gradient pass (prune_gradient, prune_hutchinson: per
  block, over the block's weights, with the restore backup held; *_one_shot: once over every pruned weight)
  plus pruning's masks, decisions and writes; sparse fine-tuning's O(k) state and LoRA's fp32
  adapters with AdamW over a frozen-weight backward (which keeps less of the Linears' inputs than a gradient
  pass), under bf16 autocast as on CUDA (`autocast`: bf16 layer outputs and casts, and an fp32 model's bf16
  weight casts), full fine-tuning's foreach AdamW step on an accelerator; the int8 store's codes and host
  backup, and the bit search's streamed gradient pass on it; an interpretability capture's forward with its
  fp32 softmax. `check` refuses them in one line naming the first setting that fits (fewer tokens per step,
  bf16, a device map over N GPUs).
On a GPU, tests/bench/gpu_check.py records the estimates next to torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Any

import torch

from esa.dispatch import execution_device
from esa.errors import EsaError, unknown
from esa.models.inventory import weight_inventory

# Saved for backward, per token per layer, measured on the CPU allocator (tests/bench/memory_ledger.py, fitted over
# tiny-llama, SmolLM2-135M and Qwen2.5-0.5B's shape in fp32 and bf16 with SDPA): elements of the model dtype per
# hidden, intermediate (x experts per token) and key/value width, plus fp32 elements per hidden (the RMSNorms'
# upcasts) and per head (SDPA's log-sum-exp)
ACT_HIDDEN = 4.0
ACT_INTER = 4.0
ACT_KV = 2.0
ACT_HIDDEN_F32 = 2.0
ACT_HEAD_F32 = 1.0
# of which the Linears' inputs that only their weights' gradients need (both RMSNorms' outputs, the MLP's
# product); a backward through frozen weights does not keep them
ACT_INPUT_HIDDEN = 2.0
ACT_INPUT_INTER = 1.0
AUTOCAST_BYTES = 2  # bf16 autocast: the Linears and SDPA compute in bf16 whatever the weights' dtype
# eager attention also keeps (a, T, T) probabilities: fp32 softmax output (+ its cast to the model dtype)
# Live elements per token inside one layer when nothing is kept for backward (evaluation, act_mag, perturbation)
EVAL_HIDDEN = 4.0
EVAL_INTER = 3.0
EVAL_HIDDEN_F32 = 2.0  # an RMSNorm's fp32 temporaries
# the double backward (hutchinson_diag) keeps, on top of a gradient pass, HVP_GRADS model-dtype copies of every
# studied weight (the create_graph gradients, the probe cast to the model dtype, the second backward's products),
# HVP_GRAPH more activation sets (the first backward's graph) and HVP_ATTN bytes per (a, T, T) element per layer
# for SDPA's math kernel (its scores, probabilities and their gradients; fp32 on the CPU whatever the dtype)
HVP_GRADS = 3.0
HVP_GRAPH = 3.5
HVP_ATTN = 30.0
HEADROOM = 0.9  # use at most this share of the free memory (allocator fragmentation, CUDA context, ...)
GIB = 1 << 30

PROBE_CACHE_BYTES = 2 << 30  # hutchinson_diag keeps all its int8 probes below this, else redraws them per window


@dataclass
class ModelShape:
    """The sizes that drive memory use, read from a model (real, dispatched or on `meta`)."""

    n_params: int
    dtype_bytes: int
    n_studied: int
    largest_studied: int
    hidden: int
    intermediate: int  # per token: MoE intermediate x experts_per_token
    layers: int
    heads: int
    vocab: int
    materialised_attention: bool  # eager attention keeps (a, T, T) probabilities in every pass
    kv: int = 0  # key/value width: kv heads x head dim (0: as hidden)
    largest_param: int = 0  # elements of the largest parameter (the embedding, usually)
    # what an application pass works on (esa.memory.estimate's `work`; 0 where a pass has none)
    written: int = 0  # pruning: weights pruned (their restore backup is held until pruning ends)
    trainable: int = 0  # sparse fine-tuning: selected weights; LoRA: adapter numbers
    windows: int = 0  # pruning: calibration windows whose block inputs are held at once
    autocast: bool = False  # a training step under bf16 autocast (esa.apps.training.loop on CUDA)
    # the first and last decoder block holding a studied weight (0 for an embedding or head weight): a backward
    # to a block's weights alone runs from the head down to that block (pruning by a gradient scorer)
    first_layer: int = 0
    last_layer: int = 0
    # decoder blocks holding a studied weight (0: every block): a backward keeps no Linear inputs in the others
    studied_layers: int = 0
    foreach: bool = False  # AdamW steps every tensor at once (its default on an accelerator, not on the CPU)

    @classmethod
    def of(cls, model: torch.nn.Module, specs: list[Any] | None = None) -> ModelShape:
        specs = weight_inventory(model) if specs is None else specs
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        hidden = int(cfg.hidden_size)
        k = int(getattr(cfg, "num_experts_per_tok", 0) or 0)
        inter = int(getattr(cfg, "moe_intermediate_size", 0) or getattr(cfg, "intermediate_size", 0) or 4 * hidden)
        attn = str(getattr(cfg, "_attn_implementation", None) or "eager")
        heads = int(cfg.num_attention_heads)
        head_dim = int(getattr(cfg, "head_dim", 0) or hidden // heads)
        p0 = next(model.parameters())
        blocks = [s.layer for s in specs]
        in_blocks = bool(blocks) and min(blocks) >= 0
        return cls(
            n_params=sum(p.numel() for p in model.parameters()),
            dtype_bytes=p0.element_size(),
            n_studied=sum(s.numel for s in specs),
            largest_studied=max((s.numel for s in specs), default=0),
            hidden=hidden,
            intermediate=inter * max(1, k),
            layers=int(cfg.num_hidden_layers),
            heads=heads,
            vocab=int(cfg.vocab_size),
            materialised_attention=attn == "eager",
            kv=int(getattr(cfg, "num_key_value_heads", 0) or heads) * head_dim,
            largest_param=max((p.numel() for p in model.parameters()), default=0),
            first_layer=min(blocks) if in_blocks else 0,
            last_layer=max(blocks) if in_blocks else 0,
            studied_layers=len(set(blocks)) if in_blocks else 0,
        )


@dataclass
class MemoryEstimate:
    pass_name: str
    batch_size: int
    seqlen: int
    components: dict[str, int]  # bytes, whole model
    per_device: dict[str, dict[str, int]] = field(default_factory=dict)  # device -> component -> bytes
    resident_weights: dict[str, int] = field(default_factory=dict)  # device -> weight bytes already allocated
    autocast: bool = False  # planned as a training step under bf16 autocast

    @property
    def total(self) -> int:
        return sum(self.components.values())

    def need(self, device: str, loaded: bool = True) -> int:
        """Bytes `device` must still find free: everything, less its weights when they are already loaded."""
        comp = self.per_device.get(device, {})
        return sum(v for k, v in comp.items() if not (loaded and k == "weights"))

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["total"] = self.total
        d["total_gib"] = round(self.total / GIB, 3)
        d["components_gib"] = {k: round(v / GIB, 3) for k, v in self.components.items()}
        return d


# ---------------------------------------------------------------- per-pass components
def _upcast(s: ModelShape) -> int:
    """Bytes per element of an fp32 copy of a model-dtype tensor: none when the model is fp32 already."""
    return 0 if s.dtype_bytes == 4 else 4


def _attn_probs(s: ModelShape, b: int, t: int, math_kernel: bool = False) -> int:
    """(a, T, T) probabilities one layer keeps: eager's fp32 softmax and its cast, or SDPA's math kernel in
    a double backward (its scores, softmax and their gradients: HVP_ATTN bytes a element)."""
    if math_kernel:
        return int(b * s.heads * t * t * HVP_ATTN)
    if not s.materialised_attention:
        return 0
    return b * s.heads * t * t * (4 + (s.dtype_bytes if s.dtype_bytes != 4 else 0))


def _activations(s: ModelShape, b: int, t: int, backward: bool) -> int:
    if backward:  # everything the layers keep for the backward pass
        per_tok = (s.dtype_bytes * (ACT_HIDDEN * s.hidden + ACT_INTER * s.intermediate + ACT_KV * (s.kv or s.hidden))
                   + 4 * (ACT_HIDDEN_F32 * s.hidden + ACT_HEAD_F32 * s.heads))
        # a block without studied weights keeps no Linear inputs (only its weights' gradients read them)
        frozen = max(0, s.layers - s.studied_layers) if s.studied_layers else 0
        inputs = s.dtype_bytes * (ACT_INPUT_HIDDEN * s.hidden + ACT_INPUT_INTER * s.intermediate)
        return int(s.layers * (b * t * per_tok + _attn_probs(s, b, t)) - frozen * b * t * inputs)
    # no graph: one layer's working set at a time
    return int(b * t * ((EVAL_HIDDEN * s.hidden + EVAL_INTER * s.intermediate) * s.dtype_bytes
                        + 4 * EVAL_HIDDEN_F32 * s.hidden) + _attn_probs(s, b, t))


def _eval_logits(s: ModelShape, b: int, t: int) -> int:
    """The (B, T, V) logits in the model dtype, then one window at a time its fp32 copy and log-softmax."""
    return b * t * s.vocab * s.dtype_bytes + t * s.vocab * (4 + _upcast(s))


def _loss_logits(s: ModelShape, b: int, t: int) -> int:
    """The backward's start through the fp32 loss: the log-softmax kept for it, the loss's gradient w.r.t. it
    and the fp32 gradient of the logits, 12 bytes each (B, T, V) element whatever the model dtype (the logits
    are not kept, and the cast of their gradient to the model dtype comes after the first two are freed)."""
    return 12 * b * t * s.vocab


def _backward_start_or_layers(s: ModelShape, b: int, t: int, in_flight: int) -> dict[str, int]:
    """On top of the graph: the loss's logits buffers at the backward's start, or what the layers' backward
    holds at once later (`in_flight`: gradients, their fp32 copies, a ranking), whichever is larger; the
    logits buffers are freed before the first layer's gradient exists."""
    logits = _loss_logits(s, b, t)
    return {"logits": logits} if logits >= in_flight else {"grads_in_flight": in_flight}


def _forward_only(s: ModelShape, b: int, t: int) -> dict[str, int]:
    # the peak is the larger of a layer's working set and the logits phase (the last hidden state and the logits)
    layer, head = _activations(s, b, t, False), _eval_logits(s, b, t) + b * t * s.hidden * s.dtype_bytes
    return {"activations": layer} if layer > head else {"activations": b * t * s.hidden * s.dtype_bytes,
                                                         "logits": _eval_logits(s, b, t)}


def _act_mag(s: ModelShape, b: int, t: int) -> dict[str, int]:
    # hooks add fp32 sums of squared inputs (tiny) to a forward that keeps the last position's logits only; the
    # scores are |W| (an fp32 copy per weight: one more per matrix while a model-dtype matrix is upcast)
    # x ||X||: they are built after the forward, so the peak is the larger of the two
    fwd = _activations(s, b, t, False) + b * s.vocab * s.dtype_bytes
    scores = 4 * s.n_studied + _upcast(s) * s.largest_studied
    return {"accumulators": scores} if scores >= fwd else {"activations": fwd}


def _gradient(s: ModelShape, b: int, t: int) -> dict[str, int]:
    return {
        "accumulators": 4 * s.n_studied,
        "activations": _activations(s, b, t, True),
        **_backward_start_or_layers(s, b, t, s.largest_studied * (s.dtype_bytes + 4)),
    }


def _grad_fused(s: ModelShape, b: int, t: int) -> dict[str, int]:
    d = _gradient(s, b, t)
    d["accumulators"] = 2 * 4 * s.n_studied  # grad_x_weight and grad_squared share the pass, not the buffers
    return d


def _hutchinson(s: ModelShape, b: int, t: int) -> dict[str, int]:
    # one window at a time (the metric's own micro-batches), whatever the batch size; the double backward's
    # peak holds the loss's buffers and a gradient in flight (Hv, v.float() and the product) at once
    d = {"accumulators": 4 * s.n_studied, "activations": _activations(s, 1, t, True),
         "logits": _loss_logits(s, 1, t), "grads_in_flight": s.largest_studied * (s.dtype_bytes + 8)}
    # create_graph: every studied gradient at once, the probe in use cast to the model dtype, and the graph of
    # the first backward (HVP_GRAPH activation sets and SDPA's math kernel's (a, T, T) buffers per layer)
    d["hutchinson"] = (int(HVP_GRADS * s.n_studied * s.dtype_bytes) + int(HVP_GRAPH * _activations(s, 1, t, True))
                       + s.layers * _attn_probs(s, 1, t, math_kernel=True))
    return d


def _linear_numel(s: ModelShape) -> int:
    """Weights of every Linear the forward runs: the decoder blocks' and the LM head."""
    return s.layers * _block_numel(s) + s.vocab * s.hidden


def _training_graph(s: ModelShape, b: int, t: int, method: str) -> dict[str, int]:
    """What one training step's forward keeps for its backward. Every method keeps the layer outputs the next
    ops save (q, the attention output, k, v, the MLP's gate, SiLU and up) in the compute dtype, the RMSNorms'
    fp32 inputs and SDPA's log-sum-exp; then what its own gradients read of the Linears' inputs
    (`_training_inputs`). Under bf16 autocast an fp32 model's Linears also keep a bf16 cast of their weight for
    the input's gradient (cached once for trained weights, made per call for frozen ones): `weight_casts`."""
    c = AUTOCAST_BYTES if s.autocast else s.dtype_bytes
    kept = (c * ((ACT_HIDDEN - ACT_INPUT_HIDDEN) * s.hidden + (ACT_INTER - ACT_INPUT_INTER) * s.intermediate
                 + ACT_KV * (s.kv or s.hidden))
            + 4 * (ACT_HIDDEN_F32 * s.hidden + ACT_HEAD_F32 * s.heads) + _training_inputs(s, method))
    out = {"activations": int(s.layers * (b * t * kept + _attn_probs(s, b, t)))}
    if s.autocast and s.dtype_bytes != AUTOCAST_BYTES:
        out["weight_casts"] = AUTOCAST_BYTES * _linear_numel(s)
    return out


def _training_inputs(s: ModelShape, method: str) -> float:
    """Bytes per token per layer kept of the Linears' inputs for a step's gradients: `full` (every weight),
    `sparse` (the sampled products of the selected weights: the hook keeps each Linear's input as it arrives),
    `lora` (the adapters: peft casts each input to the fp32 adapter's dtype first).
    Without autocast they are the two norms' outputs and the MLP's product in the model dtype (q, k and v read one
    tensor, o the attention output SDPA keeps), except LoRA on a non-fp32 model: an fp32 copy per adapted Linear
    (q, k, v, o, gate and up read h-wide inputs, down an I-wide one). Under bf16 autocast on an fp32 model each
    Linear casts its own input: full FT keeps those bf16 casts (three of the first norm's output, two of the
    second's, the product) and the norms' fp32 outputs for their own weights; the sparse hook keeps the norms'
    fp32 outputs and the bf16 product; LoRA keeps the casts of the inputs that are not bf16 yet (o reads the
    attention output SDPA keeps; down the product); on a bf16 model autocast only makes LoRA's copies bf16."""
    h, i, w = s.hidden, s.intermediate, s.dtype_bytes
    per_linear = 6 * h + i
    if method == "lora" and w != 4:
        return (AUTOCAST_BYTES if s.autocast else 4) * per_linear
    if not s.autocast or w == AUTOCAST_BYTES:
        return w * (ACT_INPUT_HIDDEN * h + ACT_INPUT_INTER * i)
    if method == "lora":
        return AUTOCAST_BYTES * (5 * h + i)
    if method == "sparse":
        return 4 * ACT_INPUT_HIDDEN * h + AUTOCAST_BYTES * ACT_INPUT_INTER * i
    return AUTOCAST_BYTES * (5 * h + i) + 4 * ACT_INPUT_HIDDEN * h


def _finetune_full(s: ModelShape, b: int, t: int) -> dict[str, int]:
    # one AdamW step of full fine-tuning (esa.apps.training, fp32 weights), with AdamW's two moments allocated.
    # The backward frees the graph as it fills the gradients, so the peak is the larger of its start (the graph,
    # the loss's logits buffers, the first (head) gradient) and the step (every gradient, and the update's
    # temporaries: the CPU steps one tensor at a time, the largest parameter's; an accelerator's foreach step
    # takes the square root of every second moment at once, an fp32 copy of every weight)
    moments = {"optimizer": 2 * s.n_params * s.dtype_bytes}
    start = {**_training_graph(s, b, t, "full"), "logits": _loss_logits(s, b, t),
             "gradients": s.largest_param * s.dtype_bytes}
    step = {"gradients": s.n_params * s.dtype_bytes,
            "optimizer_step": (s.n_params if s.foreach else 2 * s.largest_param) * s.dtype_bytes}
    return {**moments, **(start if sum(start.values()) > sum(step.values()) else step)}



# ---------------------------------------------------------------- application passes (Phase 5)
# Measured like the passes above (tests/bench/memory_ledger.py): bytes per studied/selected weight
SPARSE_PER_SELECTED = 40  # sparse FT: int64 index, fp32 delta, base, gradient, two AdamW moments, CSR columns
LORA_PER_TRAINABLE = 16  # LoRA: fp32 adapter number, its gradient, two AdamW moments
# pruning (bytes per weight): deciding a block holds every matrix's fp32 score and mask (per block weight);
# writing a matrix holds its index, new values and selection temporaries (per weight of the largest matrix)
PRUNE_SCORES = 5
PRUNE_WRITE = 13
PRUNE_WRITE_UPCAST = 5  # more when the model is not fp32 (fp32 copies of the selection's values)
PRUNE_SELECT = 12  # choosing a matrix's lowest scores: an fp32 copy and int64 positions (per weight of the largest)
# a calibration pass of one block alone keeps this share of the forward's layer working set (ledger fit)
BLOCK_WORKING = 0.8
# one-shot calibration's dense forward: model-dtype elements per token live at its peak (ledger fit)
ONE_SHOT_HIDDEN = 2
ONE_SHOT_INTER = 2
# SparseGPT (esa.apps.pruning.sparsegpt), counted from what it allocates (tests/test_memory.py measures them):
# its column loop works on blocks of SGPT_BLOCKSIZE columns (PruneSpec's default). Per element (column x row) of
# one block it holds the block's fp32 copy, its saliency and mask (SGPT_SELECT) while kthvalue chooses each
# matrix's pruned weights with an fp32 copy and int64 positions of that matrix's part (SGPT_KTH), then the copy,
# saliency, both masks, the OBS errors and the kept share (SGPT_COLUMNS) while the columns are updated; the loop
# leaves the copy, saliency, both masks and the errors alive (SGPT_LEFT)
SGPT_BLOCKSIZE = 128
SGPT_SELECT = 9
SGPT_KTH = 12
SGPT_COLUMNS = 20
SGPT_LEFT = 14
# writing a reconstructed matrix (nearly every weight changes): its int64 index, the comparison's bool and the
# int64 copy its sum makes (17 bytes a weight), plus the new values and the overwritten ones (2 x model dtype)
SGPT_WRITE = 17
INT8_PER_WEIGHT = 1  # int8 store: one code per studied weight (scales: one per row, negligible)


def _layer_working(s: ModelShape, b: int, t: int) -> int:
    """One decoder layer's live tensors when nothing is kept for backward (the forward-only working set)."""
    return _activations(s, b, t, False)


def _block_numel(s: ModelShape) -> int:
    """Weights of one decoder block's linears: q and o (h x h), k and v (h x kv), gate, up and down (h x I)."""
    return 2 * s.hidden * s.hidden + 2 * s.hidden * (s.kv or s.hidden) + 3 * s.hidden * s.intermediate


def _restore_backup(s: ModelShape) -> int:
    """Pruning's restore backup of `written` weights: the raw bits with their int64 index, or a copy of each
    matrix when that is smaller (esa.perturb.apply._InPlace), held until pruning ends."""
    return min(s.written * (s.dtype_bytes + 8), s.n_studied * s.dtype_bytes)


def _peak_phase(held: dict[str, int], *phases: dict[str, int]) -> dict[str, int]:
    """What is held throughout, plus the largest of the phases that follow one another."""
    top = max(phases, key=lambda p: sum(p.values()))
    return {k: held.get(k, 0) + top.get(k, 0) for k in {**held, **top}}


def _decide_and_write(s: ModelShape, before: int) -> tuple[dict[str, int], dict[str, int]]:
    """A scorer's last block, after its scores: the decision (the block's fp32 scores and masks, one matrix's
    selection), then the writes (the restore backup grown by the matrix written, with that matrix's index,
    values and selection temporaries); `before`: the restore backup of the blocks before it."""
    blk = min(_block_numel(s), s.n_studied)
    return ({"backup": before, "decide": PRUNE_SCORES * blk + PRUNE_SELECT * s.largest_studied},
            {"backup": _restore_backup(s),
             "decide": blk + (PRUNE_WRITE + PRUNE_WRITE_UPCAST * (_upcast(s) > 0)) * s.largest_studied})


def _prune(s: ModelShape, b: int, t: int) -> dict[str, int]:
    # layer-sequential pruning from input statistics (Wanda; esa.apps.pruning.calibrate.run_sequential). Held
    # throughout: every calibration window's input to the current block and the masks (a bit per weight). Then,
    # per block, one after the other: a block pass gathering statistics or making the next block's inputs (one
    # batch's layer working set and, while propagating, a second set of inputs), the decision and the writes
    # (_decide_and_write). The last block's phases are the largest
    blk = min(_block_numel(s), s.n_studied)
    inputs = s.windows * t * s.hidden * s.dtype_bytes
    before = _restore_backup(s) * (s.n_studied - blk) // max(1, s.n_studied)
    return _peak_phase({"masks": s.n_studied // 8, "calibration": inputs},
                       {"backup": before, "calibration": inputs + int(BLOCK_WORKING * _layer_working(s, b, t))},
                       *_decide_and_write(s, before))


def _scoring(s: ModelShape, b: int, t: int, double: bool) -> dict[str, int]:
    """The gradient pass a gradient scorer runs (esa.sensitivity.metrics): grad_x_weight's and obd's backward, or
    hutchinson_diag's double backward (`double`), with fp32 accumulators over the weights it scores."""
    return _hutchinson(s, b, t) if double else _gradient(s, b, t)


def _graph_from(s: ModelShape, layer: int) -> ModelShape:
    """The shape a backward to weights of block `layer` and later sees: nothing before that block keeps a graph."""
    return replace(s, layers=max(1, s.layers - layer))


def _prune_gradient(s: ModelShape, b: int, t: int, double: bool = False) -> dict[str, int]:
    # layer-sequential pruning by a gradient scorer (run_sequential without block inputs): per block, a gradient
    # pass of the whole, partly pruned model scoring that block's weights alone (its backward stops at that block),
    # with the restore backup of the blocks before it held, then the block's decision and writes. The backup grows
    # and the graph shrinks from one block to the next: the first block's pass or the last one's is the largest
    blk = min(_block_numel(s), s.n_studied)
    before = _restore_backup(s) * (s.n_studied - blk) // max(1, s.n_studied)
    block = replace(s, n_studied=blk, studied_layers=1)
    return _peak_phase({"masks": s.n_studied // 8}, _scoring(_graph_from(block, s.first_layer), b, t, double),
                       {**_scoring(_graph_from(block, s.last_layer), b, t, double), "backup": before},
                       *_decide_and_write(s, before))


def _prune_gradient_one_shot(s: ModelShape, b: int, t: int, double: bool = False) -> dict[str, int]:
    # one-shot pruning by a gradient scorer (run_one_shot): one gradient pass scores every pruned weight (its fp32
    # accumulators become the scores); then each block is decided from its own scores, the later blocks' held.
    # Nothing is written
    blk = min(_block_numel(s), s.n_studied)
    return _peak_phase({"masks": s.n_studied // 8}, _scoring(_graph_from(s, s.first_layer), b, t, double),
                       {"accumulators": 4 * (s.n_studied - blk),
                        "decide": PRUNE_SCORES * blk + PRUNE_SELECT * s.largest_studied})


def _sgpt_groups(s: ModelShape) -> list[tuple[int, int, int, int]]:
    """(rows, cols, rows of its largest matrix, matrices) of the matrices SparseGPT solves together, in its order:
    q/k/v stacked (one input), o, gate/up stacked, down."""
    h, kv, i = s.hidden, s.kv or s.hidden, s.intermediate
    return [(h + 2 * kv, h, h, 3), (h, h, h, 1), (2 * i, h, i, 2), (h, i, h, 1)]


def _block_matrices(s: ModelShape) -> list[int]:
    """Weights of one block's linears in inventory order: q, k, v, o, gate, up, down."""
    h, kv, i = s.hidden, s.kv or s.hidden, s.intermediate
    return [h * h, kv * h, kv * h, h * h, i * h, i * h, h * i]


def _sgpt_decide(s: ModelShape) -> int:
    """Peak bytes of SparseGPT deciding one block (SparseGPT.decide), its Hessians aside. Its groups run one after
    the other, each holding the decisions of the groups before it (the fp32 new matrix and its bool mask: 5 bytes
    a weight) and its own fp32 stacked copy (none for one fp32 matrix: the parameter itself), then either the
    factorisation (H scaled, its Cholesky factor, H^-1 and U: four fp32 (cols, cols)) or, after it, the column
    loop: U, the transposed fp32 copy and the pruned and protected masks (6 bytes a weight) with one column
    block's working set, and at its end the new matrix, its mask and their check (6 more) with what the last
    column block left alive. The two never overlap: the factorisation's temporaries are freed first."""
    done, peak = 0, 0
    for rows, cols, part, k in _sgpt_groups(s):
        n = rows * cols
        stacked = 4 * n if k > 1 or s.dtype_bytes != 4 else 0
        first = min(SGPT_BLOCKSIZE, cols)
        last = cols - SGPT_BLOCKSIZE * ((cols - 1) // SGPT_BLOCKSIZE)
        block = first * max(SGPT_COLUMNS * rows, SGPT_SELECT * rows + SGPT_KTH * part)
        loop = max(6 * n + block, 12 * n + SGPT_LEFT * last * rows)
        peak = max(peak, done + stacked + max(16 * cols * cols, 4 * cols * cols + loop))
        done += 5 * n
    return peak


def _sgpt_write(s: ModelShape) -> tuple[int, int]:
    """(the block's backup so far, the write's temporaries) when writing one block's reconstructed matrices
    (prune.write: masks.updates_for, then perturb.apply.overwritten, one matrix after the other, in inventory
    order) peaks: each matrix adds its dense backup (model dtype) and holds SGPT_WRITE + 2 b bytes a weight."""
    b, before, best = s.dtype_bytes, 0, (0, 0)
    for n in _block_matrices(s):
        before += b * n
        best = max(best, (before, (SGPT_WRITE + 2 * b) * n), key=sum)
    return best


def _sgpt_emit(s: ModelShape) -> int:
    """The largest matrix's temporaries while its decision is added to the mask set (MaskSet.add): the int64 copy
    that counting its pruned weights makes (8 bytes a weight) is the largest."""
    return 8 * max(_block_matrices(s))


def _sparsegpt(s: ModelShape, b: int, t: int) -> dict[str, int]:
    # layer-sequential SparseGPT (esa.apps.pruning.calibrate.run_sequential with SparseGPT), the phases of _prune.
    # Held throughout: the calibration windows' block inputs and the masks. Every weight is rewritten, so the
    # restore backup is a copy of each matrix, and the mask set keeps the reconstructed values (model dtype; host
    # memory on a GPU); the blocks before the last one hold both. The last block's job keeps its fp32 Hessians
    # X^T X (one per distinct input) from its block pass through its decision (_sgpt_decide), its writes
    # (_sgpt_write: every decision held, the backup growing to every matrix's) and the mask set's update
    # (_sgpt_emit: the kept values growing to every block's)
    blk = min(_block_numel(s), s.n_studied)
    backup, kept = s.n_studied * s.dtype_bytes, max(0, s.n_studied - s.written) * s.dtype_bytes
    share = (s.n_studied - blk) / max(1, s.n_studied)
    inputs = s.windows * t * s.hidden * s.dtype_bytes
    before = {"backup": int(share * backup), "kept_values": int(share * kept)}
    hess = _sgpt_hessians(s)
    written, writing = _sgpt_write(s)
    return _peak_phase({"masks": s.n_studied // 8, "calibration": inputs},
                       {**before, "calibration": inputs + int(BLOCK_WORKING * _layer_working(s, b, t)), "hessians": hess},
                       {**before, "hessians": hess, "decide": _sgpt_decide(s)},
                       {"backup": before["backup"] + written, "kept_values": before["kept_values"], "hessians": hess,
                        "decide": 5 * blk + writing},
                       {"backup": backup, "kept_values": kept, "hessians": hess, "decide": 5 * blk + _sgpt_emit(s)})


def _sgpt_hessians(s: ModelShape) -> int:
    """One block's fp32 Hessians X^T X, one per distinct input: attention, output projection, MLP (h wide), down (I)."""
    return 4 * (3 * s.hidden * s.hidden + s.intermediate * s.intermediate)


def _one_shot(s: ModelShape, b: int, t: int) -> tuple[int, float, dict[str, int]]:
    """(a block's weights, the blocks pruned, the dense forward's phase) of one-shot pruning
    (esa.apps.pruning.calibrate.run_one_shot): one dense forward per calibration batch, stopped after the last
    pruned block, gathers every pruned Linear's input statistics at once; no block inputs are held. It peaks in
    the statistics hook of the down projection: the MLP's tensors around it and the hook's fp32 copy of the
    I-wide input and its square (ledger fit)."""
    blk = min(_block_numel(s), s.n_studied)
    per_token = s.dtype_bytes * (ONE_SHOT_HIDDEN * s.hidden + ONE_SHOT_INTER * s.intermediate) + 8 * s.intermediate
    forward = {"calibration": b * t * per_token} if s.windows else {}
    return blk, s.n_studied / max(1, blk), forward


def _prune_one_shot(s: ModelShape, b: int, t: int) -> dict[str, int]:
    # one-shot pruning from input statistics (Wanda) or from the weights alone (data-free: no windows). Every
    # block is decided from the dense model and nothing is written (no restore backup); every block's statistics
    # (an fp32 squared norm per input column) and the masks are held while each block's scores are decided
    blk, blocks, forward = _one_shot(s, b, t)
    stats = int(4 * (3 * s.hidden + s.intermediate) * blocks) if s.windows else 0
    return _peak_phase({"masks": s.n_studied // 8, "stats": stats}, forward,
                       {"decide": PRUNE_SCORES * blk + PRUNE_SELECT * s.largest_studied})


def _sparsegpt_one_shot(s: ModelShape, b: int, t: int) -> dict[str, int]:
    # one-shot SparseGPT: the dense forward gathers every block's Hessians, all held until pruning ends (no block
    # is written, so no restore backup, and later blocks see dense inputs). Deciding the last block holds them,
    # the mask set's kept values of the blocks before it and _sgpt_decide; adding its decisions to the mask set
    # holds every kept value and _sgpt_emit. The block being decided has its Hessians on one device ("hessians");
    # the others spread with the layers
    blk, blocks, forward = _one_shot(s, b, t)
    kept = max(0, s.n_studied - s.written) * s.dtype_bytes
    held = {"masks": s.n_studied // 8, "hessians": _sgpt_hessians(s),
            "stats": int(_sgpt_hessians(s) * max(0.0, blocks - 1))}
    share = (s.n_studied - blk) / max(1, s.n_studied)
    return _peak_phase(held, forward,
                       {"kept_values": int(share * kept), "decide": _sgpt_decide(s)},
                       {"kept_values": kept, "decide": 5 * blk + _sgpt_emit(s)})


def _finetune_sparse(s: ModelShape, b: int, t: int) -> dict[str, int]:
    # esa.apps.training.sparse (sampled backend): the O(k) optimiser state over a frozen-weight backward, whose
    # layers hold the sampled product's fp32 copies of one Linear's output gradient and input
    return {**_training_graph(s, b, t, "sparse"), "optimizer": SPARSE_PER_SELECTED * s.trainable,
            **_backward_start_or_layers(s, b, t, 4 * b * t * (s.hidden + s.intermediate))}


def _finetune_lora(s: ModelShape, b: int, t: int) -> dict[str, int]:
    # esa.apps.training.lora (peft keeps the adapters fp32 whatever the base dtype) over a frozen-weight backward
    return {**_training_graph(s, b, t, "lora"), "logits": _loss_logits(s, b, t),
            "optimizer": LORA_PER_TRAINABLE * s.trainable}


def _int8_store(s: ModelShape, b: int, t: int) -> dict[str, int]:
    # esa.apps.security.formats.stored("int8"): the codes, the raw backup of every studied weight (host
    # memory), and quantising the largest matrix (its fp32 copy, |w|, the dequantised values and their cast)
    return {"store": INT8_PER_WEIGHT * s.n_studied, "backup": s.n_studied * s.dtype_bytes,
            "quantise": (12 + s.dtype_bytes) * s.largest_studied}


def _bfa(s: ModelShape, b: int, t: int) -> dict[str, int]:
    # progressive bit search (esa.apps.security.bfa) on the int8 store: a streamed gradient pass whose
    # gradients are ranked per bit and freed one parameter at a time (no accumulators); ranking a matrix holds
    # its gradient, their fp32 copy and one bit's value changes and gains
    store = _int8_store(s, b, t)
    return {"activations": _activations(s, b, t, True), "store": store["store"], "backup": store["backup"],
            **_backward_start_or_layers(s, b, t, s.largest_studied * (s.dtype_bytes + 4 + 16))}


def _capture(s: ModelShape, b: int, t: int) -> dict[str, int]:
    # esa.apps.interpret.passes.forward_capture: a forward with reducing hooks; the stopword mass takes an
    # fp32 softmax of the whole (B, T, V) logits (after their fp32 copy when the model is not fp32)
    d = _forward_only(s, b, t)
    d["logits"] = b * t * s.vocab * (s.dtype_bytes + 4 + _upcast(s))
    return d

# The passes the guard knows; a metric names its own (esa.sensitivity.metrics.Metric.memory_pass).
_PASS_FNS: dict[str, Callable[[ModelShape, int, int], dict[str, int]]] = {
    "eval": _forward_only,
    "perturb": _forward_only,  # the backup of the selected values is negligible
    "act_mag": _act_mag,
    "gradient": _gradient,  # one gradient metric (grad_x_weight, grad_squared)
    "grad_fused": _grad_fused,  # grad_x_weight and grad_squared from one backward
    "hutchinson": _hutchinson,
    "finetune_full": _finetune_full,  # one full fine-tuning step (AdamW)
    "prune": _prune,  # layer-sequential pruning from input statistics (Wanda, magnitude)
    "sparsegpt": _sparsegpt,  # layer-sequential SparseGPT reconstruction
    "prune_one_shot": _prune_one_shot,  # pruning with calibration 'one-shot' (Wanda) or 'none' (data-free)
    "sparsegpt_one_shot": _sparsegpt_one_shot,  # SparseGPT with calibration 'one-shot'
    # pruning by a gradient scorer (grad_x_weight, obd: its gradient pass; hutchinson_diag: its double backward)
    "prune_gradient": _prune_gradient,  # layer-sequential: one gradient pass per block
    "prune_gradient_one_shot": _prune_gradient_one_shot,  # one gradient pass scores every block (their default)
    "prune_hutchinson": partial(_prune_gradient, double=True),
    "prune_hutchinson_one_shot": partial(_prune_gradient_one_shot, double=True),
    "finetune_sparse": _finetune_sparse,  # one sparse fine-tuning step (work: trainable = selected weights)
    "finetune_lora": _finetune_lora,  # one LoRA step (work: trainable = adapter numbers)
    "int8_store": _int8_store,  # the security int8 store opened over the studied weights
    "bfa": _bfa,  # one bit-search iteration (gradient pass) on the int8 store
    "capture": _capture,  # one interpretability capture forward
}
PASSES = tuple(_PASS_FNS)
# parts of a pass held in host memory whatever the device: the int8 store's raw backup, SparseGPT's kept values
HOST_PARTS = {"int8_store": ("backup",), "bfa": ("backup",), "sparsegpt": ("kept_values",),
              "sparsegpt_one_shot": ("kept_values",)}
PRUNE_GRADIENT = ("prune_gradient", "prune_gradient_one_shot", "prune_hutchinson", "prune_hutchinson_one_shot")
APP_PASSES = ("prune", "sparsegpt", "prune_one_shot", "sparsegpt_one_shot", *PRUNE_GRADIENT, "finetune_sparse",
              "finetune_lora", "int8_store", "bfa", "capture")
# passes whose graph is kept for a backward: their activations spread with the layers under a device map
BACKWARD = ("gradient", "grad_fused", "hutchinson", "finetune_full", "finetune_sparse", "finetune_lora", "bfa",
            *PRUNE_GRADIENT)
# passes that run Hutchinson's double backward and keep its probes (`probes`)
HUTCHINSON = ("hutchinson", "prune_hutchinson", "prune_hutchinson_one_shot")


# ---------------------------------------------------------------- placement over devices
def _exec_device(module: torch.nn.Module, default: str) -> str:
    dev = execution_device(module)
    return default if dev.type == "meta" else str(dev)


def _placement(model: torch.nn.Module, specs: list[Any], target: str) -> dict[str, dict[str, float]]:
    """Per device: resident weight bytes, studied numel, largest studied, share of layers, logits share."""
    out: dict[str, dict[str, float]] = {}

    def slot(dev: str) -> dict[str, float]:
        return out.setdefault(dev, {"weights": 0, "studied": 0, "largest": 0, "layers": 0.0, "logits": 0.0,
                                    "staging": 0})

    # a meta parameter of an undispatched model (planning before a load) lives on `target`
    dispatched = bool(getattr(model, "hf_device_map", None))
    owner_dev: dict[str, str] = {}
    for name, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            full = f"{name}.{pname}" if name else pname
            if p.device.type != "meta":
                owner_dev[full] = str(p.device)
                slot(str(p.device))["weights"] += p.numel() * p.element_size()
            elif dispatched:  # offloaded: staged on the execution device for each forward
                dev = _exec_device(mod, target)
                owner_dev[full] = dev
            else:
                owner_dev[full] = target
                slot(target)["weights"] += p.numel() * p.element_size()
    if dispatched:
        for name, dev in model.hf_device_map.items():
            mod = model.get_submodule(name)
            if dev in ("cpu", "disk") and any(p.device.type == "meta" for p in mod.parameters()):
                size = sum(p.numel() * p.element_size() for p in mod.parameters())
                st = slot(_exec_device(mod, target))
                st["staging"] = max(st["staging"], size)
    layer_dev: dict[int, str] = {}
    for s in specs:
        dev = owner_dev.get(s.name, target)
        st = slot(dev)
        st["studied"] += s.numel
        st["largest"] = max(st["largest"], s.numel)
        layer_dev.setdefault(s.layer, dev)
    n_layers = max(1, len(layer_dev))
    for dev in layer_dev.values():
        slot(dev)["layers"] += 1.0 / n_layers
    if not layer_dev:
        slot(target)["layers"] = 1.0
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    slot(_exec_device(head, target) if head is not None else target)["logits"] = 1.0
    return out


def estimate(
    model: torch.nn.Module,
    pass_name: str,
    batch_size: int,
    seqlen: int,
    specs: list[Any] | None = None,
    target: str | torch.device | None = None,
    probes: int = 1,
    written: int = 0,
    work: dict[str, int] | None = None,
    autocast: bool = False,
) -> MemoryEstimate:
    """Memory a pass over `model` needs, whole and per device (see the module docstring for the model).

    `probes`: hutchinson_diag's probe count (all probes are kept while they fit PROBE_CACHE_BYTES).
    `written`: weights a perturbation writes (pass "perturb"): its raw-bit backup, and on an accelerator the
    int64 index moved there, are held while the perturbed model is evaluated.

    `work`: what an application pass works on (ModelShape's `written`, `trainable`, `windows`), whole-model
    counts; each device gets the share of them that its studied weights hold.

    `autocast`: a training pass runs under bf16 autocast (what esa.apps.training.loop does on CUDA with
    precision 'auto'; `esa.apps.training.loop.uses_autocast`).

    `specs`: the studied weights (default: the model's inventory). `target`: the device a model still on
    `meta` (built for planning, not loaded) would be placed on; default cuda:0 if available, else cpu.
    """
    if pass_name not in _PASS_FNS:
        raise unknown("pass", pass_name, _PASS_FNS)
    if batch_size < 1 or seqlen < 1:
        raise EsaError(f"batch_size and seqlen must be >= 1, got {batch_size} and {seqlen}")
    specs = weight_inventory(model) if specs is None else specs
    tgt = str(torch.device(target)) if target is not None else ("cuda:0" if torch.cuda.is_available() else "cpu")
    if tgt == "cuda":
        tgt = "cuda:0"
    shape = replace(ModelShape.of(model, specs), **(work or {}), autocast=autocast, foreach=_foreach(tgt))
    comps = {"weights": shape.n_params * shape.dtype_bytes, **_PASS_FNS[pass_name](shape, batch_size, seqlen)}
    place = _placement(model, specs, tgt)
    per_device: dict[str, dict[str, int]] = {}
    resident: dict[str, int] = {}
    for dev, pl in place.items():
        # the same model of memory, restricted to what this device holds
        share = pl["studied"] / shape.n_studied if shape.n_studied else 1.0
        # a device without the LM head sees no vocabulary, so a pass's phase choice (logits or layers) is its own
        local = replace(shape, n_studied=int(pl["studied"]), largest_studied=int(pl["largest"]),
                        written=int(shape.written * share), trainable=int(shape.trainable * share),
                        vocab=shape.vocab if pl["logits"] else 0, foreach=_foreach(dev))
        part = _PASS_FNS[pass_name](local, batch_size, seqlen)
        for k in ("activations", "weight_casts"):  # the graph follows the layers this device holds
            part[k] = int(part.get(k, 0) * (pl["layers"] if pass_name in BACKWARD else (1.0 if pl["layers"] else 0.0)))
        if "hutchinson" in part:  # the graph part follows the layers this device holds
            grads = int(HVP_GRADS * _probed(local, pass_name) * local.dtype_bytes)
            part["hutchinson"] = grads + int((part["hutchinson"] - grads) * pl["layers"])
        part["logits"] = int(part.get("logits", 0) * pl["logits"])
        if pass_name in HUTCHINSON:
            part["probe_cache"] = probe_cache_bytes(_probed(local, pass_name), probes, _probed(shape, pass_name))
        if written and shape.n_studied:  # spread like the studied weights it copies
            part["backup"] = backup_bytes(int(written * pl["studied"] / shape.n_studied), shape.dtype_bytes, dev)
        part = {"weights": int(pl["weights"]), **part, "offload_staging": int(pl["staging"])}
        if pass_name in HOST_PARTS and not dev.startswith("cpu"):  # parts kept in host memory whatever the device
            host = per_device.setdefault("cpu", {})
            for k in HOST_PARTS.get(pass_name, ()):
                host[k] = host.get(k, 0) + part.pop(k, 0)
        per_device[dev] = {**per_device.get(dev, {}), **{k: v for k, v in part.items() if v}}
        if not dev.startswith("meta"):
            resident[dev] = int(pl["weights"])
    if pass_name in HUTCHINSON:
        comps["probe_cache"] = probe_cache_bytes(_probed(shape, pass_name), probes, _probed(shape, pass_name))
    if written:
        comps["backup"] = backup_bytes(written, shape.dtype_bytes, tgt, shape.n_studied * shape.dtype_bytes)
    comps["offload_staging"] = max((int(pl["staging"]) for pl in place.values()), default=0)
    return MemoryEstimate(pass_name, batch_size, seqlen, {k: v for k, v in comps.items() if v}, per_device, resident,
                          autocast)


def _probed(s: ModelShape, pass_name: str) -> int:
    """Weights one Hutchinson call probes (its create_graph gradients and its kept probes): layer-sequential
    pruning calls it once per block, over that block's weights alone; the other passes over every studied one."""
    return min(_block_numel(s), s.n_studied) if pass_name == "prune_hutchinson" else s.n_studied


def _foreach(device: str) -> bool:
    """torch's AdamW takes its foreach path on an accelerator's tensors, the one-tensor loop on the CPU's."""
    return not device.startswith(("cpu", "meta", "disk"))


def backup_bytes(written: int, dtype_bytes: int, device: str, dense: int | None = None) -> int:
    """The raw bits of `written` weights (esa.perturb.apply), plus their int64 index when it is copied to an
    accelerator (on the CPU the caller's index is used in place); at most `dense` (the studied weights' own
    bytes: apply backs up a whole matrix instead when that is smaller)."""
    sparse = written * (dtype_bytes + (0 if device.startswith("cpu") else 8))
    return sparse if dense is None else min(sparse, dense)


def probe_cache_bytes(n_local: int, probes: int, n_total: int) -> int:
    """The int8 Hutchinson probes kept between windows (all or none, decided on the whole model's count)."""
    return n_local * probes if probes * n_total <= PROBE_CACHE_BYTES else 0


# ---------------------------------------------------------------- free memory
def free_bytes(device: str | torch.device) -> int:
    """Free memory of one device: CUDA's free bytes, or the CPU's MemAvailable."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free)
    if dev.type == "cpu":
        return _cpu_available()
    if dev.type == "meta" or str(device) == "disk":
        return 1 << 62
    raise EsaError(f"cannot read the free memory of device {device!r}; supported: cpu, cuda")


def _cpu_available() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # psutil is optional: fall back to the kernel's own estimate
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def check(
    model: torch.nn.Module,
    pass_name: str,
    batch_size: int,
    seqlen: int,
    specs: list[Any] | None = None,
    loaded: bool = True,
    available: dict[str, int] | None = None,
    headroom: float = HEADROOM,
    target: str | torch.device | None = None,
    probes: int = 1,
    work: dict[str, int] | None = None,
    autocast: bool = False,
) -> MemoryEstimate:
    """Raise EsaError before the pass if a device cannot hold what it needs; return the estimate otherwise.

    `loaded`: the weights are already allocated (their memory is not free any more, so only the rest is
    checked); False to plan a model built on `meta`. `available`: device -> free bytes, to override the
    measurement (tests, or a budget smaller than the machine's). `work`: an application pass's counts
    (see `estimate`); such a pass is refused in one line naming the setting that makes it fit. `autocast`:
    see `estimate`.
    """
    est = estimate(model, pass_name, batch_size, seqlen, specs, target, probes, work=work, autocast=autocast)
    short = []
    for dev in est.per_device:
        if dev in ("disk", "meta"):
            continue
        need = est.need(dev, loaded)
        have = available[dev] if available and dev in available else free_bytes(dev)
        if need > headroom * have:
            short.append((dev, need, have))
    if short and pass_name in APP_PASSES:
        dev, need, have = short[0]
        fix = _app_fix(model, est, specs, work, loaded, dev, int(headroom * have), target)
        raise EsaError(f"not enough memory for {pass_name} (batch {batch_size} x seqlen {seqlen}): needs about "
                       f"{_gib(need)} on {dev}, {_gib(have)} is free (using at most {headroom:.0%}); {fix}")
    if short:
        raise EsaError(_message(est, short, headroom, loaded, model))
    return est


def _app_fix(model: torch.nn.Module, est: MemoryEstimate, specs: list[Any] | None, work: dict[str, int] | None,
             loaded: bool, dev: str, usable: int, target: str | torch.device | None) -> str:
    """The first setting that makes an application pass fit `usable` bytes of `dev`: fewer tokens per step,
    bf16, or a device map over the GPUs its need asks for."""
    b, t = est.batch_size, est.seqlen
    while b > 1 or t > 64:  # halve the batch first, then the sequence
        b, t = (b // 2, t) if b > 1 else (b, t // 2)
        smaller = estimate(model, est.pass_name, b, t, specs, target, work=work, autocast=est.autocast)
        if smaller.need(dev, loaded) <= usable:
            return f"it fits with fewer tokens per step (batch {b} x seqlen {t})"
    shape = replace(ModelShape.of(model, specs), **(work or {}), autocast=est.autocast, foreach=_foreach(dev))
    if shape.dtype_bytes == 4:
        half = replace(shape, dtype_bytes=2)
        if sum(_PASS_FNS[est.pass_name](half, b, t).values()) + (0 if loaded else half.n_params * 2) <= usable:
            return "it fits in bf16 (dtype='bfloat16')"
    n = -(-est.need(dev, loaded) // max(1, usable))
    return f"it fits with a device map over {n} GPUs (device_map='auto', max_memory per GPU)"


def _gib(n: float) -> str:
    """Human-readable bytes (GiB for model-sized numbers, smaller units for tiny test models)."""
    for unit, size in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _message(est: MemoryEstimate, short: Iterable[tuple[str, int, int]], headroom: float, loaded: bool,
             model: torch.nn.Module) -> str:
    lines = [f"not enough memory for {est.pass_name} (batch {est.batch_size} x seqlen {est.seqlen}):"]
    for dev, need, have in short:
        parts = ", ".join(f"{k} {_gib(v)}" for k, v in est.per_device[dev].items() if not (loaded and k == "weights"))
        lines.append(f"  {dev}: needs about {_gib(need)} ({parts}) but {_gib(have)} is free "
                     f"(using at most {headroom:.0%} of it)")
    lines.append(f"  whole pass: about {_gib(est.total)} ({', '.join(f'{k} {_gib(v)}' for k, v in est.components.items())})")
    lines.append("Try:")
    dtype_bytes = next(model.parameters()).element_size()
    if est.pass_name == "finetune_full":
        lines.append("  - sparse fine-tuning or LoRA (fp32 deltas or adapters on a share of the weights; full "
                     "fine-tuning keeps fp32 weights, gradients and two AdamW moments of every parameter)")
    elif dtype_bytes > 2:
        lines.append("  - dtype='bfloat16' (halves weights and activations; scores stay fp32)")
    big_act = est.components.get("activations", 0) + est.components.get("logits", 0) + est.components.get("hutchinson", 0)
    if est.batch_size > 1 and big_act > 0.2 * est.total:
        lines.append(f"  - a smaller batch size (activations and logits scale with it; now {est.batch_size})")
    elif big_act > 0.2 * est.total:
        lines.append(f"  - a shorter seqlen (activations and logits scale with it; now {est.seqlen})")
    if est.components.get("accumulators", 0) > 0.2 * est.total:
        lines.append("  - fewer studied weights at once (pass a subset of the inventory, e.g. a few layers per run): "
                     "the fp32 accumulators are one per studied weight")
    lines.append("  - device_map='auto' with max_memory={0: '70GiB', 1: '70GiB', ...} to spread the model over GPUs")
    if est.pass_name in ("eval",):
        lines.append("  - CPU/disk offload (device_map='auto', max_memory={0: ..., 'cpu': ...}, offload_folder=...): "
                     "fine for evaluation")
    else:
        lines.append("  - CPU/disk offload only for evaluation: gradient metrics and perturbations need the studied "
                     "weights resident (esa.dispatch.require_resident)")
    return "\n".join(lines)
