"""Fine-tuning on a shift of domain: one training loop, sparse fine-tuning of a selected set, LoRA and full
fine-tuning baselines, protection of critical weights during training, and export of the result.

- `domains`: offline target domains (`gsm8k`: the GSM8K test set with worked solutions), train/held-out split.
- `loop`: `train(model, method, train_ids, TrainConfig, ...)` -> `TrainResult`; `Evaluator`; checkpoints.
- `methods`: `METHODS` (sparse, lora, full) and `make_method`; `SELECTIONS` / `check_selection`.
- `sparse`, `lora`, `full`: the methods (`base.Method` is the interface the loop and retention variants use).
- `retention`: `RETENTIONS` (none, freeze, ewc, anchor, random_freeze: the protections against forgetting
  that profiles list under `protections:`) and `RetentionSpec`.
- `export`: `SparseDelta` (indices + values, bit-exact re-application) and `save_merged` (safetensors).
- `grid`: a study's grid of runs (`Arm`s) on one model, every arm once per seed from the same base weights.
- `tables`, `prose`: a grid's summary tables over seeds, and those numbers said in sentences; `plots`: figures.
"""

from esa.apps.training.base import Coef, Method, Penalty
from esa.apps.training.domains import (
    DOMAINS,
    check_domain,
    domain_windows,
    get_domain,
    gsm8k_problems,
    split_problems,
)
from esa.apps.training.export import SparseDelta, save_merged
from esa.apps.training.full import FullFT
from esa.apps.training.loop import (
    Evaluator,
    StepInfo,
    TrainConfig,
    TrainResult,
    channel_probe,
    cosine_lr,
    lm_loss,
    optimizer_state_bytes,
    train,
)
from esa.apps.training.lora import LoraFT, LoraPlan, plan_lora
from esa.apps.training.methods import METHODS, SELECTIONS, check_selection, make_method
from esa.apps.training.retention import (
    RETENTIONS,
    RetentionSpec,
    check_lora_protections,
    check_retention,
    union,
)
from esa.apps.training.sparse import SparseFT, check_density, count_at_density, targets_at_density

__all__ = [
    "DOMAINS", "METHODS", "RETENTIONS", "SELECTIONS", "Coef", "Evaluator", "FullFT", "LoraFT", "LoraPlan",
    "Method", "Penalty", "RetentionSpec", "SparseDelta", "SparseFT", "StepInfo", "TrainConfig", "TrainResult",
    "channel_probe", "check_density", "check_domain", "check_lora_protections", "check_retention", "check_selection", "cosine_lr",
    "count_at_density", "domain_windows",
    "get_domain", "gsm8k_problems", "lm_loss", "make_method", "optimizer_state_bytes", "plan_lora", "save_merged",
    "split_problems", "targets_at_density", "train", "union",
]
