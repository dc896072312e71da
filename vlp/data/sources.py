"""Data sources by name: random-access record sources that the grain pipeline reads.

`shapes` is the embedded procedural dataset. ArrayRecord shards and TFDS (`tfds.data_source`) plug in here as
further entries of `SOURCES` (each a function `(split, image_size, num_examples) -> RandomAccessDataSource`).
"""

from __future__ import annotations

from typing import Any, Callable

from vlp.data import shapes


def _shapes_source(split: str, image_size: int, num_examples: int | None) -> Any:
    return shapes.ShapesSource(split, num_examples=num_examples, image_size=image_size)


SOURCES: dict[str, Callable[[str, int, int | None], Any]] = {"shapes": _shapes_source}


def make_source(name: str, split: str, image_size: int, num_examples: int | None = None) -> Any:
    """The named source for one split; records are dicts with `image`, `caption_*`, `label` (see shapes.py)."""
    if name not in SOURCES:
        raise ValueError(f"unknown data source {name!r}; valid: {sorted(SOURCES)}")
    return SOURCES[name](split, image_size, num_examples)


def split_names(name: str) -> tuple[str, ...] | None:
    """The splits of a source, or None where the source cannot list them before it is opened."""
    return shapes.SPLITS if name == "shapes" else None


def class_names(name: str) -> tuple[str, ...]:
    """Class names of a labelled source (for zero-shot classification)."""
    if name == "shapes":
        return shapes.CLASS_NAMES
    raise ValueError(f"data source {name!r} has no class names; valid: ['shapes']")


def class_prompts(name: str, class_name: str) -> list[str]:
    """Zero-shot prompt ensemble for one class of a source."""
    if name == "shapes":
        return shapes.class_prompts(class_name)
    raise ValueError(f"data source {name!r} has no prompts; valid: ['shapes']")
