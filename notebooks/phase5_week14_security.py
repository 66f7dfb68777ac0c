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
# # phase5_week14_security (being built)

# %% tags=["parameters"]
profile = "smoke"
models = None
run_dir = "reports/interactive"
overrides = {}

# %%
import esa.nb

ctx = esa.nb.context("phase5_week14_security", profile, models, run_dir, overrides)
print(f"profile {ctx.profile.name}: models {ctx.models}")
