"""CoCa (Yu et al., 2022): contrastive + captioning. loss = w_con * InfoNCE_sym(image_emb, text_emb, t)
+ w_cap * teacher-forced CE of the caption (padding ignored); defaults w_con 1, w_cap 2 (paper, open_clip).

The text tower is the decoder's unimodal part (`model.text`: width, heads, MLP, and its depth = n_uni); the
`coca` config block (below, merged into the base config) holds the multimodal depth, the poolers and the weights.
The captioning objectives also expose `caption_tokens` (greedy / beam / sampling, KV-cached) for evaluation and
tools/caption.py.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlp import generate
from vlp.data.tokenizer import load_tokenizer
from vlp.losses.captioning import caption_loss
from vlp.losses.contrastive import sharded_contrastive_loss
from vlp.models import flops
from vlp.models.coca import Captioner
from vlp.models.decoder import CLS_MASKS, LAYOUTS, init_cache
from vlp.objectives import register
from vlp.objectives.base import Metrics, Objective, image_text_batch, resolve_compute_dtype
from vlp.objectives.two_tower import image_tower_kwargs
from vlp.parallel.mesh import BATCH_AXES


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"invalid config: {message}")


def _check_common(block: ml_collections.ConfigDict, name: str) -> None:
    for key in ("gen_queries",):
        _check(isinstance(block[key], int) and block[key] >= 0, f"{name}.{key}={block[key]!r} must be an integer >= 0")
    _check(isinstance(block.pooler_heads, int) and block.pooler_heads > 0,
           f"{name}.pooler_heads={block.pooler_heads!r} must be a positive integer")


class CaptioningObjective(Objective):
    """What CoCa and CapPa share: a `Captioner` built from the config, the caption loss and the decoders."""

    contrastive: bool = True
    block_name: str = "coca"

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.tokenizer = load_tokenizer(config.data.tokenizer or None)
        self.model = Captioner(**self.model_kwargs(config))

    def model_kwargs(self, config: ml_collections.ConfigDict) -> dict[str, Any]:
        m, block = config.model, config[self.block_name]
        image = image_tower_kwargs(m)
        text = m.text
        vocab_size = text.get("vocab_size") or self.tokenizer.vocab_size
        n_uni, n_multi = (text.depth, block.multimodal_depth) if self.contrastive else (0, text.depth)
        _check(image["width"] % block.pooler_heads == 0 or not (self.contrastive or block.gen_queries),
               f"{self.block_name}.pooler_heads={block.pooler_heads} does not divide the image width "
               f"{image['width']}")
        decoder = dict(vocab_size=vocab_size, max_len=config.data.max_text_len, width=text.width,
                       num_heads=text.num_heads, mlp_dim=text.mlp_dim, n_uni=n_uni, n_multi=n_multi,
                       pad_id=self.tokenizer.pad_id, embed_cls=self.contrastive,
                       mask_token=not self.contrastive and block.masked_pred_prob > 0,
                       tied_embedding=block.tied_embedding, activation=m.activation, ln_eps=m.ln_eps,
                       remat_policy=m.remat_policy)
        layout = block.get("layout", "vlp")
        if layout == "open_clip":
            bos = block.bos_id
            _check(isinstance(bos, int) and 0 <= bos < vocab_size and bos not in (self.tokenizer.pad_id,
                                                                                  self.tokenizer.eos_id),
                   f"coca.bos_id={bos!r}: the open_clip layout reads a start-of-text token at position 0; give an id "
                   f"in [0, {vocab_size}) other than pad {self.tokenizer.pad_id} and eos {self.tokenizer.eos_id} "
                   f"(e.g. {self.tokenizer.vocab_size} with model.text.vocab_size={self.tokenizer.vocab_size + 1}, "
                   "a row the tokenizer never emits)")
            _check(text.width == m.embed_dim and block.gen_queries >= 2 and not block.tied_embedding,
                   f"coca.layout='open_clip' needs model.text.width == model.embed_dim (got {text.width}, "
                   f"{m.embed_dim}), coca.gen_queries >= 2 (got {block.gen_queries}) and "
                   f"coca.tied_embedding=False (got {block.tied_embedding})")
            decoder.update(bos_id=bos, cls_mask=block.cls_mask)
        return dict(image=image, decoder=decoder, contrastive=self.contrastive, embed_dim=m.embed_dim,
                    gen_queries=block.gen_queries, pooler_heads=block.pooler_heads, layout=layout,
                    logit_scale_init=m.logit_scale_init, logit_scale_max=m.logit_scale_max,
                    dtype=resolve_compute_dtype(config.precision.compute_dtype))

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        return image_text_batch(self.config, batch_size)

    def init(self, rng: jax.Array) -> Any:
        b = self.example_batch(1)
        return self.model.init(rng, jnp.asarray(b["image"]), jnp.asarray(b["text"]))["params"]

    def apply(self, params: Any, *args: Any, method: Any = None) -> Any:
        return self.model.apply({"params": params}, *args, method=method)

    # --- decoding -----------------------------------------------------------------------------------------------
    def caption_tokens(self, params: Any, images: jax.Array, method: str = "greedy", max_len: int | None = None,
                       beams: int = 4, length_penalty: float = 0.6, temperature: float = 1.0, top_k: int = 0,
                       top_p: float = 1.0, rng: jax.Array | None = None, cached: bool = True) -> jax.Array:
        """images [B, H, W, 3] -> token ids [B, max_len] (default data.max_text_len); jit it with the options static.

        `cached=False` re-runs the whole decoder on the token buffer at every step (the reference the KV cache is
        tested against, and the baseline of its speed-up)."""
        if method not in generate.DECODE_METHODS:
            raise ValueError(f"unknown decode method {method!r}; valid: {generate.DECODE_METHODS}")
        max_len = max_len or self.config.data.max_text_len
        if max_len > self.config.data.max_text_len:
            raise ValueError(f"max_len={max_len} exceeds the decoder's positions (data.max_text_len="
                             f"{self.config.data.max_text_len})")
        batch = images.shape[0]
        rows = beams if method == "beam" else 1
        if cached:
            cross_kv = self.apply(params, images, method=Captioner.cross_kv)
            dec = self.model.decoder
            state = init_cache(batch, max_len, dec["n_uni"] + dec["n_multi"], dec["width"], dec["num_heads"],
                               self.model.dtype)
            if rows > 1:
                cross_kv, state = generate.repeat_rows(cross_kv, rows), generate.repeat_rows(state, rows)

            def step_fn(cache, prev, index):
                return self.apply(params, prev, index, cache, cross_kv, method=Captioner.decode_step)
        else:
            context = self.apply(params, images, method=Captioner.image_context_of)
            state = jnp.zeros((batch, max_len), jnp.int32)
            if rows > 1:
                context, state = generate.repeat_rows(context, rows), generate.repeat_rows(state, rows)

            def step_fn(buffer, prev, index):
                written = jax.lax.dynamic_update_slice(buffer, prev[:, None], (0, jnp.maximum(index - 1, 0)))
                buffer = jnp.where(index > 0, written, buffer)
                logits = self.apply(params, context, buffer, method=Captioner.decoder_logits)
                return jax.lax.dynamic_index_in_dim(logits, index, axis=1, keepdims=False), buffer

        eos, pad = self.tokenizer.eos_id, self.tokenizer.pad_id
        if method == "greedy":
            return generate.greedy(step_fn, state, batch, max_len, eos, pad)
        if method == "sample":
            rng = jax.random.key(0) if rng is None else rng
            return generate.sample(step_fn, state, batch, max_len, eos, rng, temperature, top_k, top_p, pad)
        return generate.beam_search(step_fn, state, batch, max_len, eos, beams, length_penalty, pad)[0]

    def caption_fn(self, **options: Any):
        """A jitted (params, images) -> token ids [B, max_len] with fixed decoding options."""
        return jax.jit(functools.partial(self.caption_tokens, **options))

    def model_config(self) -> dict[str, Any]:
        out = super().model_config()
        out[self.block_name] = self.config[self.block_name].to_dict()
        out["tokenizer"] = {"vocab_size": self.tokenizer.vocab_size, "eos_id": self.tokenizer.eos_id,
                            "pad_id": self.tokenizer.pad_id, "max_len": self.config.data.max_text_len}
        return out

    def _decoder_flops(self) -> float:
        dec, length = self.model.decoder, self.config.data.max_text_len
        width, mlp = dec["width"], dec["mlp_dim"]
        forward = flops.text_forward_flops(length + int(dec["embed_cls"]), width, dec["n_uni"], mlp, True)
        forward += flops.text_forward_flops(length, width, dec["n_multi"], mlp, True)
        image = self.model.image
        grid = (self.config.data.image_size // image["patch_size"]) ** 2
        context = self.model.gen_queries or grid + image["num_cls_tokens"]
        # cross-attention per multimodal layer: q and out on L, k and v on the context, scores and values
        forward += dec["n_multi"] * (4 * length * width * width + 4 * context * image["width"] * width
                                     + 4 * length * context * width)
        if self.model.layout == "open_clip":  # each multimodal layer has a second MLP, after its cross-attention
            forward += dec["n_multi"] * 4 * length * width * mlp
        forward += 2 * length * width * dec["vocab_size"]
        return forward

    def _vit_flops(self) -> float:
        image = self.model.image
        return flops.vit_forward_flops(self.config.data.image_size, image["patch_size"], image["width"],
                                       image["depth"], image["mlp_dim"], image["num_cls_tokens"], image["pool"])


@register("coca")
class CocaObjective(CaptioningObjective):
    contrastive = True
    block_name = "coca"

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        return dict(
            multimodal_depth=2,  # n_multi layers (causal self-attn + cross-attn); n_uni = model.text.depth
            gen_queries=256,  # queries of the generative attentional pooler (paper: 256); 0 = all ViT tokens
            pooler_heads=8,  # heads of both attentional poolers (must divide the image width)
            tied_embedding=False,  # vocab head tied to the token embedding (lucidrains) or its own (open_clip)
            contrastive_weight=1.0,  # paper / open_clip defaults (methods.md section 9)
            caption_weight=2.0,
            # "open_clip": open_clip's CoCa architecture (one pooler whose query 0 is the contrastive one, separate
            # self- and cross-attention blocks, a start token `bos_id`), exportable with tools/export.py
            # --format=open_clip; "vlp": the paper's two poolers and a learned begin embedding.
            layout="vlp",
            bos_id=ml_collections.config_dict.placeholder(int),
            # open_clip layout: "legacy" (what open_clip's create_model builds, and its pretrained CoCa weights) or
            # "correct" (open_clip's fixed CLS mask, which its factory does not expose: not exportable)
            cls_mask="legacy",
        )

    @classmethod
    def validate_config(cls, config: ml_collections.ConfigDict) -> None:
        block = config.coca
        _check_common(block, "coca")
        _check(isinstance(block.multimodal_depth, int) and block.multimodal_depth >= 0,
               f"coca.multimodal_depth={block.multimodal_depth!r} must be an integer >= 0")
        _check(block.layout in LAYOUTS, f"coca.layout={block.layout!r}; valid: {LAYOUTS}")
        _check(block.cls_mask in CLS_MASKS, f"coca.cls_mask={block.cls_mask!r}; valid: {CLS_MASKS}")
        for key in ("contrastive_weight", "caption_weight"):
            _check(block[key] >= 0, f"coca.{key}={block[key]} must be >= 0")

    def loss_fn(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, Metrics]:
        del rng  # deterministic forward
        block = self.config.coca
        out = self.apply(params, batch["image"], batch["text"])
        loss_con, metrics = sharded_contrastive_loss(
            "softmax", out["image_emb"], out["text_emb"], out["logit_scale"], None,
            label_smoothing=self.config.loss.label_smoothing, batch_axes=BATCH_AXES, variant=self.config.loss.variant)
        loss_cap, cap_metrics = caption_loss(out["logits"], batch["text"], self.tokenizer.pad_id)
        loss = block.contrastive_weight * loss_con + block.caption_weight * loss_cap
        metrics = {**{k: v for k, v in metrics.items() if k != "loss"}, "loss_contrastive": loss_con, **cap_metrics,
                   "logit_scale": out["logit_scale"]}
        return loss, metrics

    def encode_image(self, params: Any, images: jax.Array) -> jax.Array:
        """images [B, H, W, 3] -> L2-normalised [B, D] (the contrastive pooler's output)."""
        return self.apply(params, images, method=Captioner.encode_image)

    def encode_text(self, params: Any, tokens: jax.Array) -> jax.Array:
        """tokens [B, L] -> L2-normalised [B, D] (the CLS output of the unimodal layers)."""
        return self.apply(params, tokens, method=Captioner.encode_text)

    def train_flops_per_example(self) -> float:
        image_width = self.model.image["width"]
        forward = self._vit_flops() + self._decoder_flops()
        tokens = (self.config.data.image_size // self.model.image["patch_size"]) ** 2 + 1
        # poolers: q/out on the queries, k/v on the tokens (the open_clip layout has one, its query 0 contrastive)
        for queries in (self.model.gen_queries,) if self.model.layout == "open_clip" else (1, self.model.gen_queries):
            forward += 4 * queries * image_width ** 2 + 4 * tokens * image_width ** 2 + 4 * queries * tokens * image_width
        forward += 2 * self.model.embed_dim * (image_width + self.model.decoder["width"])
        forward += flops.contrastive_logits_forward_flops(self.config.batch_size, self.model.embed_dim)
        return 3.0 * forward
