"""``genlab demo``: every family on its embedded default, offline, on a laptop CPU.

Each family writes its own run folder under ``out``; a summary of the headline figures goes to
``out/summary.json`` and is printed at the end.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from genlab.flow.recipes import FlowConfig


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    families: tuple[str, ...] = ("flow", "vlm")  # which families to run
    flow: FlowConfig = field(default_factory=FlowConfig)


def _flow(cfg: DemoConfig, out: Path) -> dict:
    from genlab.flow.recipes import train

    run = train(replace(cfg.flow, run_dir=str(out / "flow")))
    report = json.loads((run / "eval.json").read_text())
    by = {f"{r['solver']}@{r['nfe']}": round(r["w2"], 4) for r in report["solvers"]}
    return {"run_dir": str(run), "w2": by, "nll_bits_per_dim": report.get("nll_bits_per_dim"),
            "straightness": report["straightness"]}


def _vlm(cfg: DemoConfig, out: Path) -> dict:
    from genlab.vlm.demo import run_vlm_demo

    return run_vlm_demo(out / "vlm")


FAMILIES = {"flow": _flow, "vlm": _vlm}


def run_demo(cfg: DemoConfig) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for name in cfg.families:
        if name not in FAMILIES:
            raise ValueError(f"demo: unknown family '{name}'; choose from {sorted(FAMILIES)}")
        t0 = time.perf_counter()
        print(f"== genlab demo: {name} ==", flush=True)
        summary[name] = FAMILIES[name](cfg, out)
        summary[name]["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"pictures and metrics: {out}/*/")
    return summary
