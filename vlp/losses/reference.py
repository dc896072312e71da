"""Losses against a frozen reference model's embeddings: similarity distillation (open_clip's `--distill`), Mod-X's
selective similarity alignment, and DCLIP's cosine-to-teacher-embedding term.

Embeddings are [B, D] and L2-normalised; row i of the image and text embeddings is a positive pair. The student's
similarity rows are `logit_scale * image_emb @ text_emb.T` (image->text, [B, B]) and its transpose (text->image);
the reference's the same with its own embeddings and scale. The reference takes no gradient (callers pass it through
`jax.lax.stop_gradient`). The single-device functions are the references that the sharded form is tested against.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

Metrics = dict[str, jax.Array]
KINDS = ("kl", "modx")


def _row_kl(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
    """KL(softmax(teacher) || softmax(student)) of each row: [b, C] x 2 -> [b] (fp32)."""
    log_p_teacher = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
    log_p_student = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    return (jnp.exp(log_p_teacher) * (log_p_teacher - log_p_student)).sum(-1)


def _row_terms(kind: str, s_logits: jax.Array, t_logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(per-row KL, per-row weight): `modx` keeps only the rows whose reference argmax is the positive (Mod-X replaces
    the other rows' targets by the student's own rows, which makes their KL and its gradient exactly 0)."""
    kl = _row_kl(s_logits, t_logits)
    if kind == "kl":
        return kl, jnp.ones_like(kl)
    correct = (jnp.argmax(t_logits, axis=-1) == labels).astype(jnp.float32)
    return jnp.where(correct > 0, kl, 0.0), correct


def similarity_distill_loss(kind: str, image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array,
                            ref_image_emb: jax.Array, ref_text_emb: jax.Array, ref_logit_scale: jax.Array
                            ) -> tuple[jax.Array, Metrics]:
    """Single-device similarity distillation over the whole batch.

    kind "kl" (open_clip DistillClipLoss, as a KL): mean over rows of KL(P_ref || P_student), averaged over the i2t
      and t2i directions. open_clip writes it as the cross-entropy -sum P_ref log P_student, which differs by the
      reference's entropy (a constant): same gradient, and a teacher equal to the student adds exactly 0.
    kind "modx" (Mod-X, methods.md section 17): sum over the reference-correct rows and all columns (reduction='sum')
      of KL(P_ref || P_student), halved over the two directions. Pass logit scales of 1 for Mod-X's tau = 1.
    Args: student and reference embeddings [B, D] (D may differ between them), scalar scales.
    Returns: (loss, {"distill_rows_kept": share of rows that contribute}).
    """
    labels = jnp.arange(image_emb.shape[0])
    s_i2t = logit_scale * jnp.dot(image_emb, text_emb.T)
    t_i2t = ref_logit_scale * jnp.dot(ref_image_emb, ref_text_emb.T)
    kl_i2t, kept_i2t = _row_terms(kind, s_i2t, t_i2t, labels)
    kl_t2i, kept_t2i = _row_terms(kind, s_i2t.T, t_i2t.T, labels)
    batch = image_emb.shape[0]
    total = kl_i2t.sum() + kl_t2i.sum()
    loss = 0.5 * total / batch if kind == "kl" else 0.5 * total
    return loss, {"distill_rows_kept": 0.5 * (kept_i2t.sum() + kept_t2i.sum()) / batch}


def _gathered_body(kind: str, axes: tuple[str, ...]):
    def body(img, txt, scale, ref_img, ref_txt, ref_scale):
        local = img.shape[0]
        all_img, all_txt = (jax.lax.all_gather(x, axes, tiled=True) for x in (img, txt))
        all_ref_img, all_ref_txt = (jax.lax.all_gather(x, axes, tiled=True) for x in (ref_img, ref_txt))
        batch = all_img.shape[0]
        labels = jax.lax.axis_index(axes) * local + jnp.arange(local)
        # Local image rows and local text rows, each against all columns: [b, B].
        kl_i2t, kept_i2t = _row_terms(kind, scale * jnp.dot(img, all_txt.T),
                                      ref_scale * jnp.dot(ref_img, all_ref_txt.T), labels)
        kl_t2i, kept_t2i = _row_terms(kind, scale * jnp.dot(txt, all_img.T),
                                      ref_scale * jnp.dot(ref_txt, all_ref_img.T), labels)
        total = jax.lax.psum(kl_i2t.sum() + kl_t2i.sum(), axes)
        loss = 0.5 * total / batch if kind == "kl" else 0.5 * total
        kept = jax.lax.psum(kept_i2t.sum() + kept_t2i.sum(), axes) * 0.5 / batch
        return loss, {"distill_rows_kept": kept}

    return body


def sharded_similarity_distill_loss(kind: str, image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array,
                                    ref_image_emb: jax.Array, ref_text_emb: jax.Array, ref_logit_scale: jax.Array, *,
                                    mesh: Mesh | None = None, batch_axes: Sequence[str] = ("data", "fsdp")
                                    ) -> tuple[jax.Array, Metrics]:
    """`similarity_distill_loss` on global arrays sharded on `batch_axes`: each device holds its b local rows of both
    directions against all-gathered columns (b x B logits per direction and model, as the contrastive `gather`
    variant); the student's gradient flows back through the all-gather. Same arguments and result."""
    if kind not in KINDS:
        raise ValueError(f"unknown similarity distillation kind {kind!r}; valid: {KINDS}")
    axes = tuple(batch_axes)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731 - logits and losses in fp32 whatever the towers' dtype
    rows, scalar = P(axes), P()
    return jax.shard_map(_gathered_body(kind, axes), mesh=mesh,
                         in_specs=(rows, rows, scalar, rows, rows, scalar), out_specs=(scalar, scalar))(
        f32(image_emb), f32(text_emb), f32(logit_scale), f32(ref_image_emb), f32(ref_text_emb), f32(ref_logit_scale))


def embedding_cosine_loss(student_emb: jax.Array, ref_emb: jax.Array) -> jax.Array:
    """DCLIP's feature term: mean over rows of 1 - cos(student_emb, ref_emb); [B, D] x 2 (same D) -> scalar."""
    s = student_emb.astype(jnp.float32)
    r = ref_emb.astype(jnp.float32)
    cos = (s * r).sum(-1) / (jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(r, axis=-1) + 1e-12)
    return (1.0 - cos).mean()
