"""``genlab demo``: every family on its embedded default, offline, on a laptop CPU.

The demo's config has ``out``, ``families`` and one section per family (its demo hook's config:
``--flow.train.steps 500``, ``--vlm.train.steps 200``). Each family writes its own run folder under
``out`` (the demo overwrites its own folders, so it can be run again and again); a summary of the
headline figures goes to ``out/summary.json`` and is printed at the end.
"""

from __future__ import annotations

import importlib
import json
import time
from dataclasses import dataclass, field, fields, make_dataclass
from functools import cache
from pathlib import Path
from typing import Iterable

from genlab.commands import Demo, resolve
from genlab.config import Check, validate
from genlab.io import atomic_write_json
from genlab.train.run import check_run_dir


def family_demos(families: dict[str, str]) -> dict[str, Demo]:
    """Each family's DEMO hook, from ``{family: its cli module}`` (``genlab.cli.FAMILIES``); a command
    table without one (``data``: it writes datasets, it trains nothing) is not part of the demo."""
    hooks = {name: getattr(importlib.import_module(mod), "DEMO", None) for name, mod in families.items()}
    return {name: hook for name, hook in hooks.items() if hook is not None}


@dataclass
class _DemoBase:
    out: str = "runs/demo"
    families: tuple[str, ...] = ()  # which families to run (default: all)

    def checks(self) -> Iterable[Check]:
        known = [f.name for f in fields(self) if f.name not in ("out", "families")]
        unknown = [f for f in self.families if f not in known]
        yield "families", not unknown, f"unknown {unknown}; choose from {known}"


@cache
def demo_config_class(families: tuple[tuple[str, str], ...]) -> type:
    """``DemoConfig``: out, families, and one section per family holding its demo config."""
    demos = family_demos(dict(families))
    sections = [(name, resolve(d.config), field(default_factory=resolve(d.config))) for name, d in demos.items()]
    cls = make_dataclass("DemoConfig", sections, bases=(_DemoBase,))
    cls.__module__ = __name__
    return cls


def run_demo(cfg, families: dict[str, str]) -> dict:
    """Run the families ``cfg.families`` (all when empty) in order; write and return the summary."""
    validate(cfg)
    out = Path(cfg.out)
    check_run_dir(out, flag="--out")
    out.mkdir(parents=True, exist_ok=True)
    demos = family_demos(families)
    summary = {}
    for name in cfg.families or tuple(demos):
        t0 = time.perf_counter()
        print(f"== genlab demo: {name} ==", flush=True)
        summary[name] = resolve(demos[name].run)(getattr(cfg, name), out / name)
        summary[name]["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_json(out / "summary.json", summary)
    print(json.dumps(summary, indent=2))
    print(f"pictures and metrics: {out}/*/")
    return summary
