"""Dense (segmentation) probe on frozen patch tokens: a linear classifier per patch, mIoU on held-out masks.

Classes: background + the 8 shapes of the shapes dataset (a mask value m > 0 is shape (m - 1) % 8; the colour is
not a spatial property, so the 64 shape x colour classes would mostly measure colour). Each patch's label is the
majority pixel class inside it. The classifier is closed-form ridge regression on standardised patch tokens to
one-hot labels (deterministic, one linear solve), with class-balanced sample weights: ~87% of the patches are
background, and unweighted least squares then predicts background almost everywhere (on a CLIP tiny checkpoint:
mIoU 0.14 unweighted vs 0.24 balanced). A patch's prediction is painted on its pixels, and the mIoU is
the mean over classes of the pixel IoU on the validation images (classes absent from both prediction and ground
truth are left out).
"""

from __future__ import annotations

import numpy as np

from vlp.data import pipeline, sources
from vlp.data.transforms import normalize_image
from vlp.eval.common import Encoders, Params

NUM_SHAPES = 8


def default_eval() -> dict:
    """The `config.evals` entry every method's configs use (same settings, so mIoU compares across methods)."""
    return dict(type="dense", split="validation", num_examples=500, train_examples=2000, batch_size=500)


def mask_classes(mask: np.ndarray) -> np.ndarray:
    """shapes mask values (0 background, 1 + label) -> probe classes (0 background, 1 + shape index)."""
    mask = mask.astype(np.int64)
    return np.where(mask > 0, 1 + (mask - 1) % NUM_SHAPES, 0)


def patch_labels(pixel_classes: np.ndarray, patch_size: int, num_classes: int) -> np.ndarray:
    """[B, H, W] classes -> [B, (H/p)(W/p)] majority class per patch (ties: the smallest class id)."""
    b, h, w = pixel_classes.shape
    p = patch_size
    patches = pixel_classes.reshape(b, h // p, p, w // p, p).transpose(0, 1, 3, 2, 4).reshape(b, -1, p * p)
    counts = (patches[..., None] == np.arange(num_classes)).sum(axis=2)
    return counts.argmax(-1)


def ridge_fit(features: np.ndarray, labels: np.ndarray, num_classes: int, ridge: float) -> tuple:
    """features [n, D], labels [n] -> (mean, std, weights [D + 1, C]): weighted ridge regression to one-hot labels,
    each sample weighted n / (C * count(its class)), minimising sum_i w_i |x_i W - y_i|^2 + ridge sum(w) |W|^2."""
    mean, std = features.mean(0), features.std(0) + 1e-6
    x = np.concatenate([(features - mean) / std, np.ones((len(features), 1))], axis=1).astype(np.float64)
    y = np.eye(num_classes)[labels]
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    w = (len(labels) / (num_classes * np.maximum(counts, 1.0)))[labels]
    gram = (x * w[:, None]).T @ x + ridge * w.sum() * np.eye(x.shape[1])
    return mean, std, np.linalg.solve(gram, (x * w[:, None]).T @ y)


def ridge_predict(model: tuple, features: np.ndarray) -> np.ndarray:
    mean, std, weights = model
    x = np.concatenate([(features - mean) / std, np.ones((len(features), 1))], axis=1)
    return (x @ weights).argmax(-1)


def mean_iou(pred: np.ndarray, target: np.ndarray, num_classes: int) -> float:
    """Mean over classes present in `pred` or `target` of |pred=c and target=c| / |pred=c or target=c|."""
    ious = []
    for c in range(num_classes):
        p, t = pred == c, target == c
        union = (p | t).sum()
        if union:
            ious.append((p & t).sum() / union)
    return float(np.mean(ious))


def _load(data_source: str, split: str, image_size: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    source = sources.make_source(data_source, split, image_size)
    n = pipeline.eval_set_size(source, n, f"dense probe ({split})")
    records = [source[i] for i in range(n)]
    if "mask" not in records[0]:
        raise ValueError(f"the dense probe needs per-pixel masks; data source {data_source!r} has none")
    images = normalize_image(np.stack([r["image"] for r in records]))
    return images, mask_classes(np.stack([r["mask"] for r in records]))


class DenseEvaluator:
    """Yields `dense_miou` and `dense_patch_accuracy` (key prefix = `name`)."""

    num_classes = 1 + NUM_SHAPES

    def __init__(self, encoders: Encoders, train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
                 ridge: float = 1e-3, name: str = "dense"):
        if encoders.encode_patches is None:
            raise ValueError(f"evals.{name}.type='dense' needs an objective with patch tokens (encode_patches)")
        self.encoders, self.train, self.val, self.ridge, self.name = encoders, train, val, ridge, name

    @classmethod
    def build(cls, encoders: Encoders, *, name: str, data_source: str, split: str, image_size: int,
              num_examples: int, train_examples: int = 2000, ridge: float = 1e-3, **unused) -> "DenseEvaluator":
        """Probe trained on the first `train_examples` train images, scored on the first `num_examples` of
        `split`."""
        return cls(encoders, _load(data_source, "train", image_size, train_examples),
                   _load(data_source, split, image_size, num_examples), ridge, name)

    def _features(self, params: Params, images: np.ndarray, pixel_classes: np.ndarray):
        tokens = self.encoders.encode_patches(params, images)  # [B, N, D]
        grid = int(round(np.sqrt(tokens.shape[1])))
        patch = images.shape[1] // grid
        labels = patch_labels(pixel_classes, patch, self.num_classes)
        return tokens.reshape(-1, tokens.shape[-1]).astype(np.float64), labels.reshape(-1), grid, patch

    def run(self, params: Params) -> dict[str, float]:
        x, y, _, _ = self._features(params, *self.train)
        model = ridge_fit(x, y, self.num_classes, self.ridge)
        images, target = self.val
        x, y, grid, patch = self._features(params, images, target)
        pred = ridge_predict(model, x)
        pixels = pred.reshape(-1, grid, grid).repeat(patch, axis=1).repeat(patch, axis=2)
        return {f"{self.name}_miou": mean_iou(pixels, target, self.num_classes),
                f"{self.name}_patch_accuracy": float((pred == y).mean())}
