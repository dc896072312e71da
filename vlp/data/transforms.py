"""Per-example transforms: image normalisation and caption tokenisation (picklable for grain workers)."""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from vlp.data.tokenizer import Tokenizer

CAPTION_CHOICES = ("noisy", "synthetic", "both")


def normalize_image(image: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, C] -> float32 in [-1, 1] (mean 0.5, std 0.5 per channel)."""
    return image.astype(np.float32) * (2.0 / 255.0) - 1.0


def pick_caption(example: dict, caption: str, seed: int) -> str:
    """The training caption of an example: one kind, or (`both`) one of the two chosen by (seed, index)."""
    if caption == "both":
        caption = ("noisy", "synthetic")[np.random.default_rng([seed, int(example["index"])]).integers(2)]
    return example[f"caption_{caption}"]


@dataclasses.dataclass
class ImageTextTransform(grain.transforms.Map):
    """record -> {"image": float32 [H, W, 3], "text": int32 [max_text_len], "label": int32}."""

    tokenizer: Tokenizer
    max_text_len: int
    caption: str = "both"
    seed: int = 0

    def __post_init__(self):
        if self.caption not in CAPTION_CHOICES:
            raise ValueError(f"unknown caption choice {self.caption!r}; valid: {CAPTION_CHOICES}")

    def map(self, example: dict) -> dict:
        text = self.tokenizer.encode([pick_caption(example, self.caption, self.seed)], self.max_text_len)[0]
        return {
            "image": normalize_image(example["image"]),
            "text": text,
            "label": np.int32(example["label"]),
        }
