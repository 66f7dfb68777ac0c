"""Model loading (`load`), description (`ModelInfo`) and the inventory of weights under study."""

from esa.models.embedded import EMBEDDED
from esa.models.inventory import WeightSpec, classify, weight_inventory
from esa.models.loader import (
    DTYPES,
    LoadedModel,
    ModelInfo,
    describe,
    inventory_without_weights,
    known_models,
    load,
    parse_dtype,
)
from esa.models.tiny import TINY_CONFIGS, tiny_model, tiny_tokenizer

__all__ = [
    "DTYPES", "EMBEDDED", "TINY_CONFIGS", "LoadedModel", "ModelInfo", "WeightSpec", "classify", "describe",
    "inventory_without_weights", "known_models", "load", "parse_dtype", "tiny_model", "tiny_tokenizer",
    "weight_inventory",
]
