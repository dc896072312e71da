"""XBT, cross-modal backward-compatible training (Jang & Lim, 2024, "Towards Cross-modal Backward-compatible
Representation Learning for Vision-Language Models"): a projection psi maps a NEW two-tower model's embeddings into
an OLD model's space, so a gallery the old model embedded once stays searchable with queries of the new model
(no backfilling). Only psi trains; both models are frozen.

- The old model is the run's `reference` (vlp.train.frozen.Reference: any format, reloaded at every start, never
  checkpointed, checked by fingerprint).
- The new model is named by `xbt.new` (format / path, the same keys and formats as `reference`; its resolved config
  is recorded in `xbt.new.config` at the first start). Its params are read into TrainState.extra["new"] at the first
  start and checkpointed with the run (as EVA's teacher), so evaluation and export need only this run's workdir.
  They are not trainable params: the optimizer sees psi alone, so nothing else can move.
- `xbt.stage` picks the loss (vlp.losses.compatibility, symmetric InfoNCE over the global batch, `xbt.temperature`,
  plus an optional cosine term):
  "text"  (stage 1): psi(new_text(t)) vs old_text(t) on captions alone; the batch carries a 1x1 stand-in for each
          image (`DropImage`), so no pixels reach the device and no image tower runs.
  "pairs" (stage 2): psi(new_image(x)) vs old_text(t) and psi(new_text(t)) vs old_image(x), averaged: the two
          cross-model directions a retrieval system serves (new image query -> old text gallery, new text query ->
          old image gallery). Start it from stage 1's psi with `init_from`.
- Evaluators and tools see `encode_image` / `encode_text` = psi(new model's embedding): the new model's
  embeddings in the old space. `tools/eval.py --gallery_workdir=<old run>` scores them against the old gallery.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlp import config as vlp_config
from vlp.losses.compatibility import compatibility_loss
from vlp.models import flops
from vlp.models.projection import PROJECTION_KINDS, EmbeddingProjection
from vlp.objectives import register
from vlp.objectives.base import Metrics, Objective, image_text_batch
from vlp.objectives.two_tower import TwoTowerObjective
from vlp.parallel.mesh import BATCH_AXES
from vlp.train import frozen

STAGES = ("text", "pairs")
NEW_KEY = "new"  # extra["new"]: the frozen new model's params


@dataclasses.dataclass
class DropImage(grain.transforms.Map):
    """Runs `inner`, then replaces the image by a 1x1 black stand-in (stage 1 trains on captions alone; the batch
    keeps an `image` field because the batching step normalises one)."""

    inner: grain.transforms.Map

    def map(self, example: dict) -> dict:
        out = self.inner.map(example)
        out["image"] = np.zeros((1, 1, 3), np.uint8)
        return out


def _two_tower(objective: Any, what: str, where: str) -> TwoTowerObjective:
    if not isinstance(objective, TwoTowerObjective):
        raise ValueError(f"invalid config: objective 'xbt' needs a two-tower {what} model (clip, siglip, align); "
                         f"{where} holds objective {objective.config.objective!r}")
    if not objective.model.embed_dim:
        raise ValueError(f"invalid config: the {what} model ({where}) has no embedding projection "
                         f"(model.embed_dim={objective.model.embed_dim!r}); XBT maps joint embeddings")
    return objective


def _zeros_like_init(init: Any) -> Any:
    """Boxed zeros with the shapes and logical names of `init(rng)`'s params (the boxes' metadata is kept)."""
    return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(init, jax.random.key(0)))


@register("xbt")
class XbtObjective(Objective):
    """Trains psi: new model embeddings -> old model space (InfoNCE + cosine against the old model's embeddings)."""

    has_extra = True

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        return dict(
            stage="text",  # text (stage 1: captions only) | pairs (stage 2: image-text pairs)
            new=dict(format="vlp", path="", config=""),  # the frozen new model (config: recorded at first start)
            projection="mlp",  # mlp (Linear, GELU, Linear; hidden = hidden_mult x old dim) | linear
            hidden_mult=2,
            temperature=0.05,  # InfoNCE temperature (fixed: only psi trains)
            cosine_weight=0.0,  # weight of mean(1 - cos(psi(new), old)) beside the InfoNCE
        )

    @classmethod
    def validate_config(cls, config: ml_collections.ConfigDict) -> None:
        block = config.xbt
        if block.stage not in STAGES:
            raise ValueError(f"invalid config: xbt.stage={block.stage!r}; valid: {STAGES}")
        if block.projection not in PROJECTION_KINDS:
            raise ValueError(f"invalid config: xbt.projection={block.projection!r}; valid: {PROJECTION_KINDS}")
        if not (isinstance(block.hidden_mult, int) and block.hidden_mult >= 1):
            raise ValueError(f"invalid config: xbt.hidden_mult={block.hidden_mult!r} must be an integer >= 1")
        if not block.temperature > 0:
            raise ValueError(f"invalid config: xbt.temperature={block.temperature!r} must be > 0")
        if not block.cosine_weight >= 0:
            raise ValueError(f"invalid config: xbt.cosine_weight={block.cosine_weight!r} must be >= 0")
        if not block.new.config:  # a started run evaluates from its recorded config and checkpointed params
            if not block.new.path:
                raise ValueError("invalid config: objective 'xbt' needs the new model: set xbt.new.path (and "
                                 f"xbt.new.format, one of {vlp_config.INIT_FROM_FORMATS}), e.g. the workdir of a "
                                 "configs/clip.py:tiny run")
            vlp_config.check_init_from(block.new, "xbt.new")

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        block = config.xbt
        self.stage, self.logit_scale = block.stage, 1.0 / float(block.temperature)
        self.cosine_weight = float(block.cosine_weight)
        self.reference = frozen.Reference(config)  # the old model
        self.new = frozen.Reference(config, block.new)
        self.old_model = _two_tower(self.reference.objective, "old", f"reference.path={config.reference.path!r}")
        self.new_model = _two_tower(self.new.objective, "new", f"xbt.new.path={block.new.path!r}")
        self.tokenizer = self.new_model.tokenizer
        reads = {"this run": (config.data.image_size, config.data.max_text_len, self.tokenizer.vocab_size)}
        for name, model in (("the old model", self.old_model), ("the new model", self.new_model)):
            reads[name] = (model.config.data.image_size, model.config.data.max_text_len,
                           model.tokenizer.vocab_size)
        if len(set(reads.values())) > 1:
            raise ValueError(f"invalid config: (data.image_size, data.max_text_len, tokenizer vocab) differ: {reads}; "
                             f"XBT embeds the same images and captions with both models: set this run's to the "
                             f"models' (and use two models that read the same inputs)")
        self.new_dim, self.old_dim = int(self.new_model.model.embed_dim), int(self.old_model.model.embed_dim)
        self.psi = EmbeddingProjection(out_dim=self.old_dim, kind=block.projection,
                                       hidden_dim=block.hidden_mult * self.old_dim)

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        # Stage 1 sends 1x1 stand-ins for the images (DropImage): no pixels reach the device.
        return image_text_batch(self.config, batch_size, None if self.stage == "pairs" else 1)

    def train_example_transform(self, default: Any) -> Any:
        return DropImage(default) if self.stage == "text" else default

    def init(self, rng: jax.Array) -> Any:
        return {"psi": self.psi.init(rng, jnp.zeros((1, self.new_dim), jnp.float32))["params"]}

    def init_extra(self, params: Any) -> Any:
        """Zero stand-ins with the new and old models' shapes and logical names (their shardings), which cost no
        init computation; `initial_extra` reads the new model, the trainer attaches the old one
        (`frozen.attach_reference`)."""
        return {NEW_KEY: _zeros_like_init(self.new_model.init), frozen.REFERENCE_KEY:
                _zeros_like_init(self.old_model.init),
                frozen.FINGERPRINT_KEY: jnp.zeros((frozen.FINGERPRINT_WORDS,), jnp.uint32)}

    def initial_extra(self, params: Any, shardings: Any) -> Any:
        old_shardings = {k: v for k, v in shardings.items() if k != NEW_KEY}
        stand_ins = jax.jit(lambda: {k: v for k, v in nn.unbox(self.init_extra(None)).items() if k != NEW_KEY},
                            out_shardings=old_shardings)()
        new_params, _ = self.new.load(shardings[NEW_KEY])
        return {NEW_KEY: new_params, **stand_ins}

    def eval_params(self, params: Any, extra: Any) -> Any:
        return {NEW_KEY: extra[NEW_KEY], "psi": params["psi"]}

    def project(self, params: Any, new_emb: jax.Array) -> jax.Array:
        """new model embeddings [B, D_new] -> L2-normalised [B, D_old] in the old model's space."""
        return self.psi.apply({"params": params["psi"]}, new_emb)

    def encode_image(self, params: Any, images: jax.Array) -> jax.Array:
        """images [B, H, W, 3] -> psi(new image embedding) [B, D_old]; `params` as `eval_params` gives them."""
        return self.project(params, self.new_model.encode_image(params[NEW_KEY], images))

    def encode_text(self, params: Any, tokens: jax.Array) -> jax.Array:
        """tokens [B, L] -> psi(new text embedding) [B, D_old]; `params` as `eval_params` gives them."""
        return self.project(params, self.new_model.encode_text(params[NEW_KEY], tokens))

    def loss_fn(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, Metrics]:
        raise NotImplementedError("objective 'xbt' reads its frozen new and old models from the extra state: the "
                                  "trainer calls loss_fn_with_extra")

    def loss_fn_with_extra(self, params: Any, extra: Any, batch: dict[str, jax.Array], rng: jax.Array,
                           step: jax.Array) -> tuple[jax.Array, tuple[Metrics, Any]]:
        del rng, step
        new = jax.lax.stop_gradient(extra[NEW_KEY])
        old = jax.lax.stop_gradient(extra[frozen.REFERENCE_KEY])
        full = {NEW_KEY: new, "psi": params["psi"]}

        def term(name: str, projected: jax.Array, target: jax.Array) -> tuple[jax.Array, Metrics]:
            loss, metrics = compatibility_loss(projected, jax.lax.stop_gradient(target), self.logit_scale,
                                               self.cosine_weight, batch_axes=BATCH_AXES)
            return loss, {f"{k}_{name}": v for k, v in metrics.items()}

        if self.stage == "text":
            loss, metrics = term("text", self.encode_text(full, batch["text"]),
                                 self.old_model.encode_text(old, batch["text"]))
            return loss, (dict(metrics, loss_compat=loss), None)
        old_out = self.old_model.embed(old, {"image": batch["image"], "text": batch["text"]})
        image_loss, image_metrics = term("image2old_text", self.encode_image(full, batch["image"]), old_out["text_emb"])
        text_loss, text_metrics = term("text2old_image", self.encode_text(full, batch["text"]), old_out["image_emb"])
        loss = 0.5 * (image_loss + text_loss)
        return loss, ({**image_metrics, **text_metrics, "loss_compat": loss}, None)

    def update_extra(self, extra: Any, params: Any, aux: Any, step: jax.Array) -> Any:
        return extra  # both models are frozen

    def train_flops_per_example(self) -> float:
        """Forward passes of the frozen towers the stage runs (both models; text towers only in stage 1) and psi's
        forward + backward on each projected embedding."""
        total = 0.0
        for model in (self.new_model, self.old_model):
            text = model.model.text
            total += flops.text_forward_flops(text["max_len"], text["width"], text["depth"], text["mlp_dim"],
                                              text["causal"]) + 2 * text["width"] * model.model.embed_dim
            if self.stage == "pairs":
                image = model.model.image
                total += flops.vit_forward_flops(self.config.data.image_size, image["patch_size"], image["width"],
                                                 image["depth"], image["mlp_dim"], image["num_cls_tokens"],
                                                 image["pool"]) + 2 * image["width"] * model.model.embed_dim
        psi_matmuls = (self.new_dim * self.psi.hidden_dim + self.psi.hidden_dim * self.old_dim
                       if self.psi.kind == "mlp" else self.new_dim * self.old_dim)
        projected = 1 if self.stage == "text" else 2
        return total + 3.0 * 2 * psi_matmuls * projected
