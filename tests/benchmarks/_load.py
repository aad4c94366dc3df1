"""Loading a script of benchmarks/ as a module, for the smoke tests."""

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (registered in sys.modules: dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location(f"{name}_bench", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_quick(bench, out: Path) -> dict:
    """``bench.main(["--quick", "--out", out])``, leaving torch's thread count as it found it."""
    import torch

    threads = torch.get_num_threads()
    try:
        return bench.main(["--quick", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
