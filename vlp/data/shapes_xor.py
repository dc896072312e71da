"""A three-modality variant of the shapes dataset (image, text, 1-D signal) with an XOR-style dependence.

Source spec `shapes:xor`. Each example keeps the shapes image (colour c and shape s of the main shape) and adds:
- a random key k in [0, 8), a pure function of (split, index);
- text "<shape> key <colour name of k>" (it names the shape and the key, never the image's colour);
- `signal` float32 [SIGNAL_LEN]: a noisy sinusoid whose frequency encodes c XOR k (3 bits) and whose phase
  encodes s: sin(2 pi (1 + (c ^ k)) t / SIGNAL_LEN + s pi / 4) + N(0, SIGNAL_NOISE^2).
So each pair of modalities shares only the shape, while image and text together determine the signal's frequency
(c ^ k): the 3-bit XOR that pairwise contrastive losses cannot see and Symile can (methods.md section 13).
`signal_label` = 8 * (c ^ k) + s indexes the 64 noise-free candidates of `signal_prototypes()` (zero-shot).
"""

from __future__ import annotations

import numpy as np

from vlp.data import shapes

SIGNAL_LEN = 32
SIGNAL_NOISE = 0.3
NUM_SIGNAL_CLASSES = len(shapes.COLOURS) * len(shapes.SHAPES)
_KEY_SALT = 0x6B6579  # the key's seed, disjoint from the image generator's


def key_of(split: str, index: int) -> int:
    """The example's key in [0, 8)."""
    return int(np.random.default_rng([_KEY_SALT, shapes.SPLITS.index(split), int(index)]).integers(8))


def signal_prototype(code: int) -> np.ndarray:
    """The noise-free signal of code 8 * (colour ^ key) + shape: float32 [SIGNAL_LEN]."""
    frequency, shape = 1 + code // len(shapes.SHAPES), code % len(shapes.SHAPES)
    t = np.arange(SIGNAL_LEN, dtype=np.float64)
    return np.sin(2 * np.pi * frequency * t / SIGNAL_LEN + shape * np.pi / 4).astype(np.float32)


def signal_prototypes() -> np.ndarray:
    """All NUM_SIGNAL_CLASSES noise-free signals, float32 [64, SIGNAL_LEN], row = `signal_label`."""
    return np.stack([signal_prototype(code) for code in range(NUM_SIGNAL_CLASSES)])


def make_example(split: str, index: int, image_size: int = 32) -> dict:
    """shapes.make_example plus the key, the keyed captions, `signal` and `signal_label` (module doc)."""
    example = shapes.make_example(split, index, image_size)
    colour, shape = divmod(int(example["label"]), len(shapes.SHAPES))
    key = key_of(split, index)
    code = len(shapes.SHAPES) * (colour ^ key) + shape
    noise = np.random.default_rng([_KEY_SALT + 1, shapes.SPLITS.index(split), int(index)]).normal(
        0.0, SIGNAL_NOISE, SIGNAL_LEN)
    text = f"{shapes.SHAPES[shape]} key {shapes.COLOURS[key]}"
    return dict(example, caption_noisy=text, caption_synthetic=text, xor_key=key,
                signal=(signal_prototype(code) + noise).astype(np.float32), signal_label=code)


class XorShapesSource(shapes.ShapesSource):
    """grain RandomAccessDataSource of `make_example` (picklable, stateless like ShapesSource)."""

    def __getitem__(self, record_key: int) -> dict:
        key = int(record_key)
        if not 0 <= key < self.num_examples:
            raise IndexError(f"record_key {record_key} out of range [0, {self.num_examples}) for split {self.split!r}")
        return make_example(self.split, key, self.image_size)

    def signal_candidates(self) -> np.ndarray:
        """The zero-shot candidates of the signal modality, float32 [K, T], row = a record's `signal_label`."""
        return signal_prototypes()

    def __repr__(self) -> str:
        return f"XorShapesSource(split={self.split!r}, num_examples={self.num_examples}, image_size={self.image_size})"
