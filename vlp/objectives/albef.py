"""ALBEF (Li et al., 2021): image-text contrast against momentum features and queues with momentum distillation
(ITC), image-text matching on the fusion encoder's CLS with hard negatives (ITM), and masked language modelling
with distilled targets (MLM). L = L_itc + L_itm + L_mlm (methods.md section 10).

State outside the optimizer (TrainState.extra): the momentum model (EMA, m = 0.995, over every module but the ITM
head and the temperature), image and text feature queues [Q, E] and their write position. The queues are
replicated: every device's ITC rows need all Q columns each step, so sharding them would all-gather the whole queue
every step anyway; replicated they cost 2 Q E x 4 bytes per device (ALBEF's Q = 65,536, E = 256: 128 MiB), against
a step's activations of several GiB at ViT-B/16.

`albef.batch_scope`: `global` (default) contrasts each row against the momentum features of the whole global batch
(plus the queue) and samples its hard negative from the whole batch, so a run gives the same numbers on any mesh
and draws negatives from the largest pool; `local` restricts both to the row's own batch shard, as ALBEF's per-GPU
code does (init ITC = ln(B_local + Q)).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlp.data.mlm import IGNORE_LABEL, MLM_LABELS_KEY, MLM_TEXT_KEY, AddMLMMask, mlm_vocab_size
from vlp.data.tokenizer import load_tokenizer
from vlp.losses import distill, fusion
from vlp.models import flops
from vlp.models.fusion import FusionModel
from vlp.objectives import register
from vlp.objectives.base import Metrics, Objective, image_text_batch, resolve_compute_dtype
from vlp.objectives.two_tower import image_tower_kwargs, stacking_kwargs
from vlp.parallel.mesh import resolve_mesh_shape

MOMENTUM_KEYS = ("image_tower", "image_proj", "text_tower", "text_proj", "fusion", "mlm_head")
BATCH_SCOPES = ("global", "local")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"invalid config: {message}")


def albef_defaults() -> dict[str, Any]:
    """ALBEF's released defaults (configs/Pretrain.yaml)."""
    return dict(
        fusion_layer=6,  # text-only layers; the other model.text.depth - fusion_layer layers cross-attend
        queue_size=65_536,  # must divide by the global batch
        momentum=0.995,  # EMA of the momentum model
        alpha=0.4,  # momentum distillation weight
        alpha_ramp_steps=1000,  # alpha rises linearly from 0 (ALBEF: over epoch 0)
        temp_init=0.07,  # learnable, clamped to [0.001, 0.5]
        mlm_prob=0.15,
        tie_mlm_head=True,
        batch_scope="global",  # global | local (see the module doc)
        itc_weight=1.0, itm_weight=1.0, mlm_weight=1.0,
    )


def validate_albef_block(block: ml_collections.ConfigDict, name: str, config: ml_collections.ConfigDict) -> None:
    depth = config.model.text.depth
    _check(isinstance(block.fusion_layer, int) and 1 <= block.fusion_layer < depth,
           f"{name}.fusion_layer={block.fusion_layer!r} must be an integer in [1, model.text.depth={depth})")
    _check(isinstance(block.queue_size, int) and block.queue_size > 0 and block.queue_size % config.batch_size == 0,
           f"{name}.queue_size={block.queue_size!r} must be a positive multiple of batch_size={config.batch_size}")
    _check(0.0 <= block.momentum <= 1.0, f"{name}.momentum={block.momentum} must be in [0, 1]")
    _check(0.0 <= block.alpha <= 1.0, f"{name}.alpha={block.alpha} must be in [0, 1]")
    _check(block.alpha_ramp_steps >= 0, f"{name}.alpha_ramp_steps={block.alpha_ramp_steps} must be >= 0")
    _check(0.001 <= block.temp_init <= 0.5, f"{name}.temp_init={block.temp_init} must be in [0.001, 0.5]")
    _check(0.0 < block.mlm_prob <= 1.0, f"{name}.mlm_prob={block.mlm_prob} must be in (0, 1]")
    _check(block.batch_scope in BATCH_SCOPES, f"{name}.batch_scope={block.batch_scope!r}; valid: {BATCH_SCOPES}")
    for key in ("itc_weight", "itm_weight", "mlm_weight"):
        _check(block[key] >= 0, f"{name}.{key}={block[key]} must be >= 0")


def _unit(x: jax.Array) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


@register("albef")
class AlbefObjective(Objective):
    has_extra = True
    block_name = "albef"

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        return albef_defaults()

    @classmethod
    def validate_config(cls, config: ml_collections.ConfigDict) -> None:
        validate_albef_block(config[cls.block_name], cls.block_name, config)

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.block = config[self.block_name]
        self.tokenizer = load_tokenizer(config.data.tokenizer or None)
        m = config.model
        text = dict(width=m.text.width, depth=self.block.fusion_layer, mlp_dim=m.text.mlp_dim,
                    num_heads=m.text.num_heads, eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id,
                    activation=m.activation, ln_eps=m.ln_eps, fused_qkv=m.fused_qkv, **stacking_kwargs(m))
        self.model = FusionModel(
            image=image_tower_kwargs(m), text=text, fusion_depth=m.text.depth - self.block.fusion_layer,
            embed_dim=m.embed_dim, vocab_size=mlm_vocab_size(self.tokenizer), max_text_len=config.data.max_text_len,
            temp_init=self.block.temp_init, tie_mlm_head=self.block.tie_mlm_head,
            dtype=resolve_compute_dtype(config.precision.compute_dtype))
        shards = resolve_mesh_shape(config.mesh.shape, self._num_devices(config))
        self.groups = 1 if self.block.batch_scope == "global" else int(shards[0] * shards[1])

    @staticmethod
    def _num_devices(config: ml_collections.ConfigDict) -> int:
        n = config.mesh.get("num_devices", -1)
        return jax.device_count() if n in (None, -1) else n

    # ------------------------------------------------------------------ data and init

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        length = self.config.data.max_text_len
        return dict(image_text_batch(self.config, batch_size), **{
            MLM_TEXT_KEY: np.zeros((batch_size, length), np.int32),
            MLM_LABELS_KEY: np.full((batch_size, length), IGNORE_LABEL, np.int32)})

    def train_example_transform(self, default: Any) -> Any:
        return AddMLMMask(default, self.tokenizer, self.config.data.max_text_len, self.config.seed,
                          self.block.mlm_prob)

    def init(self, rng: jax.Array) -> Any:
        b = self.example_batch(1)
        return self.model.init(rng, b["image"], b["text"])["params"]

    def init_extra(self, params: Any) -> Any:
        size, dim = self.block.queue_size, self.config.model.embed_dim
        keys = jax.random.split(jax.random.fold_in(jax.random.key(self.config.seed), 0x9E3779B9 & 0x7FFFFFFF), 2)
        replicated = lambda x: nn.Partitioned(x, names=(None, None))  # noqa: E731  (see the module doc)
        return {"momentum": {k: params[k] for k in MOMENTUM_KEYS},
                "image_queue": replicated(_unit(jax.random.normal(keys[0], (size, dim), jnp.float32))),
                "text_queue": replicated(_unit(jax.random.normal(keys[1], (size, dim), jnp.float32))),
                "queue_ptr": jnp.zeros((), jnp.int32)}

    # ------------------------------------------------------------------ loss

    def apply(self, params: Any, *args: Any, method: Any) -> Any:
        return self.model.apply({"params": params}, *args, method=method)

    def alpha(self, step: jax.Array) -> jax.Array:
        ramp = self.block.alpha_ramp_steps
        frac = jnp.minimum(1.0, step.astype(jnp.float32) / ramp) if ramp else jnp.float32(1.0)
        return self.block.alpha * frac

    def loss_fn(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, Metrics]:
        raise NotImplementedError("ALBEF's loss needs the momentum model and queues: the trainer calls "
                                  "loss_fn_with_extra")

    def forward(self, params: Any, extra: Any, batch: dict[str, jax.Array], rng: jax.Array, step: jax.Array,
                momentum_images: jax.Array | None = None) -> tuple[jax.Array, Metrics, dict[str, jax.Array]]:
        """ITC + ITM + MLM; `momentum_images` (TCL's second view) feeds the momentum image encoder.
        -> (loss, metrics, tensors TCL adds its terms from)."""
        m = FusionModel
        block, alpha = self.block, self.alpha(step)
        momentum = {**params, **jax.lax.stop_gradient(extra["momentum"])}
        temp = self.apply(params, method=m.temp)
        image_feat, image_tokens = self.apply(params, batch["image"], method=m.encode_image)
        text_feat, text_x, keep = self.apply(params, batch["text"], method=m.encode_text)
        m_images = batch["image"] if momentum_images is None else momentum_images
        image_feat_m, image_tokens_m = self.apply(momentum, m_images, method=m.encode_image)
        text_feat_m, text_x_m, _ = self.apply(momentum, batch["text"], method=m.encode_text)
        queues = jax.lax.stop_gradient((extra["image_queue"], extra["text_queue"]))

        # ITC: each direction against the momentum batch (of its group) and the queue, distilled targets.
        i2t, acc_i2t = fusion.queue_contrastive_loss(image_feat, text_feat_m, queues[1], temp, image_feat_m, alpha,
                                                     self.groups)
        t2i, acc_t2i = fusion.queue_contrastive_loss(text_feat, image_feat_m, queues[0], temp, text_feat_m, alpha,
                                                     self.groups)
        loss_itc = 0.5 * (i2t + t2i)

        # ITM: positives, then a hard negative text per image and a hard negative image per text.
        key_t, key_i = jax.random.split(jax.random.fold_in(rng, 0x17))
        neg_text = fusion.sample_hard_negatives(image_feat @ text_feat_m.T / temp, key_t, self.groups)
        neg_image = fusion.sample_hard_negatives(text_feat @ image_feat_m.T / temp, key_i, self.groups)
        fused = self.apply(params, jnp.concatenate([text_x, text_x[neg_text], text_x]),
                           jnp.concatenate([keep, keep[neg_text], keep]),
                           jnp.concatenate([image_tokens, image_tokens, image_tokens[neg_image]]), method=m.fuse)
        batch_size = image_feat.shape[0]
        itm_labels = jnp.concatenate([jnp.ones((batch_size,), jnp.int32), jnp.zeros((2 * batch_size,), jnp.int32)])
        loss_itm, itm_metrics = fusion.itm_loss(self.apply(params, fused, method=m.itm_logits), itm_labels)

        # MLM: the masked caption fused with the image; the momentum model sees the same ids and its own image.
        _, mlm_x, mlm_keep = self.apply(params, batch[MLM_TEXT_KEY], method=m.encode_text)
        logits = self.apply(params, self.apply(params, mlm_x, mlm_keep, image_tokens, method=m.fuse),
                            method=m.mlm_logits)
        _, mlm_x_m, _ = self.apply(momentum, batch[MLM_TEXT_KEY], method=m.encode_text)
        logits_m = self.apply(momentum, self.apply(momentum, mlm_x_m, mlm_keep, image_tokens_m, method=m.fuse),
                              method=m.mlm_logits)
        loss_mlm, mlm_metrics = fusion.mlm_loss(logits, batch[MLM_LABELS_KEY], logits_m, alpha)

        loss = block.itc_weight * loss_itc + block.itm_weight * loss_itm + block.mlm_weight * loss_mlm
        metrics = {"loss_itc": loss_itc, "loss_itm": loss_itm, "loss_mlm": loss_mlm, "accuracy_i2t": acc_i2t,
                   "accuracy_t2i": acc_t2i, "temp": temp, "alpha": alpha, **itm_metrics, **mlm_metrics}
        tensors = {"image_feat": image_feat, "text_feat": text_feat, "image_feat_m": image_feat_m,
                   "text_feat_m": text_feat_m, "image_tokens_m": image_tokens_m, "text_x_m": text_x_m,
                   "keep": keep, "temp": temp}
        return loss, metrics, tensors

    def loss_fn_with_extra(self, params: Any, extra: Any, batch: dict[str, jax.Array], rng: jax.Array,
                           step: jax.Array) -> tuple[jax.Array, tuple[Metrics, Any]]:
        loss, metrics, t = self.forward(params, extra, batch, rng, step)
        return loss, (metrics, {"image_feat_m": t["image_feat_m"], "text_feat_m": t["text_feat_m"]})

    def update_extra(self, extra: Any, params: Any, aux: Any, step: jax.Array) -> Any:
        """EMA of the momentum model towards the updated params, then the (global) momentum features enqueued."""
        student = {k: params[k] for k in MOMENTUM_KEYS}
        image_queue, ptr = fusion.enqueue(extra["image_queue"], extra["queue_ptr"], aux["image_feat_m"])
        text_queue, _ = fusion.enqueue(extra["text_queue"], extra["queue_ptr"], aux["text_feat_m"])
        return {"momentum": distill.ema_update(extra["momentum"], student, self.block.momentum),
                "image_queue": image_queue, "text_queue": text_queue, "queue_ptr": ptr}

    # ------------------------------------------------------------------ evaluation

    def encode_image(self, params: Any, images: jax.Array) -> jax.Array:
        """images [B, H, W, 3] -> L2-normalised [B, E] (projected ViT CLS)."""
        return self.apply(params, images, method=FusionModel.encode_image)[0]

    def encode_text(self, params: Any, tokens: jax.Array) -> jax.Array:
        """tokens [B, L] -> L2-normalised [B, E] (projected text CLS, before fusion)."""
        return self.apply(params, tokens, method=FusionModel.encode_text)[0]

    def itm_scores(self, params: Any, images: jax.Array, tokens: jax.Array) -> jax.Array:
        """Pairs (images [P, H, W, 3], tokens [P, L]) -> ITM match score [P] (logit of matched minus unmatched)."""
        _, image_tokens = self.apply(params, images, method=FusionModel.encode_image)
        _, text_x, keep = self.apply(params, tokens, method=FusionModel.encode_text)
        logits = self.apply(params, self.apply(params, text_x, keep, image_tokens, method=FusionModel.fuse),
                            method=FusionModel.itm_logits)
        return logits[:, 1] - logits[:, 0]

    def train_flops_per_example(self) -> float:
        image, text = self.model.image, self.model.text
        length = self.config.data.max_text_len + 1
        vit = flops.vit_forward_flops(self.config.data.image_size, image["patch_size"], image["width"],
                                      image["depth"], image["mlp_dim"], 1, "cls")
        txt = flops.text_forward_flops(length, text["width"], text["depth"], text["mlp_dim"], False)
        tokens = (self.config.data.image_size // image["patch_size"]) ** 2 + 1
        width = text["width"]
        # a fusion layer: a text layer plus cross-attention (q/out on the text, k/v on the image tokens)
        fusion_layer = (txt / max(text["depth"], 1) + 4 * length * width ** 2 + 4 * tokens * image["width"] * width
                        + 4 * length * tokens * width)
        fuse = self.model.fusion_depth * fusion_layer
        online = vit + 2 * txt + 4 * fuse  # image, caption, masked caption; fusion on 3 ITM pairs + MLM
        momentum = vit + 2 * txt + fuse
        return 3.0 * online + momentum

    def model_config(self) -> dict[str, Any]:
        out = super().model_config()
        out.update(image_tower=self.model.image, text_tower=self.model.text, fusion_depth=self.model.fusion_depth,
                   image_size=self.config.data.image_size)
        return out
