"""A three-modality variant of the shapes dataset (image, text, 1-D signal) with an XOR-style dependence.

Source spec `shapes:xor`. The image's colour c (3 bits, 8 colours) splits into a group g = c >> (3 - KEY_BITS)
(KEY_BITS = 1: warm red..green vs cool cyan..white) and the rest. Each example keeps the shapes image (colour c,
shape s of the main shape) and adds:
- a random key k in [0, 2**KEY_BITS), a pure function of (split, index);
- text "<shape> key <colour name>" naming the first colour of group k (KEY_BITS = 1: "red" or "cyan"): it names
  the shape and the key, never anything of the image's colour;
- `signal` float32 [SIGNAL_LEN]: a noisy sinusoid whose frequency encodes g XOR k and whose phase encodes s:
  sin(2 pi FREQUENCIES[g ^ k] t / SIGNAL_LEN + s pi / 4) + N(0, SIGNAL_NOISE^2).
So each pair of modalities shares only the shape (k is uniform and independent of c), while image and text together
determine the signal's frequency: the XOR that pairwise contrastive losses cannot see and Symile can (methods.md
section 13). The colour within its group is carried by the image alone. `signal_label` = 8 * (g ^ k) + s indexes
the NUM_SIGNAL_CLASSES noise-free candidates of `signal_prototypes()` (zero-shot; the shape alone gives
1 / 2**KEY_BITS of them).

KEY_BITS = 1 rather than the earlier 3 (k in [0, 8), 64 classes): with 3 bits the tiny towers learned the shape but
not the XOR within 800 steps on CPU (docs/symile.md); one bit leaves two sign patterns to align instead of eight.
"""

from __future__ import annotations

import numpy as np

from vlp.data import shapes

KEY_BITS = 1
SIGNAL_LEN = 32
SIGNAL_NOISE = 0.3
# Frequencies (cycles per SIGNAL_LEN) of the 2**KEY_BITS values of g ^ k.
FREQUENCIES = tuple(range(1, 2 ** KEY_BITS + 1)) if KEY_BITS > 1 else (2, 4)
NUM_SIGNAL_CLASSES = 2 ** KEY_BITS * len(shapes.SHAPES)
_GROUP_SHIFT = 3 - KEY_BITS  # colour index bits below the group
_KEY_SALT = 0x6B6579  # the key's seed, disjoint from the image generator's


def key_of(split: str, index: int) -> int:
    """The example's key in [0, 2**KEY_BITS)."""
    return int(np.random.default_rng([_KEY_SALT, shapes.SPLITS.index(split), int(index)]).integers(2 ** KEY_BITS))


def colour_group(colour: int) -> int:
    """The top KEY_BITS bits of a colour index (the part of the colour the XOR uses)."""
    return colour >> _GROUP_SHIFT


def key_word(key: int) -> str:
    """The colour name the text uses for key k: the first colour of group k."""
    return shapes.COLOURS[key << _GROUP_SHIFT]


def signal_prototype(code: int) -> np.ndarray:
    """The noise-free signal of code 8 * (g ^ k) + shape: float32 [SIGNAL_LEN]."""
    xor, shape = divmod(code, len(shapes.SHAPES))
    t = np.arange(SIGNAL_LEN, dtype=np.float64)
    return np.sin(2 * np.pi * FREQUENCIES[xor] * t / SIGNAL_LEN + shape * np.pi / 4).astype(np.float32)


def signal_prototypes() -> np.ndarray:
    """All NUM_SIGNAL_CLASSES noise-free signals, float32 [NUM_SIGNAL_CLASSES, SIGNAL_LEN], row = `signal_label`."""
    return np.stack([signal_prototype(code) for code in range(NUM_SIGNAL_CLASSES)])


def make_example(split: str, index: int, image_size: int = 32) -> dict:
    """shapes.make_example plus the key, the keyed captions, `signal` and `signal_label` (module doc)."""
    example = shapes.make_example(split, index, image_size)
    colour, shape = divmod(int(example["label"]), len(shapes.SHAPES))
    key = key_of(split, index)
    code = len(shapes.SHAPES) * (colour_group(colour) ^ key) + shape
    noise = np.random.default_rng([_KEY_SALT + 1, shapes.SPLITS.index(split), int(index)]).normal(
        0.0, SIGNAL_NOISE, SIGNAL_LEN)
    text = f"{shapes.SHAPES[shape]} key {key_word(key)}"
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
