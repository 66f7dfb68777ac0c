"""The phases layer: what each week of the research schedule computes from recipes and methods, and its criteria.

- `phase1`: baselines (week 0); `phase2`: sensitivity metrics (weeks 1-4); `phase3`: perturbation validation
  (weeks 5-8); `phase4`: scaling and architecture measures (weeks 9-12); `criteria`: the guide's Phase 2/3
  success criteria; `command`: what one esa-runner invocation computes.
Notebooks and esa-runner call these; nothing here knows about Jupyter or the command line.
"""
