"""Entity labels per image for MOFI: which entities a record shows and what they are called.

Modes (`mofi.entities`):
  `label`              one entity per record: its class `label`, named by the source's class names (shapes,
                       ArrayRecord shards with class names, TFDS ClassLabel).
  `shapes_attributes`  two entities per shapes record (multi-label): its colour (ids 0-7) and its shape (8-15).
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from vlp.data import shapes

ENTITIES_KEY = "entity_labels"
ENTITY_MODES = ("label", "shapes_attributes")


def entity_names(mode: str, class_names: tuple[str, ...]) -> tuple[str, ...]:
    """The name of each entity id."""
    if mode == "label":
        return tuple(class_names)
    if mode == "shapes_attributes":
        return shapes.COLOURS + shapes.SHAPES
    raise ValueError(f"unknown mofi.entities {mode!r}; valid: {ENTITY_MODES}")


def record_entities(mode: str, label: int) -> list[int]:
    """A record's entity ids (from its class label)."""
    if label < 0:
        raise ValueError(f"record has no label ({label}); MOFI's entity modes {ENTITY_MODES} read the label")
    if mode == "label":
        return [int(label)]
    colour, shape = divmod(int(label), len(shapes.SHAPES))  # CLASS_NAMES = colour-major "<colour> <shape>"
    return [colour, len(shapes.COLOURS) + shape]


@dataclasses.dataclass
class AddEntities(grain.transforms.Map):
    """Runs `inner`, adds `ENTITIES_KEY` int32 [max_entities] (padded with -1) and, with `names_as_text`, replaces
    the caption with the record's entity names joined by spaces (MOFI's "entity names as free-form text")."""

    inner: grain.transforms.Map
    mode: str
    names: tuple[str, ...]
    max_entities: int
    names_as_text: bool = True

    def map(self, example: dict) -> dict:
        out = self.inner.map(example)
        ids = record_entities(self.mode, int(example["label"]))
        row = np.full((self.max_entities,), -1, np.int32)
        row[:len(ids)] = ids
        out[ENTITIES_KEY] = row
        if self.names_as_text:
            out["caption"] = " ".join(self.names[i] for i in ids)
        return out
