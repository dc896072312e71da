"""TIPS (Maninis et al., ICLR 2025): dual-caption image-text contrastive learning plus DINO/iBOT self-distillation.

loss = w_c (InfoNCE(CLS 1, noisy caption) + InfoNCE(CLS 2, synthetic caption))
       + w_dino DINO(student CLS 1 | teacher CLS 1) + w_ibot iBOT(student masked patches | teacher patches).
The student sees the masked image (learned mask token), the EMA teacher (image tower + head) the unmasked one.
Choices where the paper or repo leave it open (see configs/tips.py): one global crop, no local crops; the DINO head
is shared by CLS and patch tokens (DINOv2 default); DINO uses CLS 1; the contrastive terms read an unmasked student
forward pass (`tips.contrastive_view="unmasked"`, configs/tips.py) or, saving that pass, the masked view.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlp.data.tokenizer import Tokenizer
from vlp.data.transforms import SelectBothCaptions
from vlp.losses import distill
from vlp.losses.contrastive import sharded_contrastive_loss
from vlp.models import flops
from vlp.models.tips import NUM_CLS, Tips
from vlp.objectives import register
from vlp.objectives.base import Metrics, Objective, resolve_compute_dtype
from vlp.objectives.masked_image import MaskedImageMixin
from vlp.objectives.two_tower import image_tower_kwargs, text_tower_kwargs
from vlp.parallel.mesh import BATCH_AXES

TEACHER_KEYS = ("image", "dino_head")  # the subtrees the EMA teacher mirrors


@register("tips")
class TipsObjective(MaskedImageMixin, Objective):
    has_extra = True

    def __init__(self, config):
        super().__init__(config)
        self.tokenizer = Tokenizer(config.data.tokenizer or None)
        m, d = config.model, config.distill
        image = image_tower_kwargs(m)
        self.patch_size = image["patch_size"]
        self.model = Tips(
            image=image, text=text_tower_kwargs(m, self.tokenizer, config.data.max_text_len), embed_dim=m.embed_dim,
            head=dict(hidden=d.head_hidden, bottleneck=d.head_bottleneck, num_prototypes=d.num_prototypes,
                      num_layers=d.head_layers),
            logit_scale_init=m.logit_scale_init, logit_scale_max=m.logit_scale_max,
            dtype=resolve_compute_dtype(config.precision.compute_dtype))

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        size, length = self.config.data.image_size, self.config.data.max_text_len
        return {"image": np.zeros((batch_size, size, size, 3), np.float32),
                "text_noisy": np.zeros((batch_size, length), np.int32),
                "text_synthetic": np.zeros((batch_size, length), np.int32),
                "label": np.zeros((batch_size,), np.int32),
                "mim_mask": np.zeros((batch_size, self.grid[0] * self.grid[1]), bool)}

    def train_example_transform(self, default: Any) -> Any:
        del default  # TIPS trains on both captions of every example
        return super().train_example_transform(SelectBothCaptions())

    def init(self, rng: jax.Array) -> Any:
        b = self.example_batch(1)
        return self.model.init(rng, b["image"], b["text_noisy"], b["mim_mask"])["params"]

    def init_extra(self, params: Any) -> Any:
        k = self.config.distill.num_prototypes
        return {"teacher": {key: params[key] for key in TEACHER_KEYS},
                "center_cls": jnp.zeros((k,), jnp.float32), "center_patch": jnp.zeros((k,), jnp.float32)}

    def loss_fn(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, Metrics]:
        raise NotImplementedError("TIPS's loss needs the EMA teacher: the trainer calls loss_fn_with_extra")

    def _contrastive(self, image_emb, text_emb, scale) -> tuple[jax.Array, Metrics]:
        return sharded_contrastive_loss("softmax", image_emb, text_emb, scale, None,
                                        label_smoothing=self.config.loss.label_smoothing, batch_axes=BATCH_AXES,
                                        variant=self.config.loss.variant)

    def loss_fn_with_extra(self, params: Any, extra: Any, batch: dict[str, jax.Array], rng: jax.Array,
                           step: jax.Array) -> tuple[jax.Array, tuple[Metrics, Any]]:
        del rng
        cfg, d = self.config, self.config.distill
        apply = lambda method, *args, p=params: self.model.apply({"params": p}, *args, method=method)  # noqa: E731
        mask = batch["mim_mask"]
        tokens = apply(Tips.image_tokens, batch["image"], mask)
        view = tokens if cfg.tips.contrastive_view == "masked" else apply(Tips.image_tokens, batch["image"])
        emb1, emb2 = apply(Tips.cls_embeddings, view)
        scale = apply(Tips.logit_scale)
        loss1, m1 = self._contrastive(emb1, apply(Tips.encode_text, batch["text_noisy"]), scale)
        loss2, m2 = self._contrastive(emb2, apply(Tips.encode_text, batch["text_synthetic"]), scale)
        s_cls, s_patch = apply(Tips.distill_logits, tokens)
        teacher = jax.lax.stop_gradient(extra["teacher"])
        t_cls, t_patch = apply(Tips.teacher_logits, batch["image"], p=teacher)
        t_temp = distill.teacher_temperature(step, d.teacher_temp_start, d.teacher_temp, d.teacher_temp_warmup_steps)
        loss_dino = distill.dino_loss(s_cls, t_cls, extra["center_cls"], d.student_temp, t_temp)
        loss_ibot = distill.ibot_loss(s_patch, t_patch, extra["center_patch"], mask, d.student_temp, t_temp)
        loss = cfg.tips.contrastive_weight * (loss1 + loss2) + d.dino_weight * loss_dino + d.ibot_weight * loss_ibot
        probs = jax.nn.softmax((t_cls - extra["center_cls"]) / t_temp, axis=-1)
        metrics = {"loss_contrastive_cls1": loss1, "loss_contrastive_cls2": loss2, "loss_dino": loss_dino,
                   "loss_ibot": loss_ibot, "teacher_temp": t_temp, "logit_scale": scale,
                   "teacher_entropy": -(probs * jnp.log(probs + 1e-12)).sum(-1).mean()}
        metrics.update({f"{k}_cls1": v for k, v in m1.items() if k != "loss"})
        metrics.update({f"{k}_cls2": v for k, v in m2.items() if k != "loss"})
        aux = {"center_cls": distill.update_center(extra["center_cls"], t_cls, d.center_momentum),
               "center_patch": distill.update_center(extra["center_patch"], t_patch, d.center_momentum)}
        return loss, (metrics, aux)

    def update_extra(self, extra: Any, params: Any, aux: Any, step: jax.Array) -> Any:
        d = self.config.distill
        momentum = distill.ema_momentum(step, self.config.total_steps, d.ema_momentum, d.ema_momentum_final)
        student = {key: params[key] for key in TEACHER_KEYS}
        return {"teacher": distill.ema_update(extra["teacher"], student, momentum), **aux}

    def encode_image(self, params: Any, images: jax.Array, output: int = 1) -> jax.Array:
        """images [B, H, W, 3] -> L2-normalised CLS `output` (1: noisy-caption space, 2: synthetic) [B, D]."""
        return self.model.apply({"params": params}, images, output, method=Tips.encode_image)

    def encode_text(self, params: Any, tokens: jax.Array) -> jax.Array:
        return self.model.apply({"params": params}, tokens, method=Tips.encode_text)

    def train_flops_per_example(self) -> float:
        image, text = self.model.image, self.model.text
        vit = flops.vit_forward_flops(self.config.data.image_size, image["patch_size"], image["width"],
                                      image["depth"], image["mlp_dim"], NUM_CLS, "cls")
        views = 1 if self.config.tips.contrastive_view == "masked" else 2
        txt = flops.text_forward_flops(text["max_len"], text["width"], text["depth"], text["mlp_dim"],
                                       text["causal"])
        return 3.0 * (views * vit + 2 * txt) + vit  # student + text (fwd + bwd), teacher forward only

    def model_config(self) -> dict[str, Any]:
        out = super().model_config()
        out.update(image_tower=self.model.image, text_tower=self.model.text, image_size=self.config.data.image_size)
        return out
