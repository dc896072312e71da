"""EVA (Fang et al., 2023): masked feature regression. A ViT with a mask token (BEiT-style block masks) and a linear
head predicts, for each masked patch, the patch feature of a frozen teacher image tower on the unmasked image;
loss = -mean cos over the masked patches.

The teacher is any vlp run with patch tokens (e.g. `configs/clip.py:tiny`): `mim.teacher_workdir` names its workdir,
whose config.json and newest checkpoint give the tower. Its patch grid must equal the student's. The teacher params
live in TrainState.extra (frozen, never updated, checkpointed with the run so a resume needs no teacher lookup).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from vlp import config as vlp_config
from vlp.losses.mim import eva_cosine
from vlp.models import flops
from vlp.models.masked import SimMim
from vlp.objectives import register
from vlp.objectives.base import Metrics, resolve_compute_dtype
from vlp.objectives.masked_image import ImageOnlyObjective
from vlp.objectives.two_tower import image_tower_kwargs


def load_teacher(workdir: str) -> tuple[Any, Any]:
    """(teacher objective, host numpy params) of a vlp workdir's newest good checkpoint."""
    from vlp.train.trainer import build_experiment, restore_params  # the trainer imports objectives

    config = vlp_config.load_json(Path(workdir) / "config.json")
    with config.unlocked():
        config.mesh.update(shape=(1, 1, 1), num_devices=1)  # restored on one device, then held as host arrays
    exp = build_experiment(config)
    if not hasattr(exp.objective, "encode_patches"):
        raise ValueError(f"mim.teacher_workdir={workdir!r}: objective {config.objective!r} has no patch tokens")
    with exp.context():
        _, params = restore_params(workdir, exp.abstract_state.params)
    return exp.objective, jax.tree.map(np.asarray, jax.device_get(params))


@register("eva")
class EvaObjective(ImageOnlyObjective):
    """loss = -mean_{p in M} cos(W h_p, f_p), f = the frozen teacher's patch tokens of the unmasked image."""

    has_extra = True

    def __init__(self, config):
        super().__init__(config)
        self.teacher, self.teacher_params = load_teacher(config.mim.teacher_workdir)
        teacher_cfg = self.teacher.config
        self.teacher_image = image_tower_kwargs(teacher_cfg.model)
        teacher_grid = teacher_cfg.data.image_size // self.teacher_image["patch_size"]
        if teacher_cfg.data.image_size != config.data.image_size or teacher_grid != self.grid[0]:
            raise ValueError(f"invalid config: the teacher in mim.teacher_workdir={config.mim.teacher_workdir!r} "
                             f"reads {teacher_cfg.data.image_size} px images as a {teacher_grid}x{teacher_grid} "
                             f"patch grid, the student {config.data.image_size} px as {self.grid[0]}x{self.grid[1]}; "
                             f"use the teacher's data.image_size and a patch size giving the same grid")
        features = self.teacher.encode_patches(self.teacher_params, np.zeros((1, *self.image_shape), np.float32))
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
        return {"teacher": jax.tree.map(np.asarray, self.teacher_params)}

    def loss_fn(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, Metrics]:
        raise NotImplementedError("EVA's loss reads the frozen teacher in TrainState.extra: the trainer calls "
                                  "loss_fn_with_extra")

    def loss_fn_with_extra(self, params: Any, extra: Any, batch: dict[str, jax.Array], rng: jax.Array,
                           step: jax.Array) -> tuple[jax.Array, tuple[Metrics, Any]]:
        del rng, step
        pred = self.model.apply({"params": params}, batch["image"], batch["mim_mask"])
        target = self.teacher.encode_patches(jax.lax.stop_gradient(extra["teacher"]), batch["image"])
        loss = eva_cosine(pred, target, batch["mim_mask"])
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
