"""Transforms of the training stream (picklable for grain workers).

Per example: pick the training caption and keep the uint8 image. Per batch: normalise the images and tokenise
all captions in one call (sentencepiece encodes a list ~35x faster than one text at a time).

Randomness per visit, not per record: the pipeline stamps each example with `VISIT_KEY`, its position in the global
training stream (after shuffle, repeat and mixture, before the per-process slice), and every random choice of a
transform (caption choice, MIM mask, ...) is drawn from (seed, visit, purpose tag) through `visit_rng` or
`visit_uniform`. So every epoch draws afresh, 1 or N processes and any grain worker count draw the same for the
same global example, and a resumed run (whose saved state is a stream position) draws exactly what the
uninterrupted one did.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from vlp.data.tokenizer import Tokenizer

# Per example: how many unreadable records were skipped to produce it (see vlp.data.pipeline.SkippingReader).
SKIPPED_KEY = "skipped_records"
# Per example, before the example transform: its position in the global training stream (int64; see module doc).
VISIT_KEY = "visit"

CAPTION_CHOICES = ("noisy", "synthetic", "both")
_MASK64 = (1 << 64) - 1


def normalize_image(image: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, C] -> float32 in [-1, 1] (mean 0.5, std 0.5 per channel)."""
    return image.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


def _mix64(x: int) -> int:
    """splitmix64 finaliser: a fast, well-mixed hash of an integer (numpy's seeded generators cost ~30 us)."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
    return x ^ (x >> 31)


def _tag(tag: str) -> int:
    return int.from_bytes(tag.encode("utf-8"), "little")


def visit_of(example: dict) -> int:
    """The example's position in the global training stream (stamped by `StampVisit`)."""
    if VISIT_KEY not in example:
        raise KeyError(f"example has no {VISIT_KEY!r} field (its position in the training stream), which per-visit "
                       f"random transforms need; vlp.data.pipeline.make_train_dataset stamps it (StampVisit) before "
                       f"the example transform. Fields present: {sorted(example)}")
    return int(example[VISIT_KEY])


def visit_rng(seed: int, visit: int, tag: str) -> np.random.Generator:
    """The generator of one purpose (`tag`, e.g. "mim_mask") at one visit: a pure function of (seed, visit, tag)."""
    return np.random.default_rng([seed, visit, _tag(tag)])


def visit_uniform(seed: int, visit: int, tag: str) -> float:
    """One uniform draw in [0, 1) from (seed, visit, tag), ~50x cheaper than `visit_rng` (a coin per example)."""
    key = _mix64((_mix64(_tag(tag) & _MASK64) + seed) & _MASK64)
    return _mix64((key + visit) & _MASK64) / 2.0**64


@dataclasses.dataclass
class StampVisit(grain.transforms.MapWithIndex):
    """Adds `VISIT_KEY` = the element's index in the dataset it maps (the pipeline applies it to the global stream)."""

    def map_with_index(self, index: int, example: dict) -> dict:
        return dict(example, **{VISIT_KEY: np.int64(index)})


def pick_caption(example: dict, caption: str, seed: int, synthetic_prob: float = 0.5) -> str:
    """The training caption of an example: one kind, or (`both`) the synthetic one with probability
    `synthetic_prob`, else the noisy one, drawn afresh at every visit from (seed, visit)."""
    if caption == "both":
        uniform = visit_uniform(seed, visit_of(example), "caption")
        caption = "synthetic" if uniform < synthetic_prob else "noisy"
    return example[f"caption_{caption}"]


@dataclasses.dataclass
class SelectCaption(grain.transforms.Map):
    """record -> {"image": uint8 [H, W, 3], "caption": str, "label": int32}."""

    caption: str = "both"
    seed: int = 0
    synthetic_prob: float = 0.5

    def __post_init__(self):
        if self.caption not in CAPTION_CHOICES:
            raise ValueError(f"unknown caption choice {self.caption!r}; valid: {CAPTION_CHOICES}")
        if not 0.0 <= self.synthetic_prob <= 1.0:
            raise ValueError(f"synthetic caption probability {self.synthetic_prob} is not in [0, 1]")

    def map(self, example: dict) -> dict:
        out = {"image": example["image"],
               "caption": pick_caption(example, self.caption, self.seed, self.synthetic_prob),
               "label": np.int32(example["label"])}
        if SKIPPED_KEY in example:
            out[SKIPPED_KEY] = example[SKIPPED_KEY]
        return out


@dataclasses.dataclass
class SelectBothCaptions(grain.transforms.Map):
    """record -> {"image", "caption_noisy", "caption_synthetic", "label"} (TIPS trains on both captions)."""

    def map(self, example: dict) -> dict:
        out = {"image": example["image"], "caption_noisy": example["caption_noisy"],
               "caption_synthetic": example["caption_synthetic"], "label": np.int32(example["label"])}
        if SKIPPED_KEY in example:
            out[SKIPPED_KEY] = example[SKIPPED_KEY]
        return out


@dataclasses.dataclass
class AddPatchMask(grain.transforms.Map):
    """Runs `inner` and adds "mim_mask" bool [grid_h * grid_w], drawn afresh at every visit from (seed, visit).

    A share `masked_image_fraction` of the visits (also drawn from seed and visit, so the unmasked images change
    from epoch to epoch) is masked, the rest get an all-False mask."""

    inner: grain.transforms.Map
    kind: str
    grid: tuple[int, int]
    ratio: float
    min_block: int = 4
    seed: int = 0
    masked_image_fraction: float = 1.0

    def map(self, example: dict) -> dict:
        from vlp.data import masking

        out = self.inner.map(example)
        visit = visit_of(example)
        if visit_uniform(self.seed, visit, "masked_image") < self.masked_image_fraction:
            rng = visit_rng(self.seed, visit, "mim_mask")
            mask = masking.make_mask(self.kind, rng, self.grid, self.ratio, self.min_block)
        else:
            mask = np.zeros(self.grid, bool)
        out["mim_mask"] = mask.reshape(-1)
        return out


@dataclasses.dataclass
class TokenizeBatch(grain.transforms.Map):
    """batch -> {"image": float32 [b, H, W, 3], "text": int32 [b, max_text_len], "label": int32 [b]}.

    Also tokenises `caption_<kind>` fields to `text_<kind>` (TIPS) and passes "mim_mask" and `signal*` (extra
    modalities, Symile) through."""

    tokenizer: Tokenizer
    max_text_len: int

    def map(self, batch: dict) -> dict:
        out = {"image": normalize_image(batch["image"]), "label": batch["label"]}
        for key in batch:
            if key == "caption" or key.startswith("caption_"):
                out["text" + key[len("caption"):]] = self.tokenizer.encode([str(c) for c in batch[key]],
                                                                          self.max_text_len)
        for key in batch:  # masks and extra modalities (1-D `signal*` arrays) pass through
            if key == "mim_mask" or key.startswith("signal"):
                out[key] = batch[key]
        if SKIPPED_KEY in batch:
            out[SKIPPED_KEY] = batch[SKIPPED_KEY]
        return out
