# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python (esa)
#     language: python
#     name: esa
# ---

# %% [markdown]
# # Phase 4 · Week 10: where do critical weights sit, by architecture?
#
# **Question.** Is sensitivity concentrated in attention or in the FFN, does it rise or fall with depth,
# and does an MoE (experts vs attention vs router) differ from dense models trained the same way?
# Ratios use mean top-k *scores* (with per-layer selection every matrix gives exactly k weights, so counts
# alone say nothing). Every statistical comparison lists its confounds; layers of one model are not
# independent replicates, so p-values here are descriptive of these models, not of architectures at large.

# %% tags=["parameters"]
profile = "smoke"
models = None
run_dir = "reports/interactive"
overrides = {}

# %%
import matplotlib.pyplot as plt
import seaborn as sns

import esa.nb
from esa.analysis import architecture
from esa.nb import say
from esa.phases import phase4
from esa.report import scorecard

ctx = esa.nb.context("phase4_week10_architecture_comparison", profile, models, run_dir, overrides)
P = ctx.profile
measures, tables, source = phase4.week9_results(ctx.run_dir, models, P)
meta = measures[["model", "family", "moe", "n_layers"]]
out = architecture.compare_architectures(tables, meta, n_perm=5000)
for name, df in out.items():
    ctx.save_table(df, name)
say(f"{len(tables)} models, read from {source}.")

# %%
out["attn_ffn"].groupby("model")[["attention_mean_score", "ffn_mean_score", "attn_ffn_ratio"]].mean()

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
by_size = measures.sort_values("n_params")["model"] if "n_params" in measures else measures["model"]
by_size = [m for m in by_size if m in set(out["layer_observations"]["model"])]  # smallest model first
sns.lineplot(data=out["progression"], x="rel_depth", y="score_vs_model_median", hue="model", style="group",
             marker="o", ax=axes[0], hue_order=by_size)
axes[0].set(yscale="log", xlabel="relative depth", ylabel="mean top-k score / model median",
            title="Layer-wise progression")
axes[0].legend(fontsize=6, bbox_to_anchor=(1.01, 1), loc="upper left")  # beside the lines, not over them
sns.stripplot(data=out["layer_observations"], x="model", y="log_attn_ffn", ax=axes[1], order=by_size)
axes[1].axhline(0, color="k", lw=0.8)
axes[1].set(ylabel="log(attention / FFN mean top-k score)", xlabel="", title="Attention vs FFN per layer")
axes[1].tick_params(axis="x", rotation=30, labelsize=7)
fig.tight_layout()
_r = out["attn_ffn"].groupby("model")["attn_ffn_ratio"].mean()
ctx.savefig(fig, "architecture", caption="Top-k score by relative depth (left) and attention/FFN log-ratio per "
            "layer (right), models by size.",
            takeaway=f"Attention/FFN ratio of mean top-k scores: {_r.min():.2f} ({_r.idxmin()}) to "
                     f"{_r.max():.2f} ({_r.idxmax()}).")

# %%
out["moe_by_kind"]

# %%
tests = out["tests"]
ctx.table(tests, "tests", "Architecture comparisons: permutation and Mann-Whitney tests, Holm-corrected.",
          columns=["comparison", "n_a", "n_b", "diff", "p_perm", "p_perm_holm", "p_mw_holm", "rank_biserial",
                   "confounds"],
          headers={"n_a": "n (first)", "n_b": "n (second)", "diff": "Difference of mean log-ratio",
                   "p_perm": "p (permutation)", "p_perm_holm": "p (permutation, Holm)",
                   "p_mw_holm": "p (Mann-Whitney, Holm)", "rank_biserial": "Rank-biserial r"})

# %%
from IPython.display import Markdown, display  # noqa: E402

r = out["attn_ffn"].groupby("model")["attn_ffn_ratio"].mean()
lines = [f"Attention/FFN ratio of mean top-k scores ranges {r.min():.2f} ({r.idxmin()}) to {r.max():.2f} "
         f"({r.idxmax()})."]
for t in tests.itertuples():
    lines.append(f"- {t.comparison} ({t.group_col}): difference of mean log-ratio {t.diff:+.2f}, permutation "
                 f"p = {t.p_perm:.3g} (Holm {t.p_perm_holm:.3g}). Confounds: {t.confounds}.")
kinds = out["moe_by_kind"]
for m, sub in kinds.groupby("model"):
    shares = ", ".join(f"{k} {s:.0%}" for k, s in zip(sub.kind, sub.score_share, strict=True))
    lines.append(f"- {m}: share of top-k score mass by kind: {shares}.")
display(Markdown("\n".join(lines)))
say(scorecard.in_words([c for c in scorecard.read_all(ctx.run_dir) if c.get("notebook") == ctx.notebook]))

# %%
_low = tests.sort_values("p_perm_holm").head(1)
esa.nb.found(
    f"The attention/FFN ratio of mean top-k scores ranges from {r.min():.2f} ({r.idxmin()}) to {r.max():.2f} "
    f"({r.idxmax()}) ({ctx.ref('figure', 'architecture')}).",
    *[f"The strongest architecture contrast, {t.comparison}, differs by {t.diff:+.2f} in mean log-ratio with "
      f"permutation p = {t.p_perm_holm:.3g} after Holm correction ({ctx.ref('table', 'tests')})."
      for t in _low.itertuples()])
