"""Tiny random-initialised models of every architecture the research guide names, for tests.

They are built from configs (no download), seeded, and share a byte-level tokenizer (ByT5's, which
needs no vocabulary file), so every test runs offline in seconds.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import (
    AutoModelForCausalLM,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
)

from esa.registry import Registry

VOCAB = 384  # ByT5: 3 specials + 256 bytes + 125 sentinels
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
               eos_token_id=1, tie_word_embeddings=False)

TINY_CONFIGS: Registry[Callable[[], PretrainedConfig]] = Registry("tiny model")
TINY_CONFIGS.register(lambda: LlamaConfig(**_COMMON, num_key_value_heads=2), "tiny-llama",
                      "Llama, 2 layers, hidden 32, 4 heads, 2 KV heads")
TINY_CONFIGS.register(lambda: MistralConfig(**_COMMON, num_key_value_heads=2, sliding_window=64),
                      "tiny-mistral", "Mistral, 2 layers, hidden 32, 4 heads, 2 KV heads, sliding window 64")
TINY_CONFIGS.register(lambda: Phi3Config(**_COMMON, num_key_value_heads=4), "tiny-phi3",
                      "Phi-3 (fused qkv and gate_up projections), 2 layers, hidden 32, 4 heads")
TINY_CONFIGS.register(lambda: MixtralConfig(**_COMMON, num_key_value_heads=2, num_local_experts=4,
                                            num_experts_per_tok=2), "tiny-mixtral",
                      "Mixtral MoE, 2 layers, hidden 32, 4 experts, top-2 routing")
TINY_CONFIGS.register(lambda: GPTNeoXConfig(**{k: v for k, v in _COMMON.items() if k != "pad_token_id"},
                                            use_parallel_residual=True), "tiny-gptneox",
                      "GPT-NeoX (Pythia layout, parallel residual), 2 layers, hidden 32, 4 heads")
# Qwen2: biases on q/k/v only (o and the MLP have none), grouped-query attention like the real 0.5B
TINY_CONFIGS.register(lambda: Qwen2Config(**_COMMON, num_key_value_heads=2), "tiny-qwen2",
                      "Qwen2 (biases on q/k/v only), 2 layers, hidden 32, 4 heads, 2 KV heads")


def tiny_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32,
               attn_implementation: str = "eager") -> torch.nn.Module:
    """Build the named tiny model with weights drawn from `seed` (same seed, same weights). Eager attention by
    default (tests read attention probabilities); `esa.models.load` passes the kernel a caller asks for."""
    config = TINY_CONFIGS[name]()
    config._attn_implementation = attn_implementation
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    finally:
        torch.random.set_rng_state(gen_state)
    return model.eval()


def tiny_tokenizer():
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()
