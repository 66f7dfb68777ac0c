"""The Phase 5 applications as esa-runner sees them: each adds its flags, turns them into a validated spec,
and computes its part of a run.

An application module (`esa.phases.phase5_*`) defines `APP = App(...)`, listed in `command.APPS`. The CLI adds
every app's flags,
calls `resolve` for each before anything is loaded (a spec, or None when its flags were not given), and
`command.run` calls `run` for each app with a spec, after the sensitivity scores it shares with them.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from esa.params import Profile

if TYPE_CHECKING:
    from esa.models import LoadedModel
    from esa.phases.command import Command


@dataclass(frozen=True)
class App:
    name: str  # the key of its part of summary.json ("prune", "finetune", "security", "roles")
    add_arguments: Callable[[argparse.ArgumentParser], None]
    # (parsed flags, profile) -> a validated, JSON-serialisable spec (a dataclass), or None when not asked for
    resolve: Callable[[argparse.Namespace, Profile], Any | None]
    # (spec, command, model, sensitivity runs, stage folder) -> its summary part; writes its files into stage
    run: Callable[[Any, Command, LoadedModel, Any, Path], dict[str, Any]]

