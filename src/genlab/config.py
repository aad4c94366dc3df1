"""Dataclass configs <-> YAML <-> command-line overrides.

A recipe's config is a (nested) dataclass whose defaults are the embedded CPU preset. A preset YAML
file overrides some fields; command-line flags (parsed by tyro, e.g. ``--train.lr 1e-3``) override
the result. Every key is checked: an unknown key or a value of the wrong type is a ``ConfigError``
that names the key and the file it came from.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from genlab.errors import ConfigError  # re-exported: ``from genlab.config import ConfigError``

T = TypeVar("T")




def _check_value(key: str, value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` converted to ``tp`` if it is a faithful match, else raise ConfigError."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for arm in get_args(tp):
            try:
                return _check_value(key, value, arm, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: key '{key}' = {value!r} matches none of {tp}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: key '{key}' must be null, got {value!r}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{where}: key '{key}' = {value!r} is not one of {list(get_args(tp))}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: key '{key}' must be a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: key '{key}' needs {len(args)} items, got {len(value)}")
            items = [_check_value(f"{key}[{i}]", v, a, where) for i, (v, a) in enumerate(zip(value, args))]
        else:
            arm = args[0] if args else Any
            items = [_check_value(f"{key}[{i}]", v, arm, where) for i, v in enumerate(value)]
        return origin(items)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: key '{key}' must be true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: key '{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: key '{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: key '{key}' must be a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        raise ConfigError(f"{where}: key '{key}' is a section; give it as a mapping")
    return value


def merge(cfg: T, data: dict, where: str = "config", prefix: str = "") -> T:
    """Return a copy of dataclass ``cfg`` with the entries of ``data`` applied, checking every key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(type(cfg))
    fields = {f.name for f in dataclasses.fields(cfg)}
    changes = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(
                f"{where}: unknown key '{full}'; valid keys here: {', '.join(sorted(fields))}"
            )
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            changes[key] = merge(current, value, where, prefix=f"{full}.")
        else:
            changes[key] = _check_value(full, value, hints[key], where)
    return dataclasses.replace(cfg, **changes)


def to_dict(cfg: Any) -> dict:
    """Plain-python view of a dataclass config (tuples become lists, for YAML)."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def load_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return data


def save_yaml(cfg: Any, path: str | os.PathLike, header: str = "") -> None:
    """Write the resolved config atomically (``header`` becomes a leading comment line)."""
    from genlab.io import atomic_write_text

    atomic_write_text(path, (f"# {header}\n" if header else "") + yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------- validation

def flag(path: str) -> str:
    """The command-line spelling of a config field: ``train.batch_size`` -> ``--train.batch-size``."""
    return "--" + path.replace("_", "-")


Check = tuple[str, bool, str]  # (field, ok, what it must be), the field relative to its dataclass


def validate(cfg: Any, prefix: str = "") -> None:
    """Check a whole (nested) config before anything is written: every dataclass in it may define
    ``checks(self) -> Iterable[(field, ok, requirement)]``; the first failing check is a ConfigError
    that names the flag as the user types it (``--train.batch-size=0: must be >= 1``). A model's own
    config (which round-trips with a Hugging Face config.json) may instead have ``validate(where)``,
    called with its section's flag (``--vision: hidden_size=96 is not divisible by ...``). Sections are
    checked before the config that holds them, so its checks may rely on theirs."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, f"{prefix}{f.name}.")
    checks = getattr(cfg, "checks", None)
    if checks is None:
        if callable(getattr(cfg, "validate", None)) and prefix:
            cfg.validate(flag(prefix.rstrip(".")))
        return
    for name, ok, requirement in checks():
        if not ok:
            value: Any = cfg
            for part in name.split("."):
                value = getattr(value, part, None)
            shown = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            raise ConfigError(f"{flag(prefix + name)}={shown}: {requirement}")


def positive(*names: str, cfg: Any) -> list[Check]:
    """``>= 1`` checks for integer counts and sizes."""
    return [(n, getattr(cfg, n) >= 1, "must be >= 1") for n in names]


MAX_SEED = 2**63 - 1  # torch.manual_seed's range ends near here; larger seeds overflow with no flag named


def seed_check(name: str = "seed", cfg: Any = None) -> Check:
    v = getattr(cfg, name)
    return name, 0 <= v <= MAX_SEED, f"must be in [0, {MAX_SEED}]"


def folder_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be (made into) a folder to write in, or None: it is a file, or the nearest
    existing folder above it is a file."""
    p = Path(path)
    if p.exists():
        return None if p.is_dir() else "is a file; give a folder"
    for up in p.parents:
        if up.exists():
            return None if up.is_dir() else f"{up} is a file, not a folder"
    return None


def non_negative(*names: str, cfg: Any) -> list[Check]:
    return [(n, getattr(cfg, n) >= 0, "must be >= 0") for n in names]


def config_search_dirs() -> list[Path]:
    """Where preset names like ``flow/toy2d`` are looked up: ./configs, then the presets shipped inside
    the package (``genlab/configs``, which the repository's top-level ``configs`` links to)."""
    return [Path.cwd() / "configs", Path(__file__).resolve().parent / "configs"]


def preset_names() -> list[str]:
    """Every preset shipped with genlab, as ``family/name``."""
    root = Path(__file__).resolve().parent / "configs"
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def resolve_preset(name: str) -> Path:
    """A path to a YAML file, or a preset name such as ``flow/toy2d`` found under configs/."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    for d in config_search_dirs():
        cand = d / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
        if cand.is_file():
            return cand
    raise ConfigError(
        f"config '{name}' not found: give a YAML path or a preset name under "
        + " or ".join(str(d) for d in config_search_dirs())
    )


def load_config(cls: type[T], preset: str | None = None, data: dict | None = None) -> T:
    """Defaults of ``cls``, then the preset YAML (if any), then ``data`` (a dict, if any)."""
    cfg = cls()
    if preset:
        path = resolve_preset(preset)
        cfg = merge(cfg, load_yaml(path), where=str(path))
    if data:
        cfg = merge(cfg, data, where="overrides")
    return cfg


def parse_cli(cls: type[T], args: list[str], prog: str, description: str | None = None,
              preset: str | None = None) -> T:
    """``--config PRESET`` picks a YAML preset; every other flag overrides a field via tyro.

    Example: ``genlab flow train --config flow/toy2d --train.steps 500 --run-dir runs/x``.
    ``preset`` is the preset to start from when the command line gives none (a resumed run's
    config.yaml).
    """
    import tyro

    given, rest = take_config_flag(args)
    default = load_config(cls, given or preset)
    return tyro.cli(cls, default=default, args=rest, prog=prog, description=description)


def take_config_flag(args: list[str]) -> tuple[str | None, list[str]]:
    """``--config PRESET`` / ``--config=PRESET`` taken out of ``args``: (the preset or None, the rest)."""
    preset, rest = None, []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--config":
            if i + 1 >= len(args):
                raise ConfigError("--config needs a preset name or a YAML path")
            preset = args[i + 1]
            i += 2
            continue
        if a.startswith("--config="):
            preset = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    return preset, rest


def recipe_named(args: list[str], preset: str | None) -> str | None:
    """Which recipe a training command runs: ``--recipe NAME`` on the command line, else the preset's
    top-level ``recipe:`` key, else None (the command's own)."""
    for i, a in enumerate(args):
        if a == "--recipe" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--recipe="):
            return a.split("=", 1)[1]
    if preset:
        value = load_yaml(resolve_preset(preset)).get("recipe")
        return None if value is None else str(value)
    return None
