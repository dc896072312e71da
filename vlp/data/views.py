"""A second augmented view of each training image (TCL feeds it to the momentum encoder), drawn per visit.

The view keeps the geometry (shapes captions name positions and sizes, so crops and flips would change what the
caption says) and changes the photometry: a per-image brightness and per-channel contrast jitter and Gaussian
pixel noise, drawn from (seed, visit) so a resumed run draws the same views (see vlp.data.transforms).
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from vlp.data.transforms import visit_of, visit_rng

SECOND_VIEW_KEY = "image_aug"


def photometric_view(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """uint8 [H, W, C] -> uint8 [H, W, C]: x * contrast_c + brightness + noise, each scaled by `strength`."""
    x = image.astype(np.float32)
    contrast = 1.0 + strength * rng.uniform(-0.4, 0.4, size=(1, 1, x.shape[-1]))
    brightness = strength * rng.uniform(-40.0, 40.0)
    noise = strength * rng.normal(0.0, 8.0, size=x.shape)
    mean = x.mean(axis=(0, 1), keepdims=True)
    return np.clip((x - mean) * contrast + mean + brightness + noise, 0, 255).astype(np.uint8)


@dataclasses.dataclass
class AddSecondView(grain.transforms.Map):
    """Runs `inner` and adds `SECOND_VIEW_KEY` = a photometric view of its "image" (the batch transform normalises
    it like "image")."""

    inner: grain.transforms.Map
    seed: int = 0
    strength: float = 1.0

    def map(self, example: dict) -> dict:
        out = self.inner.map(example)
        rng = visit_rng(self.seed, visit_of(example), "second_view")
        out[SECOND_VIEW_KEY] = photometric_view(out["image"], rng, self.strength)
        return out
