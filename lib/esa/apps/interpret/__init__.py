"""Interpretability of critical weights: ablation-verified roles, the super-weight chain, attention sinks, and
knowledge localisation (issue 19).

- `roles`: the role catalogue (`ROLES`, one registered `Role` per hypothesis) and `run_roles(...)` ->
  `RoleReport`; `criterion`, `role_metric_table`, `wide_table` summarise it.
- `chain`: `trace_chain(...)` follows one weight -> its residual channel -> the attention sinks through depth
  on one sentence (baseline, weight zeroed, matched control zeroed); `plot_chain` draws it.
- `sinks`: per-head sink strength, per-head sensitivity of q/k/v/o, and their rank correlation.
- `probes`: the offline Shakespeare fact probe set, its TSV file format, and its scoring.
- `localise`: probe- vs generic-calibrated top-k ablations (selectivity) and the direct Hase-style test.
- `critical`: which weights are explained (each metric's global top-k plus the super-weight detector's
  candidates) and which one's chain is traced; `tables`: the criterion's share and the headline rows;
  `sentences`: Markdown sentences computed from each result.
- `anatomy`, `passes`, `tokens`, `correlation`: where modules live (and `Eager` attention for a block), the one
  reduced-capture forward pass, the stopword / sink token sets and default inputs, and Spearman with a
  bootstrap CI.
"""

from esa.apps.interpret.anatomy import Eager
from esa.apps.interpret.chain import ChainTrace, plot_chain, trace_chain
from esa.apps.interpret.critical import (
    DETECTOR,
    critical_selection,
    detector_table,
    has_candidate,
    trace_chosen,
)
from esa.apps.interpret.localise import (
    DirectTest,
    Localisation,
    SelectivityResult,
    ablation_sets,
    direct_candidates,
    direct_test,
    localisation,
    metric_scores,
    probe_windows,
    selectivity,
    top_targets,
)
from esa.apps.interpret.probes import (
    ProbeItem,
    ProbeScores,
    ProbeSet,
    build_probes,
    probe_summary,
    read_probes,
    score_probes,
    write_probes,
)
from esa.apps.interpret.roles import (
    ABLATION_ROLES,
    ROLES,
    Role,
    RoleConfig,
    RoleReport,
    catalogue,
    criterion,
    parse_roles,
    role_metric_table,
    roles_for,
    run_roles,
    top_selection,
    wide_table,
)
from esa.apps.interpret.sinks import (
    SinkCorrelation,
    head_sensitivity,
    head_sink_correlation,
    head_sink_strength,
    plot_sinks,
    sink_correlation,
)
from esa.apps.interpret.tables import headline, role_share, share_table
from esa.apps.interpret.tokens import STOPWORDS, default_inputs, sink_mask, stopword_ids

__all__ = [
    "ABLATION_ROLES", "DETECTOR", "ROLES", "STOPWORDS", "ChainTrace", "DirectTest", "Eager", "Localisation",
    "ProbeItem", "ProbeScores", "ProbeSet", "Role", "RoleConfig", "RoleReport", "SelectivityResult",
    "SinkCorrelation", "ablation_sets", "build_probes", "catalogue", "criterion", "critical_selection",
    "default_inputs", "detector_table", "direct_candidates", "direct_test", "has_candidate", "head_sensitivity",
    "head_sink_correlation", "head_sink_strength", "headline", "localisation", "metric_scores", "parse_roles",
    "plot_chain", "plot_sinks", "probe_summary", "probe_windows", "read_probes", "role_metric_table", "role_share",
    "roles_for", "run_roles", "score_probes", "selectivity", "share_table", "sink_correlation", "sink_mask",
    "stopword_ids", "top_selection", "top_targets", "trace_chain", "trace_chosen", "wide_table", "write_probes",
]
