"""The interface every objective implements."""

from __future__ import annotations

import abc
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

Params = Any
Metrics = dict[str, jax.Array]


def image_text_batch(config: ml_collections.ConfigDict, batch_size: int,
                     image_size: int | None = None) -> dict[str, np.ndarray]:
    """Zeros of an image-caption batch: image [B, H, W, 3] float32 (H = W = `image_size`, default
    data.image_size), text [B, data.max_text_len] int32, label [B] int32 (objectives' `example_batch`)."""
    size = config.data.image_size if image_size is None else image_size
    return {"image": np.zeros((batch_size, size, size, 3), np.float32),
            "text": np.zeros((batch_size, config.data.max_text_len), np.int32),
            "label": np.zeros((batch_size,), np.int32)}


class Objective(abc.ABC):
    """Builds a model from a config and defines its training loss.

    Subclasses read the config in `__init__` and pass plain values to models and losses. `init` returns
    logically-partitioned (boxed) params, so the trainer can derive shardings from `jax.eval_shape(init, rng)`.
    """

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        if config.model.image.patch_dropout and not self.supports_patch_dropout:
            raise ValueError(f"invalid config: model.image.patch_dropout={config.model.image.patch_dropout} is not "
                             f"supported by objective {config.objective!r}; set it to 0.0 (FLIP patch dropout is for "
                             "the two-tower objectives: clip, align, siglip)")

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

    @classmethod
    def default_config(cls) -> dict[str, Any] | None:
        """This objective's own block of config keys and defaults; `config.base_config()` adds it under the
        registered name (e.g. `config.coca`), so typos still fail at start. None = no block."""
        return None

    @classmethod
    def validate_config(cls, config: ml_collections.ConfigDict) -> None:
        """Checks this objective's block when it is the configured objective (raise ValueError naming key/value)."""

    # A frozen reference model (vlp.train.frozen.Reference, from config.reference: a distillation teacher, Mod-X's
    # previous phase). Objectives that read one set it in __init__, set has_extra and put `reference.init_extra()`
    # into their extra state; the trainer loads it there at every start and keeps it out of checkpoints, so the
    # loss reads it as extra[frozen.REFERENCE_KEY].
    reference: Any = None
    # True where evaluation needs the reference too (the prompt objective's frozen CLIP encodes what is evaluated):
    # the tools then load it (and check its fingerprint) beside the run's params.
    eval_reads_reference: bool = False

    # Objectives with state outside the optimizer (EMA teacher, centres) override the three hooks below; the trainer
    # then calls `loss_fn_with_extra` instead of `loss_fn` and stores `update_extra`'s result in TrainState.extra.
    has_extra: bool = False

    def init_extra(self, params: Params) -> Any:
        """The initial extra state (boxed like `init`'s params where it mirrors them); None = none."""
        return None

    def initial_extra(self, params: Params, shardings: Any) -> Any:
        """The extra state a run starts with, from the params it starts with (fresh or `init_from`'s), placed on
        `shardings` (the trainer calls it outside jit, under the run's mesh). Default: `init_extra`, jitted; a
        frozen reference model read from disk (EVA's teacher) overrides it."""
        return jax.jit(lambda p: nn.unbox(self.init_extra(p)), out_shardings=shardings)(params)

    def loss_fn_with_extra(self, params: Params, extra: Any, batch: dict[str, jax.Array],
                           rng: jax.Array, step: jax.Array) -> tuple[jax.Array, tuple[Metrics, Any]]:
        """(loss, (metrics, aux)): `aux` carries what `update_extra` needs (e.g. this step's teacher outputs)."""
        raise NotImplementedError(f"{type(self).__name__} has no extra state")

    def update_extra(self, extra: Any, params: Params, aux: Any, step: jax.Array) -> Any:
        """The extra state after the optimizer step (`params` are the updated student params)."""
        return extra

    def eval_params(self, params: Params, extra: Any) -> Params:
        """What evaluators and encoders receive: the trained params, or (prompt learning, whose frozen CLIP is in the
        extra state) both."""
        del extra
        return params

    # FLIP patch dropout. The trainer trains the steps before `patch_dropout_until_step` (None: every step) on
    # `add_step_inputs(batch, rng, patch_dropout=True)` and later steps (the final unmasked phase) on
    # `patch_dropout=False`; objectives that support it set the first two in __init__.
    supports_patch_dropout: bool = False
    patch_dropout_until_step: int | None = None

    def add_step_inputs(self, batch: dict[str, jax.Array], rng: jax.Array,
                        patch_dropout: bool) -> dict[str, jax.Array]:
        """The global batch plus inputs drawn from the step's `rng` (FLIP's kept patches); default: unchanged."""
        return batch

    def train_example_transform(self, default: Any) -> Any:
        """The per-example grain transform of the training stream; `default` picks one caption per example."""
        return default

    def model_config(self) -> dict[str, Any]:
        """A JSON-able description of the model (written next to exported weights)."""
        return {"objective": self.config.objective, "model": self.config.model.to_dict()}


def resolve_compute_dtype(name: str) -> Any:
    """`auto` -> bfloat16 on GPU/TPU, float32 on CPU (params and optimizer state stay float32)."""
    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu", "cuda", "rocm") else jnp.float32
    return jnp.dtype(name)
