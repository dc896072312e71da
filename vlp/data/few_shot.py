"""Few-shot labelled subsets of shapes (prompt learning's K shots per class), as rows for
`vlp.data.shard_writer.write_shards`."""

from __future__ import annotations

from vlp.data import shapes
from vlp.data.backdoor import png_bytes


def first_shots(split: str, shots: int, start: int = 0) -> list[int]:
    """The first `shots` indices of each of the 64 classes in `split` from index `start` on, in index order."""
    if shots < 1:
        raise ValueError(f"shots={shots} must be >= 1 per class")
    found: dict[int, list[int]] = {label: [] for label in range(len(shapes.CLASS_NAMES))}
    index, limit = start, shapes.SPLIT_SIZES[split]
    while any(len(v) < shots for v in found.values()):
        if index >= limit:
            raise ValueError(f"split {split!r} has fewer than {shots} examples of some class after index {start}")
        label = shapes.make_example(split, index, 16)["label"]  # the label does not depend on the resolution
        if len(found[label]) < shots:
            found[label].append(index)
        index += 1
    return sorted(i for v in found.values() for i in v)


class FewShotShapesInput:
    """`shots` labelled examples per class of a shapes split (`first_shots`), with their captions. Picklable."""

    def __init__(self, split: str, shots: int, image_size: int = 32, start: int = 0):
        self.split, self.image_size = split, image_size
        self.indices = first_shots(split, shots, start)

    def rows(self) -> list[int]:
        return list(self.indices)

    def describe(self, ref: int) -> str:
        return f"shapes {self.split} example {ref}"

    def load(self, ref: int):
        from vlp.data.ingest_inputs import RawExample

        example = shapes.make_example(self.split, ref, self.image_size)
        return RawExample(f"{self.split}-{ref}", png_bytes(example["image"]), [example["caption_noisy"]],
                          example["caption_synthetic"], example["label"])
