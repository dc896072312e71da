"""Image geometry for real images: random resized crop + horizontal flip (training) and resize + center crop
(evaluation), on uint8 [H, W, 3] arrays. Training randomness comes from grain's per-element generator (a pure
function of the seed and the element's position), so a resumed run crops exactly as the uninterrupted one."""

from __future__ import annotations

import dataclasses
import math

import grain
import numpy as np
from PIL import Image


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size[0], size[1], 3] (bilinear with antialiasing)."""
    if image.shape[:2] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BILINEAR))


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size, size, 3]: short side resized to `size`, then the central square."""
    height, width = image.shape[:2]
    if (height, width) == (size, size):
        return image
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    image = _resize(image, (new_h, new_w))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return image[top:top + size, left:left + size]


def crop_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
             rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop covering `scale` of the area with aspect ratio in `ratio` (as
    torchvision's RandomResizedCrop: 10 tries, then the central crop of the clamped ratio)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


@dataclasses.dataclass
class RandomResizedCrop(grain.transforms.RandomMap):
    """record -> record with `image` uint8 [size, size, 3]: a random crop of `scale` of the area (aspect ratio in
    [3/4, 4/3]) resized to `size`, mirrored with probability 1/2 when `flip`."""

    size: int
    scale: tuple[float, float] = (0.9, 1.0)
    flip: bool = True
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __post_init__(self):
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"random crop scale {self.scale} must satisfy 0 < low <= high <= 1")

    def random_map(self, record: dict, rng: np.random.Generator) -> dict:
        image = record["image"]
        top, left, h, w = crop_box(image.shape[0], image.shape[1], self.scale, self.ratio, rng)
        image = _resize(image[top:top + h, left:left + w], (self.size, self.size))
        if self.flip and rng.random() < 0.5:
            image = image[:, ::-1]
        return dict(record, image=np.ascontiguousarray(image))


@dataclasses.dataclass
class ResizeCenterCrop(grain.transforms.Map):
    """record -> record with `image` uint8 [size, size, 3] (the evaluation geometry)."""

    size: int

    def map(self, record: dict) -> dict:
        return dict(record, image=resize_center_crop(record["image"], self.size))
