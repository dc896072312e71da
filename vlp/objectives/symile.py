"""Symile (Saporta et al., NeurIPS 2024): image, text and a 1-D signal contrasted with the multilinear inner product.

The two-tower model (ViT + text transformer) gains a third tower, `vlp.models.signal.SignalTower`, for a 1-D signal
(`batch["signal"]` [B, T], e.g. the `shapes:xor` source). `symile.loss` picks the loss by name: `symile`
(vlp.losses.symile.symile_loss, O(N) or O(N^2) negatives) or `pairwise` (the paper's baseline, the sum of the three
pairwise CLIP losses), so the two train the same model on the same data.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlp.losses.symile import NEGATIVE_SAMPLING, pairwise_clip_loss, symile_loss
from vlp.models.signal import SignalTower, signal_forward_flops
from vlp.objectives import register
from vlp.objectives.base import Metrics, resolve_compute_dtype
from vlp.objectives.two_tower import TwoTowerObjective
from vlp.data.transforms import SKIPPED_KEY

LOSSES = ("symile", "pairwise")


@dataclasses.dataclass
class KeepSignal(grain.transforms.Map):
    """Runs `inner` (the caption choice) and keeps the record's 1-D signal under "signal" (float32 [T])."""

    inner: grain.transforms.Map
    key: str = "signal"

    def map(self, example: dict) -> dict:
        if self.key not in example:
            raise KeyError(f"record has no {self.key!r} field for Symile's third modality (symile.signal_key); "
                           f"fields: {sorted(example)}. Use data.source='shapes:xor' or shards with signals")
        out = self.inner.map(example)
        out["signal"] = np.asarray(example[self.key], np.float32)
        if SKIPPED_KEY in example:
            out[SKIPPED_KEY] = example[SKIPPED_KEY]
        return out


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"invalid config: {message}")


@register("symile")
class SymileObjective(TwoTowerObjective):
    """loss = Symile(image_emb, text_emb, signal_emb) (or the pairwise CLIP sum) over the global batch."""

    # Gradient accumulation would need the O(N) shuffles outside `loss_from_embeddings`: not supported.
    loss_from_embeddings = None

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        return dict(
            loss="symile",  # symile | pairwise (the paper's baseline: L_ab + L_bc + L_ac)
            negative_sampling="n",  # n (O(N): rows shuffled per anchor) | n_squared (all N^2 combinations)
            signal_key="signal",  # the record field of the 1-D signal (shards: signal_<name>)
            signal_len=32,  # T of the signal [B, T]
            signal_width=96,
            signal_depth=2,
            signal_mlp_dim=384,
        )

    @classmethod
    def validate_config(cls, config: ml_collections.ConfigDict) -> None:
        block = config.symile
        _check(block.loss in LOSSES, f"symile.loss={block.loss!r}; valid: {LOSSES}")
        _check(block.negative_sampling in NEGATIVE_SAMPLING,
               f"symile.negative_sampling={block.negative_sampling!r}; valid: {NEGATIVE_SAMPLING}")
        for key in ("signal_len", "signal_width", "signal_mlp_dim"):
            _check(isinstance(block[key], int) and block[key] >= 1, f"symile.{key}={block[key]!r} must be an int >= 1")
        _check(isinstance(block.signal_depth, int) and block.signal_depth >= 0,
               f"symile.signal_depth={block.signal_depth!r} must be an int >= 0")
        _check(config.accumulation.steps == 1, f"accumulation.steps={config.accumulation.steps}: symile does not "
               "support gradient accumulation (its O(N) shuffles draw from the step's rng); set it to 1")

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        block = config.symile
        self.signal_len = block.signal_len
        self.signal_tower = SignalTower(
            width=block.signal_width, depth=block.signal_depth, mlp_dim=block.signal_mlp_dim,
            embed_dim=config.model.embed_dim, activation=config.model.activation, ln_eps=config.model.ln_eps,
            dtype=resolve_compute_dtype(config.precision.compute_dtype))

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        return dict(super().example_batch(batch_size), signal=np.zeros((batch_size, self.signal_len), np.float32))

    def init(self, rng: jax.Array) -> Any:
        rng_two_tower, rng_signal = jax.random.split(rng)
        params = dict(super().init(rng_two_tower))
        params["signal_tower"] = self.signal_tower.init(rng_signal, jnp.zeros((1, self.signal_len)))["params"]
        return params

    def train_example_transform(self, default: Any) -> Any:
        return KeepSignal(default, self.config.symile.signal_key)

    def _two_tower(self, params: Any) -> Any:
        return {k: v for k, v in params.items() if k != "signal_tower"}

    def embed(self, params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """image_emb, text_emb, signal_emb [B, D] (L2-normalised fp32) and logit_scale."""
        out = super().embed(self._two_tower(params), batch)
        return dict(out, signal_emb=self.encode_signal(params, batch["signal"]))

    def loss_fn(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, Metrics]:
        out = self.embed(params, batch)
        embs = [out["image_emb"], out["text_emb"], out["signal_emb"]]
        if self.config.symile.loss == "pairwise":
            return pairwise_clip_loss(embs, out["logit_scale"])
        return symile_loss(embs, out["logit_scale"], rng, self.config.symile.negative_sampling)

    def encode_image(self, params: Any, images: jax.Array) -> jax.Array:
        return super().encode_image(self._two_tower(params), images)

    def encode_text(self, params: Any, tokens: jax.Array) -> jax.Array:
        return super().encode_text(self._two_tower(params), tokens)

    def encode_patches(self, params: Any, images: jax.Array) -> jax.Array:
        return super().encode_patches(self._two_tower(params), images)

    def encode_aligned_patches(self, params: Any, images: jax.Array) -> jax.Array:
        return super().encode_aligned_patches(self._two_tower(params), images)

    def encode_signal(self, params: Any, signals: jax.Array) -> jax.Array:
        """signals [B, T] -> L2-normalised [B, D]."""
        return self.signal_tower.apply({"params": params["signal_tower"]}, signals)

    def train_flops_per_example(self) -> float:
        block = self.config.symile
        embed_dim = self.config.model.embed_dim
        signal = signal_forward_flops(block.signal_len, block.signal_width, block.signal_depth,
                                      block.signal_mlp_dim, embed_dim)
        # The parent counts one [B, B] logits row; Symile has 3 anchors (x N for O(N^2) negatives).
        extra_rows = 2 if block.negative_sampling == "n" else 3 * self.config.batch_size - 1
        logits = extra_rows * 2.0 * self.config.batch_size * embed_dim
        return super().train_flops_per_example() + 3.0 * (signal + logits)
