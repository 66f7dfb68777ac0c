"""The micro-suite: small Llama models of geometrically spaced sizes and one Mixtral MoE, trained here.

Two embedded pretrained models are too few for a scaling law, so the project trains its own suite on
the offline corpus. Every model is trained identically: the same data (the shakespeare corpus's calib
split; the eval split stays unseen), the same tokenizer, the same number of training tokens *per
parameter*, the same seed, AdamW with linear warmup and a cosine schedule, fp32 on CPU, bf16 autocast
on a GPU. The MoE's budget is counted on its *active* parameters, so it sees exactly the tokens (and
spends the compute) of the dense model whose active size it matches.

Tokenizer: byte-level (ByT5's, vocabulary 384, nothing to train or download). SmolLM2's 49k-token
vocabulary would make the embedding table 49k x d, i.e. 1.5M parameters at d=32: more than every
transformer block of the suite together, so "model size" would mostly measure the embedding. With
384 byte ids the embedding (tied with the LM head) stays under ~25% of the smallest model and ~5% of
the largest. The price: perplexities are per *byte*, not comparable with token-level perplexities of
the embedded models.

Names: `micro-llama-<size>` / `micro-mixtral-<size>`, optionally suffixed `@<budget>` (`smoke`,
`standard`, `gpu`); without a suffix the budget is $ESA_MICRO_BUDGET or `standard`. A trained model is
cached in `cache_dir("micro")` under a content key of its architecture, budget, data and training code
version; it is written to a temporary folder and renamed into place, so a crash mid-training leaves
nothing that is read back.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, ByT5Tokenizer, LlamaConfig, MixtralConfig

from esa.data import get_corpus, windows
from esa.errors import unknown
from esa.models.inventory import weight_inventory
from esa.registry import Registry
from esa.store import cache_dir, cache_root, cached, content_key, read_json, write_json

log = logging.getLogger(__name__)

TRAIN_VERSION = 1  # bump when the training procedure changes: cached models are then retrained
CORPUS = "shakespeare"
MAX_POSITIONS = 512  # the standard profile evaluates 512-token windows
SEP = "@"


@dataclass(frozen=True)
class MicroSpec:
    """Architecture of one suite member. The FFN is SwiGLU; attention uses full KV heads."""

    arch: str  # llama | mixtral
    hidden: int
    layers: int
    heads: int
    intermediate: int  # per expert for MoE
    n_experts: int = 0
    experts_per_tok: int = 0

    @property
    def definition(self) -> str:  # a property, so not part of asdict(spec), the cache key's architecture
        ffn = f"FFN {self.intermediate}"
        if self.n_experts:
            ffn = f"{self.n_experts} experts of {ffn}, top-{self.experts_per_tok}"
        return f"{self.arch}: hidden {self.hidden}, {self.layers} layers, {self.heads} heads, {ffn}"


@dataclass(frozen=True)
class Budget:
    """How long to train: tokens = tokens_per_param x (active) parameters, clipped to [min_steps, max_steps]."""

    name: str
    tokens_per_param: float
    seqlen: int  # training window (tokens); evaluation may use up to MAX_POSITIONS
    batch_size: int
    lr: float = 3e-3  # tiny models tolerate a high peak LR; warmup keeps the first steps stable
    warmup_frac: float = 0.05
    weight_decay: float = 0.1
    min_steps: int = 5
    max_steps: int = 100_000

    @property
    def definition(self) -> str:  # a property, so not part of asdict(budget), the cache key's budget
        return (f"{self.tokens_per_param:g} tokens per (active) parameter, batches of {self.batch_size} x "
                f"{self.seqlen} tokens, {self.min_steps}-{self.max_steps} steps, peak lr {self.lr:g}")


# Sizes grow by about 2.5x in parameters (hidden x1.5, one more layer each step). The MoE matches
# micro-llama-176k's active parameters: same hidden/layers, 4 experts of half its FFN width, top-2.
MICRO_SUITE: Registry[MicroSpec] = Registry("micro-suite model", base=MicroSpec)
MICRO_SUITE.register(MicroSpec("llama", hidden=32, layers=2, heads=2, intermediate=64), "micro-llama-33k")
MICRO_SUITE.register(MicroSpec("llama", hidden=48, layers=2, heads=2, intermediate=128), "micro-llama-74k")
MICRO_SUITE.register(MicroSpec("llama", hidden=64, layers=3, heads=2, intermediate=176), "micro-llama-176k")
MICRO_SUITE.register(MicroSpec("llama", hidden=96, layers=4, heads=3, intermediate=256), "micro-llama-480k")
MICRO_SUITE.register(MicroSpec("mixtral", hidden=64, layers=3, heads=2, intermediate=88, n_experts=4,
                               experts_per_tok=2), "micro-mixtral-176k")

BUDGETS: Registry[Budget] = Registry("micro-suite budget", (
    # seconds per model on 2 CPU cores: proves the machinery, the models are barely trained
    Budget("smoke", tokens_per_param=0.5, seqlen=256, batch_size=4, lr=3e-3, min_steps=10, max_steps=30),
    # meant to be long enough that every model clearly beats the unigram baseline on the eval split
    # (esa.phases.phase4.suite_report measures both). Chinchilla's 20 tokens per parameter; small batches, because what
    # lifts a byte-level model off the unigram plateau (loss ~3.3) is the number of steps: at 8 x 512
    # tokens per step and 10 tokens/param, micro-llama-33k stopped at loss 3.22 after 80 steps.
    Budget("standard", tokens_per_param=20.0, seqlen=512, batch_size=4),
    # on a GPU: Chinchilla-like 20 tokens per parameter
    Budget("gpu", tokens_per_param=20.0, seqlen=512, batch_size=32),
), base=Budget)


def parse_ref(ref: str) -> tuple[str, str]:
    """`micro-llama-74k@smoke` -> ("micro-llama-74k", "smoke"); no suffix -> $ESA_MICRO_BUDGET or standard."""
    name, _, budget = ref.partition(SEP)
    budget = budget or os.environ.get("ESA_MICRO_BUDGET", "standard")
    MICRO_SUITE.lookup(name)
    if budget not in BUDGETS:
        raise unknown("micro-suite budget", budget, BUDGETS, hint=f"write it as {name}{SEP}<budget>")
    return name, budget


def is_micro(ref: str) -> bool:
    return isinstance(ref, str) and ref.partition(SEP)[0] in MICRO_SUITE


def micro_tokenizer():
    return ByT5Tokenizer()


def build_config(spec: MicroSpec):
    common = dict(vocab_size=384, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                  num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                  num_key_value_heads=spec.heads, max_position_embeddings=MAX_POSITIONS,
                  tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    if spec.arch == "llama":
        return LlamaConfig(**common)
    if spec.arch == "mixtral":
        # router_aux_loss_coef: the standard load-balancing loss, so experts do not collapse to one
        return MixtralConfig(**common, num_local_experts=spec.n_experts, num_experts_per_tok=spec.experts_per_tok,
                             output_router_logits=True, router_aux_loss_coef=0.01)
    raise unknown("micro-suite architecture", spec.arch, ("llama", "mixtral"))


def active_params(model: torch.nn.Module) -> int:
    """Parameters used per token: a MoE counts only `experts_per_tok` of its experts."""
    n = sum(p.numel() for p in model.parameters())
    cfg = model.config
    n_exp = int(getattr(cfg, "num_local_experts", 0) or 0)
    if not n_exp:
        return n
    expert = sum(s.numel for s in weight_inventory(model) if s.kind == "expert")
    return n - expert + expert * int(cfg.num_experts_per_tok) // n_exp


def train_spec(name: str, budget: str, seed: int = 0) -> dict[str, Any]:
    """Everything that decides a trained model's weights: its cache key is a hash of this."""
    return {**train_recipe(name, budget, seed), "corpus_id": _corpus_id(CORPUS)}


def train_recipe(name: str, budget: str, seed: int = 0) -> dict[str, Any]:
    """`train_spec` but the corpus id (reading the corpus is what that costs)."""
    precision = "bf16" if torch.cuda.is_available() else "fp32"
    return dict(name=name, arch=asdict(MICRO_SUITE[name]), budget=asdict(BUDGETS[budget]), seed=seed,
                corpus=CORPUS, split="calib", tokenizer="byt5", precision=precision,
                train_version=TRAIN_VERSION, transformers=transformers.__version__)


@functools.lru_cache(maxsize=4)
def _corpus_id(name: str) -> list[Any]:
    """Description and calib size of the training text: they change whenever the text does."""
    corpus = get_corpus(name)
    return [corpus.description, len(corpus.calib_text)]


def model_dir(name: str, budget: str, seed: int = 0) -> Path:
    return cache_dir("micro") / f"{name}-{budget}-{content_key(train_spec(name, budget, seed))}"


def is_trained(name: str, budget: str, seed: int = 0) -> bool:
    return (model_dir(name, budget, seed) / "train.json").exists()


def seems_trained(name: str, budget: str, seed: int = 0) -> bool:
    """Whether the cache holds this suite member trained as this code would train it, judged from the training
    records alone, for a plan (a dry run reads no corpus and checks no entry): an entry of this name and
    budget whose recorded spec matches in all but the corpus id (a changed corpus is missed here; the run's
    `ensure_trained` still retrains)."""
    want = train_recipe(name, budget, seed)
    for record in sorted((cache_root() / "micro").glob(f"{name}-{budget}-*/train.json")):
        spec = read_json(record).get("spec", {})
        if all(spec.get(k) == v for k, v in want.items()):
            return True
    return False


def planned_steps(name: str, budget: str) -> int:
    """The training steps of a suite member at `budget`, from its config alone (built on the meta device:
    nothing allocated, read or trained)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(build_config(MICRO_SUITE[name]))
    return _steps(BUDGETS[budget], active_params(model))


def step_seconds(name: str, budget: str, steps: int = 3, seed: int = 0) -> float:
    """Seconds per training step of a suite member on this machine's CPU, at `budget`'s batch: `steps` steps of
    `train`'s update after one warm-up, from a fresh initialisation on random byte ids (nothing read or
    cached; the global RNG is left as it was). What esa.phases.costs stores as the `train` cost."""
    b = BUDGETS[budget]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(build_config(MICRO_SUITE[name]), dtype=torch.float32).train()
        opt, sched = _optimiser(model, b, steps + 1)
        ids = torch.randint(0, model.config.vocab_size, (steps + 1, b.batch_size, b.seqlen))  # (steps+1, B, T)
        _step(model, opt, sched, ids[0], False)
        t = time.perf_counter()
        for batch in ids[1:]:
            _step(model, opt, sched, batch, False)
        return (time.perf_counter() - t) / steps


def load_micro(ref: str, dtype: torch.dtype = torch.float32, seed: int = 0, attn_implementation: str = "eager"):
    """(model, tokenizer) of a suite member, training it first if no cached copy exists."""
    name, budget = parse_ref(ref)
    folder = ensure_trained(name, budget, seed)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, attn_implementation=attn_implementation)
    # output_router_logits is for training only; the analysis wants plain logits
    model.config.output_router_logits = False
    return model, micro_tokenizer()


def train_log(ref: str, seed: int = 0) -> dict[str, Any]:
    """The training record (losses, tokens, seconds, device) of a trained suite member."""
    name, budget = parse_ref(ref)
    folder = ensure_trained(name, budget, seed)
    return read_json(folder / "train.json")


def ensure_trained(name: str, budget: str, seed: int = 0) -> Path:
    """The folder of a trained suite member: a sealed cache entry (esa.store.cached), checked on every use;
    trained first when absent or damaged. Folders from before manifests are adopted by their train.json."""

    def build(tmp: Path) -> None:
        model, record = train(name, budget, seed)
        model.save_pretrained(tmp, safe_serialization=True)
        write_json(tmp / "train.json", record)  # written last: what older versions look for

    return cached(model_dir(name, budget, seed), build, adopt="train.json")


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))  # decays to 10% of the peak


def train(name: str, budget: str, seed: int = 0, device: str | torch.device | None = None):
    """Train one suite member from scratch; returns (model in eval mode on CPU, training record)."""
    spec, b = MICRO_SUITE[name], BUDGETS[budget]
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    use_bf16 = dev.type == "cuda"
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(build_config(spec), dtype=torch.float32)
    finally:
        torch.random.set_rng_state(gen_state)
    model.to(dev).train()
    n_params = sum(p.numel() for p in model.parameters())
    n_active = active_params(model)

    data = windows(micro_tokenizer(), CORPUS, "calib", b.seqlen).ids  # (n_windows, seqlen), every window
    steps = _steps(b, n_active)
    opt, sched = _optimiser(model, b, steps)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, data.shape[0], (b.batch_size,), generator=gen)
        losses.append(_step(model, opt, sched, data[idx].to(dev), use_bf16))  # batch (B, T)
    seconds = time.perf_counter() - t0
    model.eval().to("cpu")
    record = dict(spec=train_spec(name, budget, seed), n_params=n_params, n_params_active=n_active,
                  steps=steps, tokens=steps * b.batch_size * b.seqlen, seconds=round(seconds, 2),
                  device=str(dev), torch_threads=torch.get_num_threads(), losses=_thin(losses))
    log.info("trained %s@%s: %d steps, %.0f s, loss %.3f -> %.3f", name, budget, steps, seconds,
             losses[0], losses[-1])
    return model, record


def _steps(b: Budget, n_active: int) -> int:
    """tokens_per_param x active parameters over the tokens of a batch, clipped to the budget's range."""
    steps = int(round(b.tokens_per_param * n_active / (b.batch_size * b.seqlen)))
    return max(b.min_steps, min(b.max_steps, steps))


def _optimiser(model: torch.nn.Module, b: Budget, steps: int) -> tuple[Any, Any]:
    """AdamW with weight decay on matrices only (not norms), the usual practice; warmup then cosine."""
    warmup = max(1, int(b.warmup_frac * steps))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": b.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=b.lr, betas=(0.9, 0.95))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, steps, warmup))


def _step(model: torch.nn.Module, opt: Any, sched: Any, batch: torch.Tensor, bf16: bool) -> float:
    """One update on `batch` (B, T); returns its loss."""
    with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(input_ids=batch, labels=batch, use_cache=False)
    out.loss.backward()  # includes the router's load-balancing term for the MoE
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return float(out.loss.detach())


def _thin(xs: list[float], n: int = 200) -> list[float]:
    """At most n points of a loss curve (the first and last always kept)."""
    if len(xs) <= n:
        return [round(x, 5) for x in xs]
    idx = np.unique(np.linspace(0, len(xs) - 1, n).round().astype(int))
    return [round(xs[i], 5) for i in idx]
