"""Prompt learning, CoOp style (Zhou et al., 2022, "Learning to Prompt for Vision-Language Models";
KaiyangZhou/CoOp): M learnable context vectors in the token-embedding space of a frozen CLIP's text tower, placed in
front of each class name ("[V]_1 ... [V]_M <class name> <eos>"), trained with cross-entropy over the classes on a
few labelled shots per class; the image tower, the text tower and the logit scale stay frozen.

The context is shared by all classes (CoOp's unified context; its class-specific variant needs the class identity
inside the text encoder, which the zero-shot evaluator does not pass). It is parameterised as
`embed(context_init) + context_delta`: `context_delta` (the only trained param, [M, width]) starts at 0 when
`prompt.context_init` names a hand-written prefix ("a photo of a": its M token embeddings from the frozen table, so
training starts exactly at that hand-written prompt), else at N(0, 0.02^2) as CoOp's random init.

The frozen CLIP is the run's reference model (`reference.format/path`: a vlp two-tower workdir, or a safetensors, hf
or open_clip export; `vlp.train.frozen.Reference`, as distillation's teacher): loaded onto the mesh sharded like a
student at every start, never checkpointed (the checkpoints keep its fingerprint: a resume refuses a changed one);
its config is recorded as `reference.config`. The learned context means nothing without that CLIP, so
`tools/eval.py` (`vlp.train.restore.restore_run`) loads it too (`eval_reads_reference`), checking the fingerprint.
Evaluation: the objective's `encode_text` puts the learned context in front of every
text, so the `zeroshot` evaluator with `templates="name"` (the bare class name) is zero-shot with the learned prompt.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlp.data import sources
from vlp.models import flops
from vlp.models.two_tower import TwoTower
from vlp.objectives import register
from vlp.objectives.base import Metrics, Objective, image_text_batch
from vlp.train import frozen

PLACEHOLDER_ID = 1  # token id at the context positions (never eos or pad, so pooling and masks treat them as words)


def prompt_logits(image_emb: jax.Array, class_emb: jax.Array, logit_scale: jax.Array) -> jax.Array:
    """image_emb [B, D], class_emb [C, D] (both L2-normalised) -> logit_scale * cosine [B, C] in fp32."""
    return logit_scale.astype(jnp.float32) * jnp.dot(image_emb.astype(jnp.float32), class_emb.astype(jnp.float32).T)


def class_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean over rows of -log softmax(logits)[label]: logits [B, C], labels [B] int."""
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0].mean()


@register("prompt")
class PromptObjective(Objective):
    """CE over classes of logit_scale * cos(image, text([context; class name])) with a frozen CLIP."""

    has_extra = True
    eval_reads_reference = True  # the frozen CLIP encodes the evaluated images and prompts

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        return dict(
            num_context=4,  # M context vectors (CoOp: 16; 4 fits the shapes CLIP's 12 tokens)
            context_init="",  # a hand-written prefix whose M token embeddings start the context; "" = random
        )

    @classmethod
    def validate_config(cls, config: ml_collections.ConfigDict) -> None:
        block = config.prompt
        if not isinstance(block.num_context, int) or block.num_context < 1:
            raise ValueError(f"invalid config: prompt.num_context={block.num_context!r} must be an integer >= 1")

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        block = config.prompt
        self.reference = frozen.Reference(config)
        self.clip, clip_cfg = self.reference.objective, self.reference.config
        if not isinstance(getattr(self.clip, "model", None), TwoTower):
            raise ValueError(f"invalid config: reference.path={config.reference.path!r} holds a "
                             f"{clip_cfg.objective!r} run; prompt learning needs a two-tower model (clip, siglip, "
                             f"align)")
        self.tokenizer = self.clip.tokenizer
        self.num_context = block.num_context
        clip_len, text_len = clip_cfg.data.max_text_len, config.data.max_text_len
        if text_len + self.num_context != clip_len:
            raise ValueError(f"invalid config: data.max_text_len={text_len} + prompt.num_context={self.num_context} "
                             f"must equal the frozen CLIP's max_text_len {clip_len} (the context takes the first "
                             f"{self.num_context} positions); set data.max_text_len={clip_len - self.num_context}")
        if config.data.image_size != clip_cfg.data.image_size:
            raise ValueError(f"invalid config: data.image_size={config.data.image_size} differs from the frozen "
                             f"CLIP's {clip_cfg.data.image_size}")
        self.context_ids = None
        if block.context_init:
            ids = self.tokenizer.encode([block.context_init], clip_len)[0]
            ids = ids[:int(np.argmax(ids == self.tokenizer.eos_id))]
            if len(ids) != self.num_context:
                raise ValueError(f"invalid config: prompt.context_init={block.context_init!r} is {len(ids)} tokens "
                                 f"but prompt.num_context={self.num_context}; set num_context={len(ids)}")
            self.context_ids = jnp.asarray(ids, jnp.int32)
        self.width = self.clip.model.text["width"]
        self.class_names = list(sources.class_names(config.data.source))
        self.class_tokens = self.tokenizer.encode(self.class_names, text_len)  # [C, L - M]

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        return image_text_batch(self.config, batch_size)

    def init(self, rng: jax.Array) -> Any:
        shape = (self.num_context, self.width)
        delta = (jnp.zeros(shape, jnp.float32) if self.context_ids is not None
                 else 0.02 * jax.random.normal(rng, shape, jnp.float32))
        return {"context_delta": nn.LogicallyPartitioned(delta, names=(None, "embed"))}

    def init_extra(self, params: Any) -> Any:
        """Stand-ins of the CLIP (boxed: sharded like a student) and its fingerprint; the trainer (and tools/eval.py)
        load the CLIP from reference.path over them (`frozen.attach_reference`)."""
        return self.reference.init_extra()

    def initial_extra(self, params: Any, shardings: Any) -> Any:
        return self.reference.initial_extra(shardings)  # the CLIP itself is loaded next, over no random init

    def eval_params(self, params: Any, extra: Any) -> Any:
        return {"clip": extra[frozen.REFERENCE_KEY], **params}

    def context(self, params: Any) -> jax.Array:
        """The M context vectors [M, width]: the hand-written prefix's token embeddings (if any) + the trained delta."""
        delta = params["context_delta"]
        if self.context_ids is None:
            return delta
        table = jax.lax.stop_gradient(params["clip"]["text"]["token_embed"]["embedding"])
        return jnp.take(table, self.context_ids, axis=0) + delta

    def encode_text(self, params: Any, tokens: jax.Array) -> jax.Array:
        """tokens [B, L - M] (e.g. class names) -> L2-normalised [B, D] of "[V]_1 .. [V]_M <tokens>"; `params` as
        `eval_params` gives them (the frozen CLIP under "clip")."""
        clip = params["clip"]
        table = clip["text"]["token_embed"]["embedding"]
        batch = tokens.shape[0]
        ctx = jnp.broadcast_to(self.context(params)[None], (batch, self.num_context, self.width))
        embeds = jnp.concatenate([ctx, jnp.take(table, tokens, axis=0)], axis=1)
        full = jnp.concatenate([jnp.full((batch, self.num_context), PLACEHOLDER_ID, tokens.dtype), tokens], axis=1)
        return self.clip.model.apply({"params": clip}, full, embeds, method=TwoTower.encode_text)

    def encode_image(self, params: Any, images: jax.Array) -> jax.Array:
        return self.clip.encode_image(params["clip"], images)

    def loss_fn(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, Metrics]:
        raise NotImplementedError("prompt learning reads the frozen CLIP (the reference model) in TrainState.extra: "
                                  "the trainer calls loss_fn_with_extra")

    def loss_fn_with_extra(self, params: Any, extra: Any, batch: dict[str, jax.Array], rng: jax.Array,
                           step: jax.Array) -> tuple[jax.Array, tuple[Metrics, Any]]:
        del rng, step
        full = {"clip": jax.lax.stop_gradient(extra[frozen.REFERENCE_KEY]), **params}
        class_emb = self.encode_text(full, jnp.asarray(self.class_tokens))
        image_emb = self.encode_image(full, batch["image"])
        scale = self.clip.model.apply({"params": full["clip"]}, method=TwoTower.logit_scale)
        logits = prompt_logits(image_emb, class_emb, scale)
        loss = class_cross_entropy(logits, batch["label"])
        accuracy = (jnp.argmax(logits, axis=-1) == batch["label"]).mean()
        return loss, ({"loss_class_ce": loss, "train_top1": accuracy}, None)

    def update_extra(self, extra: Any, params: Any, aux: Any, step: jax.Array) -> Any:
        return extra  # the CLIP is frozen

    def train_flops_per_example(self) -> float:
        """The frozen image tower forward, and the text tower over all C class prompts (forward + backward, shared
        by the batch)."""
        image, text = self.clip.model.image, self.clip.model.text
        forward_image = flops.vit_forward_flops(self.config.data.image_size, image["patch_size"], image["width"],
                                                image["depth"], image["mlp_dim"], image["num_cls_tokens"],
                                                image["pool"])
        text_all = 3.0 * len(self.class_names) * flops.text_forward_flops(text["max_len"], text["width"],
                                                                          text["depth"], text["mlp_dim"],
                                                                          text["causal"])
        return forward_image + text_all / self.config.batch_size
