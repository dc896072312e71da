"""The interface every objective implements."""

from __future__ import annotations

import abc
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

Params = Any
Metrics = dict[str, jax.Array]


class Objective(abc.ABC):
    """Builds a model from a config and defines its training loss.

    Subclasses read the config in `__init__` and pass plain values to models and losses. `init` returns
    logically-partitioned (boxed) params, so the trainer can derive shardings from `jax.eval_shape(init, rng)`.
    """

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config

    @abc.abstractmethod
    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        """Zeros shaped like one training batch (for init and abstract shapes)."""

    @abc.abstractmethod
    def init(self, rng: jax.Array) -> Params:
        """Boxed (nn.Partitioned) initial params."""

    @abc.abstractmethod
    def loss_fn(self, params: Params, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, Metrics]:
        """Scalar loss and a flat dict of scalar metrics, on the global batch (sharded losses inside)."""

    @abc.abstractmethod
    def train_flops_per_example(self) -> float:
        """Model FLOPs (forward + backward) per training example, for MFU."""

    def model_config(self) -> dict[str, Any]:
        """A JSON-able description of the model (written next to exported weights)."""
        return {"objective": self.config.objective, "model": self.config.model.to_dict()}


def resolve_compute_dtype(name: str) -> Any:
    """`auto` -> bfloat16 on GPU/TPU, float32 on CPU (params and optimizer state stay float32)."""
    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu", "cuda", "rocm") else jnp.float32
    return jnp.dtype(name)
