"""CLIP-to-CLIP distillation from a frozen teacher (`config.reference`, any two-tower vlp model or export):
loss = InfoNCE_sym(student) + weight * term, the term chosen by `clip_distill.kind`:

- "kl": open_clip's `--distill` (DistillClipLoss): KL between the teacher's and the student's similarity
  distributions (each with its own logit scale), image->text and text->image rows over the global batch, averaged.
  open_clip writes the cross-entropy -sum P_t log P_s; vlp subtracts the teacher's entropy (a constant: the same
  gradient), so a teacher equal to the student gives exactly the plain contrastive loss. open_clip's weight is 1.
- "cosine": DCLIP's hybrid loss (Csizmadia et al., 2025): contrastive + mean(1 - cos) between the student's and
  the teacher's image embeddings and between their text embeddings (averaged). It compares embeddings directly,
  so it needs the student's embed_dim to equal the teacher's.

The teacher may be bigger than the student (its own config: the workdir's config.json or the export's model
config); it must read the same images (data.image_size) and tokens (tokenizer, data.max_text_len).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from vlp.losses.reference import embedding_cosine_loss, sharded_similarity_distill_loss
from vlp.objectives import register
from vlp.objectives.base import Metrics
from vlp.objectives.two_tower import TwoTowerObjective
from vlp.parallel.mesh import BATCH_AXES
from vlp.train import frozen

KINDS = ("kl", "cosine")


class ReferenceTwoTowerObjective(TwoTowerObjective):
    """A two-tower student trained beside a frozen two-tower reference model (`config.reference`), which it reads as
    extra[frozen.REFERENCE_KEY]. Subclasses define `reference_term`."""

    has_extra = True
    # FLIP patch dropout (model.image.patch_dropout) drops the student's patches only: `reference_embed` passes the
    # reference the whole images (a frozen model gains nothing from it, and its targets stay those of the full image).
    supports_patch_dropout = True

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.reference = frozen.Reference(config)
        ref_objective, ref_config = self.reference.objective, self.reference.config
        if not isinstance(ref_objective, TwoTowerObjective):
            raise ValueError(f"invalid config: objective {config.objective!r} needs a two-tower reference model "
                             f"(clip, siglip, align); reference.path={config.reference.path!r} holds objective "
                             f"{ref_config.objective!r}")
        mine = (config.data.image_size, config.data.max_text_len, self.tokenizer.vocab_size)
        theirs = (ref_config.data.image_size, ref_config.data.max_text_len, ref_objective.tokenizer.vocab_size)
        if mine != theirs:
            raise ValueError(f"invalid config: the reference model reads (data.image_size, data.max_text_len, "
                             f"tokenizer vocab) = {theirs}, this run {mine}; the reference must read the student's "
                             f"images and tokens: set these to the reference's")

    def init_extra(self, params: Any) -> Any:
        return self.reference.init_extra()

    def reference_embed(self, extra: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """The frozen reference's image_emb, text_emb [B, D_ref] and logit_scale on the student's batch (whole
        images: never the student's `patch_keep`)."""
        params = jax.lax.stop_gradient(extra[frozen.REFERENCE_KEY])
        out = self.reference.objective.embed(params, {"image": batch["image"], "text": batch["text"]})
        return jax.lax.stop_gradient(out)

    def reference_term(self, student: dict[str, jax.Array], ref: dict[str, jax.Array]) -> tuple[jax.Array, Metrics]:
        raise NotImplementedError

    def loss_fn(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, Metrics]:
        raise NotImplementedError(f"objective {self.config.objective!r} reads its reference model from the extra "
                                  f"state: the trainer calls loss_fn_with_extra")

    def loss_fn_with_extra(self, params: Any, extra: Any, batch: dict[str, jax.Array], rng: jax.Array,
                           step: jax.Array) -> tuple[jax.Array, tuple[Metrics, Any]]:
        del rng, step
        student = self.embed(params, batch)
        contrastive, metrics = self.loss_from_embeddings(student)
        term, term_metrics = self.reference_term(student, self.reference_embed(extra, batch))
        metrics = dict(metrics, **term_metrics, loss_contrastive=contrastive)
        return contrastive + term, (metrics, None)

    def update_extra(self, extra: Any, params: Any, aux: Any, step: jax.Array) -> Any:
        return extra  # frozen

    def train_flops_per_example(self) -> float:
        # The reference runs forward only (a third of its train FLOPs, logits row included).
        return super().train_flops_per_example() + self.reference.objective.train_flops_per_example() / 3.0


@register("clip_distill")
class ClipDistillObjective(ReferenceTwoTowerObjective):
    """loss = InfoNCE_sym(student) + weight * (KL of similarity rows | DCLIP cosine), teacher = config.reference."""

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        # kind: kl (open_clip --distill) | cosine (DCLIP). weight multiplies the distillation term (open_clip: 1).
        return {"kind": "kl", "weight": 1.0}

    @classmethod
    def validate_config(cls, config: ml_collections.ConfigDict) -> None:
        block = config.clip_distill
        if block.kind not in KINDS:
            raise ValueError(f"invalid config: clip_distill.kind={block.kind!r}; valid: {KINDS}")
        if not block.weight >= 0:
            raise ValueError(f"invalid config: clip_distill.weight={block.weight!r} must be >= 0")

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.kind, self.weight = config.clip_distill.kind, float(config.clip_distill.weight)
        ref_dim = self.reference.objective.model.embed_dim
        if self.kind == "cosine" and ref_dim != self.model.embed_dim:
            raise ValueError(f"invalid config: clip_distill.kind='cosine' compares embeddings, but the student's "
                             f"model.embed_dim={self.model.embed_dim} differs from the teacher's {ref_dim}; set "
                             f"model.embed_dim={ref_dim} or use clip_distill.kind='kl'")

    def reference_term(self, student: dict[str, jax.Array], ref: dict[str, jax.Array]) -> tuple[jax.Array, Metrics]:
        if self.kind == "kl":
            term, _ = sharded_similarity_distill_loss("kl", student["image_emb"], student["text_emb"],
                                                      student["logit_scale"], ref["image_emb"], ref["text_emb"],
                                                      ref["logit_scale"], batch_axes=BATCH_AXES)
        else:
            term = 0.5 * (embedding_cosine_loss(student["image_emb"], ref["image_emb"])
                          + embedding_cosine_loss(student["text_emb"], ref["text_emb"]))
        return self.weight * term, {"loss_distill": term}
