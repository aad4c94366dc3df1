"""The ``genlab`` command: ``genlab <family> <command>``, built from each family's command table.

    genlab demo                                   the main job on embedded defaults
    genlab flow train [--config PRESET] [--train.steps N ...] [--resume RUN_DIR] [--overwrite]
    genlab flow sample --run-dir RUN [--solver euler --steps 2]
    genlab vlm generate --model DIR --image IMG --prompt "caption en"

Configs are dataclasses; ``--config`` takes a YAML preset (a path or a name such as ``flow/toy2d``);
every field can then be overridden with a flag (``--train.lr 1e-3``). A family is one line in
``FAMILIES`` (its ``<family>/cli.py`` holds ``COMMANDS`` and ``DEMO``, see ``genlab.commands``).
Known errors print one line ``genlab: error: ...`` and exit 2 (``GENLAB_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import importlib
import os
import sys

from genlab import __version__
from genlab.commands import Command, resolve
from genlab.errors import ConfigError, GenlabError

FAMILIES = {
    "flow": "genlab.flow.cli",
    "vlm": "genlab.vlm.cli",
    "qformer": "genlab.vlm.qformer_cli",
    "text": "genlab.text.cli",
    "data": "genlab.data.cli",
}

RUN_FLAGS = """options of every training command (before the fields of its config):
  --config PRESET    start from a YAML preset: a path, or a shipped name ({presets})
  --resume RUN_DIR   continue the run saved in RUN_DIR from its newest complete checkpoint; flags given
                     with it override its config.yaml (e.g. --train.steps N to train further)
  --overwrite        start a fresh run in a --run-dir that already holds one (deletes everything in it)
"""


def family_commands(family: str) -> dict[str, Command]:
    return importlib.import_module(FAMILIES[family]).COMMANDS


def _usage() -> str:
    lines = [f"genlab {__version__}: deep generative models you can read.", "", "usage: genlab COMMAND ...", "",
             f"  genlab {'demo':<20} run every family on its embedded default (CPU, offline)"]
    for family in FAMILIES:
        for name, cmd in family_commands(family).items():
            lines.append(f"  genlab {family + ' ' + name:<20} {cmd.help}")
    lines += ["", "Every command takes --help. Configs: --config PRESET, then --section.field VALUE overrides."]
    return "\n".join(lines)


def split_run_flags(args: list[str]) -> tuple[list[str], str | None, bool]:
    """Take ``--resume RUN`` / ``--resume=RUN`` and ``--overwrite`` out of ``args``."""
    rest, resume, overwrite = [], None, False
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--resume":
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError("--resume needs a run folder")
            resume, i = args[i + 1], i + 2
            continue
        if a.startswith("--resume="):
            resume = a.split("=", 1)[1]
            if not resume:
                raise ConfigError("--resume needs a run folder")
        elif a == "--overwrite":
            overwrite = True
        else:
            rest.append(a)
        i += 1
    return rest, resume, overwrite


def _has_flag(args: list[str], name: str) -> bool:
    return any(a == name or a.startswith(name + "=") for a in args)


def run_train(family: str, name: str, cmd: Command, args: list[str]) -> None:
    """The one train wrapper: preset, overrides, ``--resume``, ``--overwrite``, the run folder on rank 0,
    and a one-line hint on Ctrl-C."""
    from genlab.config import parse_cli, preset_names, recipe_named, take_config_flag
    from genlab.train.distributed import dist_info
    from genlab.train.run import read_run_config

    args, resume, overwrite = split_run_flags(args)
    prog = f"genlab {family} {name}"
    description = cmd.description
    if "-h" in args or "--help" in args:  # tyro lists the config's fields; these come first
        presets = ", ".join(p for p in preset_names() if p.startswith(f"{family}/")) or "none shipped"
        print(RUN_FLAGS.format(presets=presets))
        if cmd.recipes:
            names = ", ".join(name for name, _, _ in cmd.recipes)
            print(f"  --recipe NAME      which recipe ({names}); a preset names its own with `recipe:`; the\n"
                  f"                     fields below are the chosen recipe's (default: {cmd.recipes[0][0]})\n")
    preset = None
    if resume is not None:
        for bad in ("--run-dir", "--config"):
            if _has_flag(args, bad):
                raise ConfigError(f"--resume {resume} continues that run in its own folder with its own "
                                  f"config.yaml: drop {bad} (or start a new run without --resume)")
        preset = str(read_run_config(resume, family))
        args = ["--run-dir", resume, *args]
    run_ref, args_ref = cmd.pick(recipe_named(args, take_config_flag(args)[0] or preset))
    cfg = parse_cli(resolve(args_ref), args, prog=prog, description=description, preset=preset)
    main_rank = dist_info().is_main
    try:
        run_dir = resolve(run_ref)(cfg, resume=resume is not None, overwrite=overwrite)
    except KeyboardInterrupt:
        if main_rank:
            print(f"\ngenlab: interrupted; continue with: genlab {family} {name} --resume {cfg.run_dir}",
                  file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    if main_rank:
        print(f"run folder: {run_dir}" + (f"  {cmd.hint.format(run_dir=run_dir)}" if cmd.hint else ""))


def run_command(family: str, name: str, cmd: Command, args: list[str]) -> None:
    import tyro

    if cmd.train:
        return run_train(family, name, cmd, args)
    cls = resolve(cmd.args)
    resolve(cmd.run)(tyro.cli(cls, args=args, prog=f"genlab {family} {name}", description=cmd.help))


def _demo(args: list[str]) -> None:
    from genlab.config import parse_cli
    from genlab.demo import demo_config_class, run_demo

    cls = demo_config_class(tuple(FAMILIES.items()))
    run_demo(parse_cli(cls, args, prog="genlab demo", description="Run every family on its embedded default "
                       "(offline, CPU); --families flow vlm picks some, --flow.train.steps N ... changes one."),
             FAMILIES)


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        print(__version__)
        return 0
    if argv[0] == "demo":
        _demo(argv[1:])
        return 0
    if argv[0] not in FAMILIES:
        print(f"genlab: unknown command '{argv[0]}'\n\n{_usage()}", file=sys.stderr)
        return 2
    family, commands = argv[0], family_commands(argv[0])
    listing = "\n".join(f"  genlab {family} {n:<12} {c.help}" for n, c in commands.items())
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(f"usage: genlab {family} COMMAND ...\n\n{listing}")
        return 0
    if argv[1] not in commands:
        print(f"genlab {family}: unknown command '{argv[1]}'\n\n{listing}", file=sys.stderr)
        return 2
    run_command(family, argv[1], commands[argv[1]], argv[2:])
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _dispatch(argv)
    except (GenlabError, FileNotFoundError, ValueError) as e:  # known problems with the input: one line
        if os.environ.get("GENLAB_DEBUG"):
            raise
        print(f"genlab: error: {e}", file=sys.stderr)
        return 2
    except PermissionError as e:  # a folder or file the user cannot write: say which
        if os.environ.get("GENLAB_DEBUG"):
            raise
        print(f"genlab: error: permission denied: {e.filename or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ngenlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `genlab ... --help | head`: the reader left; nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        from genlab.train.distributed import cleanup

        cleanup()  # leave no process group behind under torchrun


if __name__ == "__main__":
    sys.exit(main())
