"""A run's family: from the config's package, or the FAMILY a config class names."""

from dataclasses import dataclass
from typing import ClassVar

from genlab.train.run import family_of
from genlab.vlm.recipes import ShapesPaliGemmaConfig


@dataclass
class _Named:
    FAMILY: ClassVar[str] = "qformer"
    x: int = 1


def test_family_from_module_or_class_attribute():
    assert family_of(ShapesPaliGemmaConfig()) == "vlm"
    assert family_of(_Named()) == "qformer"
