"""What a family's command table is made of (``<family>/cli.py`` holds ``COMMANDS`` and ``DEMO``).

``genlab.cli`` builds ``genlab <family> <command>`` from the tables and ``genlab.demo`` runs every
family's demo hook; a family imports this module, never ``genlab.cli``. Functions and dataclasses
are named as ``"module:attribute"`` so that ``genlab --help`` lists every command without
importing torch; ``resolve`` imports them when a command runs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from genlab.errors import ConfigError


@dataclass(frozen=True)
class Command:
    """One ``genlab <family> <name>`` command.

    ``run`` is called with the parsed ``args`` dataclass. A training command (``train=True``) takes
    ``--config PRESET``, ``--resume RUN``, ``--overwrite`` and every field of its recipe config; its
    ``run(cfg, resume=..., overwrite=...)`` returns the run folder, which is printed (then ``hint``,
    formatted with ``run_dir``).
    """

    run: str
    args: str
    help: str
    train: bool = False
    description: str = ""
    hint: str = ""
    # Every recipe behind this training command, as (name, run, args), the command's own included.
    # A preset (or a resumed run's config.yaml) picks one with its top-level ``recipe:`` key, the
    # command line with ``--recipe NAME``; without either, ``run`` / ``args`` above.
    recipes: tuple[tuple[str, str, str], ...] = ()

    def pick(self, recipe: str | None) -> tuple[str, str]:
        """(run, args) of the recipe named ``recipe`` (None: the command's own)."""
        if recipe is None:
            return self.run, self.args
        for name, run, args in self.recipes:
            if name == recipe:
                return run, args
        known = [name for name, _, _ in self.recipes] or ["(this command has one recipe)"]
        raise ConfigError(f"recipe '{recipe}' is not a recipe of this command; choose one of {', '.join(known)}")


@dataclass(frozen=True)
class Demo:
    """A family's part of ``genlab demo``: ``run(cfg, out_dir) -> summary dict`` on the embedded
    default ``config`` (one section of the demo's config, e.g. ``--flow.train.steps``)."""

    run: str
    config: str


def resolve(ref: str) -> Any:
    """The object named by ``"package.module:attribute"``."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)
