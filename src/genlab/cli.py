"""The ``genlab`` command: one subcommand group per family, each a thin call into a recipe.

    genlab demo                                   the main job on embedded defaults
    genlab flow train [--config PRESET] [--train.steps N ...] [--resume RUN_DIR]
    genlab flow sample --run-dir RUN [--solver euler --steps 2]
    genlab flow eval --run-dir RUN
    genlab vlm generate --model DIR --image IMG --prompt "caption en"

Configs are dataclasses; ``--config`` takes a YAML preset (a path or a name under configs/, e.g.
``flow/toy2d``); every field can then be overridden with a flag (``--train.lr 1e-3``).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable

from genlab import __version__
from genlab.config import ConfigError, parse_cli


PRESET_HELP = ("--config PRESET first applies a YAML preset (a path, or a name under configs/ such as flow/toy2d); "
               "--resume RUN_DIR continues the run saved there (later flags override its config.yaml).")


def split_resume(args: list[str]) -> tuple[list[str], str | None]:
    """``--resume RUN_DIR`` becomes ``--config RUN_DIR/config.yaml --run-dir RUN_DIR`` (later flags still
    override the saved config, e.g. ``--train.steps`` to extend a run); returns (args, RUN_DIR or None)."""
    if "--resume" not in args:
        return args, None
    i = args.index("--resume")
    if i + 1 >= len(args):
        raise ConfigError("--resume needs a run folder")
    run = args[i + 1]
    return ["--config", f"{run}/config.yaml", "--run-dir", run] + args[:i] + args[i + 2:], run


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _flow_train(args: list[str]) -> None:
    from genlab.flow.recipes import FlowConfig, train

    args, resume = split_resume(args)
    cfg = parse_cli(FlowConfig, args, prog="genlab flow train", description="Train a 2-D flow-matching model. " + PRESET_HELP)
    run_dir = train(cfg, resume=resume is not None)
    if is_main_process():
        print(f"run folder: {run_dir}")


def _flow_sample(args: list[str]) -> None:
    import tyro

    from genlab.flow.recipes import SampleArgs, sample

    sample(tyro.cli(SampleArgs, args=args, prog="genlab flow sample"))


@dataclass
class EvalArgs:
    run_dir: str  # a run folder written by `genlab flow train`


def _flow_eval(args: list[str]) -> None:
    import json

    import tyro

    from genlab.flow.evaluation import evaluate_toy2d
    from genlab.flow.recipes import load_trained

    a = tyro.cli(EvalArgs, args=args, prog="genlab flow eval")
    model, cfg = load_trained(a.run_dir)
    print(json.dumps(evaluate_toy2d(model, cfg, a.run_dir, step=cfg.train.steps, final=True), indent=2))


def _demo(args: list[str]) -> None:
    from genlab.demo import DemoConfig, run_demo

    run_demo(parse_cli(DemoConfig, args, prog="genlab demo", description="Run every family on embedded defaults."))


Command = tuple[Callable[[list[str]], None], str]
COMMANDS: dict[str, dict[str, Command]] = {
    "flow": {
        "train": (_flow_train, "train OT-CFM / I-CFM on 2-D data (resumable)"),
        "sample": (_flow_sample, "draw samples from a trained run with any ODE solver"),
        "eval": (_flow_eval, "W2 / MMD vs NFE, NLL, straightness and pictures for a run"),
    },
}
TOP_LEVEL: dict[str, Command] = {"demo": (_demo, "run every family on its embedded default (CPU, offline)")}


def register(group: str, name: str, fn: Callable[[list[str]], None], help: str) -> None:
    """Families add their commands here (keeps this file a thin table)."""
    COMMANDS.setdefault(group, {})[name] = (fn, help)


def _usage() -> str:
    lines = [f"genlab {__version__}: deep generative models you can read.", "", "usage: genlab COMMAND ...", ""]
    for name, (_, help) in TOP_LEVEL.items():
        lines.append(f"  genlab {name:<18} {help}")
    for group, cmds in COMMANDS.items():
        for name, (_, help) in cmds.items():
            lines.append(f"  genlab {group + ' ' + name:<18} {help}")
    lines += ["", "Every command takes --help. Configs: --config PRESET, then --section.field VALUE overrides."]
    return "\n".join(lines)


def _load_families() -> None:
    for mod in ("genlab.vlm.cli",):
        try:
            __import__(mod)
        except ModuleNotFoundError as e:  # a family not installed / not written yet
            if e.name != mod:
                raise


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _load_families()
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        print(__version__)
        return 0
    try:
        if argv[0] in TOP_LEVEL:
            TOP_LEVEL[argv[0]][0](argv[1:])
            return 0
        group = COMMANDS.get(argv[0])
        if group is None:
            print(f"genlab: unknown command '{argv[0]}'\n\n{_usage()}", file=sys.stderr)
            return 2
        if len(argv) < 2 or argv[1] in ("-h", "--help") or argv[1] not in group:
            if len(argv) >= 2 and argv[1] not in ("-h", "--help"):
                print(f"genlab {argv[0]}: unknown command '{argv[1]}'", file=sys.stderr)
            print("\n".join(f"  genlab {argv[0]} {n:<10} {h}" for n, (_, h) in group.items()))
            return 0 if len(argv) < 2 or argv[1] in ("-h", "--help") else 2
        group[argv[1]][0](argv[2:])
        return 0
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"genlab: error: {e}", file=sys.stderr)
        return 2
    finally:
        from genlab.train.distributed import cleanup

        cleanup()  # leave no process group behind under torchrun


if __name__ == "__main__":
    # Re-enter through the real module name so the families register into the table main() reads
    # (under `python -m genlab.cli` this file is also loaded as __main__, a second copy).
    from genlab.cli import main as _main

    sys.exit(_main())
