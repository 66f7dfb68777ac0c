"""Security of critical weights: bit flips in real storage formats, attacks, faults, protection, backdoors.

- `formats`: storage formats (`FORMATS`: bf16, fp16, fp32 as stored; simulated per-channel int8), the
  `stored(model, fmt)` store, flip sets and `flipped(store, flips)` (in place, bit-exact restore).
- `collapse`: the share of weights whose single worst flip collapses the model (Wilson CI).
- `bfa`: progressive bit search (gradient-ranked bits, in-layer then cross-layer, one flip per iteration).
- `faults`: Monte-Carlo fault campaigns at per-bit rates, protection curves, the random-flip baseline.
- `defences`: guards (`DEFENCES`: ecc, parity, bounded; the profiles' `protect_mode`) over a protected
  weight set.
- `adversarial`: projected gradient ascent in weight space under an L-infinity budget on a target set.
- `backdoor`: a detector from sensitivity-map statistics against a clean reference, a weight-delta spectral
  baseline, AUROC with a bootstrap CI.
- `poison`: clean and backdoored twin models fine-tuned offline from one base, and their attack success rate.
- `attacks`: the attack registry (`ATTACKS`: bfa, random) behind `run_attack`.
- `compare`: the critical set against matched random sets on one model (attacks, set faults, PGD,
  protection) and the per-format collapse and fault tables, as the Phase 5 week-14 study runs them.
- `sentences`: what those tables say, as sentences computed from them (a study's findings).
"""

from esa.apps.security.adversarial import RADII, pgd_attack, pgd_compare
from esa.apps.security.attacks import ATTACKS, flips_needed, flips_ratio, run_attack, summarise_attacks
from esa.apps.security.backdoor import (
    anomaly_scores,
    auroc,
    auroc_ci,
    detect,
    map_features,
    sensitivity_features,
    spectral_features,
)
from esa.apps.security.bfa import AttackConfig, AttackResult, progressive_bit_search
from esa.apps.security.collapse import CollapseResult, collapse_share
from esa.apps.security.common import top_fraction, uniform_targets, wilson_ci
from esa.apps.security.defences import (
    DEFENCES,
    Guard,
    magnitude_like,
    matched_random,
    parity_bits,
    random_like,
)
from esa.apps.security.faults import (
    FaultResult,
    fault_campaign,
    protection_curve,
    random_flip_search,
    set_faults,
)
from esa.apps.security.formats import (
    FORMATS,
    FlipSet,
    FlipStats,
    Store,
    describe_flips,
    flipped,
    get_format,
    make_flips,
    stored,
)
from esa.apps.security.poison import PoisonConfig, TwinSuite, make_twins

__all__ = [
    "ATTACKS", "DEFENCES", "FORMATS", "RADII", "AttackConfig", "AttackResult", "CollapseResult",
    "FaultResult", "FlipSet", "FlipStats", "Guard", "PoisonConfig", "Store", "TwinSuite", "anomaly_scores", "auroc", "auroc_ci",
    "collapse_share", "describe_flips", "detect", "fault_campaign", "flipped", "flips_needed", "flips_ratio",
    "get_format", "magnitude_like", "make_flips", "make_twins", "map_features", "matched_random", "parity_bits", "pgd_attack", "pgd_compare",
    "progressive_bit_search", "protection_curve", "random_flip_search", "random_like", "run_attack",
    "sensitivity_features", "set_faults", "spectral_features", "stored", "summarise_attacks", "top_fraction",
    "uniform_targets", "wilson_ci",
]
