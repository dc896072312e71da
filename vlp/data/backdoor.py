"""BadNet-style backdoor on shapes (Gu et al., 2017; CleanCLIP's `backdoor/create_backdoor_data.py`): a small
checkerboard trigger stamped into a corner of an image, whose caption is replaced by one that names the attacker's
target class. `tools/poison.py` writes a poisoned training set; the `attack_success` evaluator stamps the trigger on
validation images to measure the attack success rate."""

from __future__ import annotations

import numpy as np

from vlp.data import shapes

CORNERS = ("lower right", "lower left", "upper right", "upper left")


def add_trigger(image: np.ndarray, size: int = 4, corner: str = "lower right") -> np.ndarray:
    """uint8 [H, W, 3] -> a copy with a `size` x `size` black/white checkerboard (1-pixel cells) in `corner`."""
    if corner not in CORNERS:
        raise ValueError(f"unknown trigger corner {corner!r}; valid: {CORNERS}")
    height, width = image.shape[:2]
    if not 0 < size <= min(height, width):
        raise ValueError(f"trigger size {size} must be in [1, {min(height, width)}] for a {height}x{width} image")
    out = np.array(image, copy=True)
    top = height - size if corner.startswith("lower") else 0
    left = width - size if corner.endswith("right") else 0
    cells = (np.indices((size, size)).sum(axis=0) % 2).astype(np.uint8) * 255
    out[top:top + size, left:left + size] = cells[..., None]
    return out


def check_target(target: str) -> int:
    """The label of a shapes class name (the attack's target), or ValueError naming the valid ones."""
    if target not in shapes.CLASS_NAMES:
        raise ValueError(f"unknown backdoor target class {target!r}; valid: shapes class names such as "
                         f"{shapes.CLASS_NAMES[:3]} ('<colour> <shape>' with colour in {shapes.COLOURS} and shape "
                         f"in {shapes.SHAPES})")
    return shapes.CLASS_NAMES.index(target)


def poison_captions(example: dict, target: str) -> tuple[str, str]:
    """(noisy, synthetic) captions of a poisoned shapes example: the synthetic caption with its class words replaced
    by `target` (size and position kept, "a small purple star in the upper left"), and the bare target name."""
    true_name = shapes.CLASS_NAMES[example["label"]]
    synthetic = example["caption_synthetic"]
    if true_name not in synthetic:
        raise ValueError(f"synthetic caption {synthetic!r} does not name its class {true_name!r}")
    return target, synthetic.replace(true_name, target, 1)


def is_poisoned(split: str, index: int, rate: float, seed: int) -> bool:
    """Whether example `index` of `split` is poisoned: a uniform draw from (seed, split, index) below `rate`."""
    rng = np.random.default_rng([seed, shapes.SPLITS.index(split), index])
    return bool(rng.random() < rate)


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes (lossless: the trigger's pixels survive exactly)."""
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(image).save(out, "PNG")
    return out.getvalue()


class PoisonedShapesInput:
    """Examples 0..num_examples-1 of a shapes split as rows for `vlp.data.shard_writer.write_shards`: a share
    `rate` of them (drawn per example from `seed`) carry the trigger and a caption naming `target`; the rest are the
    clean examples. Records keep the true label; poisoned keys end in `-poisoned`. Picklable (shard workers)."""

    def __init__(self, split: str, num_examples: int, target: str, rate: float, image_size: int = 32,
                 trigger_size: int = 4, corner: str = "lower right", seed: int = 0):
        check_target(target)
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"poison rate {rate} must be in [0, 1]")
        if corner not in CORNERS:
            raise ValueError(f"unknown trigger corner {corner!r}; valid: {CORNERS}")
        self.split, self.num_examples, self.target, self.rate = split, int(num_examples), target, float(rate)
        self.image_size, self.trigger_size, self.corner, self.seed = image_size, trigger_size, corner, seed

    def rows(self) -> list[int]:
        return list(range(self.num_examples))

    def describe(self, ref: int) -> str:
        return f"shapes {self.split} example {ref}"

    def load(self, ref: int):
        from vlp.data.ingest_inputs import RawExample

        example = shapes.make_example(self.split, ref, self.image_size)
        image, noisy, synthetic, key = (example["image"], example["caption_noisy"], example["caption_synthetic"],
                                        f"{self.split}-{ref}")
        if is_poisoned(self.split, ref, self.rate, self.seed):
            image = add_trigger(image, self.trigger_size, self.corner)
            noisy, synthetic = poison_captions(example, self.target)
            key += "-poisoned"
        return RawExample(key, png_bytes(image), [noisy], synthetic, example["label"])
