"""Phase 5 (pruning): placeholder, replaced by its implementation."""

from __future__ import annotations

from esa.phases.apps import App

APP = App(name="pruning", add_arguments=lambda parser: None, resolve=lambda args, profile: None,
          run=lambda spec, cmd, lm, runs, stage: {})
