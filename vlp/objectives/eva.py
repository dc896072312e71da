"""EVA (Fang et al., 2023): masked feature regression. A ViT with a mask token (BEiT-style block masks) and a linear
head predicts, for each masked patch, the feature of a frozen teacher image tower on the unmasked image;
loss = -mean cos over the masked patches.

Target space (`mim.teacher_features`): "aligned" (default, EVA's choice: CLIP's image-text aligned space) = the
teacher's patch tokens, CLS dropped, after its final LayerNorm (`ln_post`) and the image projection `@ proj`
([B, N, embed_dim], not L2-normalised: the cosine loss does not care); "patch_tokens" = the same tokens before the
projection ([B, N, width]). The teacher is any vlp run with patch tokens and the same patch grid (e.g.
`configs/clip.py:tiny`); "aligned" needs a two-tower teacher (clip, siglip, align).

Where the teacher comes from: it is the run's frozen reference model (`reference.format/path`: a vlp workdir, or a
safetensors, hf or open_clip export; `vlp.train.frozen.Reference`, as distillation's teacher). It is loaded onto the
run's mesh sharded like the student at every start, holds no optimizer state and is not written into the
checkpoints, which keep its fingerprint instead: a resume reloads it from `reference.path` and refuses a changed
one. Its resolved config is recorded as `reference.config` in the run's config.json, so evaluating or exporting the
run (the student's params only) needs no teacher.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from vlp.losses.mim import eva_cosine
from vlp.models import flops
from vlp.models.masked import SimMim
from vlp.objectives import register
from vlp.objectives.base import Metrics, resolve_compute_dtype
from vlp.objectives.masked_image import ImageOnlyObjective
from vlp.objectives.two_tower import image_tower_kwargs
from vlp.parallel import sharding
from vlp.train import frozen

# mim.teacher_features -> the teacher objective's method giving [B, N, D] targets from images [B, H, W, 3].
TEACHER_FEATURES = {"aligned": "encode_aligned_patches", "patch_tokens": "encode_patches"}


@register("eva")
class EvaObjective(ImageOnlyObjective):
    """loss = -mean_{p in M} cos(W h_p, f_p), f = the frozen teacher's features of the unmasked image."""

    has_extra = True

    def __init__(self, config):
        super().__init__(config)
        mim = config.mim
        self.reference = frozen.Reference(config)
        self.teacher, teacher_cfg = self.reference.objective, self.reference.config
        source = f"the teacher (reference.path={config.reference.path!r}, format {config.reference.format!r})"
        if mim.teacher_features not in TEACHER_FEATURES:
            raise ValueError(f"invalid config: mim.teacher_features={mim.teacher_features!r}; valid: "
                             f"{tuple(TEACHER_FEATURES)}")
        method = TEACHER_FEATURES[mim.teacher_features]
        if not hasattr(self.teacher, method):
            raise ValueError(f"invalid config: mim.teacher_features={mim.teacher_features!r} needs a teacher with "
                             f"{method}; {source} is objective {teacher_cfg.objective!r}, which has none (use a "
                             f"clip, siglip or align teacher, or mim.teacher_features='patch_tokens')")
        self.teacher_features = getattr(self.teacher, method)
        self.teacher_image = image_tower_kwargs(teacher_cfg.model)
        teacher_grid = teacher_cfg.data.image_size // self.teacher_image["patch_size"]
        if teacher_cfg.data.image_size != config.data.image_size or teacher_grid != self.grid[0]:
            raise ValueError(f"invalid config: {source} reads {teacher_cfg.data.image_size} px images as a "
                             f"{teacher_grid}x{teacher_grid} patch grid, the student {config.data.image_size} px as "
                             f"{self.grid[0]}x{self.grid[1]}; "
                             f"use the teacher's data.image_size and a patch size giving the same grid")
        teacher_shapes = sharding.strip_boxes(jax.eval_shape(self.teacher.init, jax.random.key(0)))
        features = jax.eval_shape(self.teacher_features, teacher_shapes,
                                  np.zeros((1, *self.image_shape), np.float32))
        self.model = SimMim(self.image_kwargs, out_dim=int(features.shape[-1]),
                            dtype=resolve_compute_dtype(config.precision.compute_dtype))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        size = self.config.data.image_size
        return size, size, 3

    def init(self, rng: jax.Array) -> Any:
        batch = self.example_batch(1)
        return self.model.init(rng, batch["image"], batch["mim_mask"])["params"]

    def init_extra(self, params: Any) -> Any:
        """Stand-ins of the teacher (boxed: sharded like the student) and its fingerprint; the trainer loads the
        teacher from reference.path over them at every start (`frozen.attach_reference`)."""
        return self.reference.init_extra()

    def initial_extra(self, params: Any, shardings: Any) -> Any:
        """Only the fingerprint's placeholder: the trainer puts the teacher's params in next (no random teacher is
        initialised only to be overwritten)."""
        return self.reference.initial_extra(shardings)

    def loss_fn(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, Metrics]:
        raise NotImplementedError("EVA's loss reads the frozen teacher (the reference model) in TrainState.extra: "
                                  "the trainer calls loss_fn_with_extra")

    def targets(self, teacher_params: Any, images: jax.Array) -> jax.Array:
        """images [B, H, W, 3] -> the teacher's `mim.teacher_features` [B, N, D] (no gradient to the teacher)."""
        return jax.lax.stop_gradient(self.teacher_features(jax.lax.stop_gradient(teacher_params), images))

    def loss_fn_with_extra(self, params: Any, extra: Any, batch: dict[str, jax.Array], rng: jax.Array,
                           step: jax.Array) -> tuple[jax.Array, tuple[Metrics, Any]]:
        del rng, step
        pred = self.model.apply({"params": params}, batch["image"], batch["mim_mask"])
        loss = eva_cosine(pred, self.targets(extra[frozen.REFERENCE_KEY], batch["image"]), batch["mim_mask"])
        return loss, ({"loss_feature_cosine": loss}, None)

    def update_extra(self, extra: Any, params: Any, aux: Any, step: jax.Array) -> Any:
        return extra  # the teacher is frozen

    def train_flops_per_example(self) -> float:
        k = self.image_kwargs
        student = flops.vit_forward_flops(self.config.data.image_size, k["patch_size"], k["width"], k["depth"],
                                          k["mlp_dim"], k["num_cls_tokens"], k["pool"])
        t = self.teacher_image
        teacher = flops.vit_forward_flops(self.config.data.image_size, t["patch_size"], t["width"], t["depth"],
                                          t["mlp_dim"], t["num_cls_tokens"], t["pool"])
        return 3.0 * student + teacher  # the teacher runs forward only
