"""Helpers for tests that run the `genlab` command on bad input."""

import hashlib
from pathlib import Path

from genlab.cli import main


def snapshot(folder: Path) -> dict:
    """sha256 of every file under ``folder``, by relative path (to prove a command changed nothing)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def fails(args, capsys, *needles) -> str:
    """Run the command, expect exit 2 and a `genlab: error:` line (no traceback) containing every needle."""
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("genlab: error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err
