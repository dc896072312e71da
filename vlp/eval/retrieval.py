"""Image <-> text retrieval recall@k on held-out pairs, with one or several captions per image (COCO/Flickr: 5).

A hit is scored by text, not by index: image->text counts a hit when one of the k retrieved captions has the text
of one of the image's own captions; text->image when one of the k retrieved images has a caption with the query's
text. A procedural or templated dataset repeats texts across images, and this keeps such duplicates from counting
as misses; with all texts distinct it is the usual index-based recall.
"""

from __future__ import annotations

import numpy as np

from vlp.data import pipeline, sources
from vlp.eval.common import Encoders, Params, topk_indices

KS = (1, 5, 10)
_ROWS_PER_CHUNK = 1024  # query rows ranked at once: bounds the [rows, N] score block


def _ranked_hits(queries: np.ndarray, keys: np.ndarray, relevant_codes: np.ndarray, code_of, k_max: int) -> np.ndarray:
    """[Q, k_max] bool: whether the r-th best key of each query is relevant (membership in `relevant_codes`)."""
    hits = []
    for start in range(0, len(queries), _ROWS_PER_CHUNK):
        rows = np.arange(start, min(start + _ROWS_PER_CHUNK, len(queries)))
        top = topk_indices(queries[rows] @ keys.T, k_max)  # [q, k_max]
        hits.append(np.isin(code_of(rows[:, None], top), relevant_codes))
    return np.concatenate(hits)


def recall_at_k(image_emb: np.ndarray, text_emb: np.ndarray, captions: list[str],
                text_image: np.ndarray | None = None, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """image_emb [N, D], text_emb [M, D] with caption j belonging to image text_image[j] (default: j, so M = N).

    Returns {i2t_r1, ..., t2i_r10}: i2t over the N images, t2i over the M captions.
    """
    text_image = np.arange(len(captions)) if text_image is None else np.asarray(text_image)
    if len(text_image) != len(captions) or len(text_emb) != len(captions):
        raise ValueError(f"{len(captions)} captions, {len(text_emb)} text embeddings and {len(text_image)} "
                         "caption->image indices: all three must match")
    if len(captions) and (text_image.min() < 0 or text_image.max() >= len(image_emb)):
        raise ValueError(f"caption->image indices must be in [0, {len(image_emb)}), got "
                         f"[{text_image.min()}, {text_image.max()}]")
    _, text_ids = np.unique(np.asarray(captions, dtype=object).astype(str), return_inverse=True)
    num_texts = int(text_ids.max(initial=0)) + 1
    # (image, text id) pairs that count as matches, encoded as one integer each.
    relevant = np.unique(text_image.astype(np.int64) * num_texts + text_ids)
    k_max = max(ks)
    i2t = _ranked_hits(image_emb, text_emb, relevant, lambda i, top: i * num_texts + text_ids[top], k_max)
    t2i = _ranked_hits(text_emb, image_emb, relevant, lambda j, top: top.astype(np.int64) * num_texts + text_ids[j],
                       k_max)
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = float(i2t[:, :k].any(axis=1).mean())
        out[f"t2i_r{k}"] = float(t2i[:, :k].any(axis=1).mean())
    return out


class RetrievalEvaluator:
    """Yields `retrieval_i2t_r{1,5,10}` and `retrieval_t2i_r{1,5,10}` (key prefix = `name`).

    `captions[i]` is the caption, or the list of captions, of image i.
    """

    def __init__(self, encoders: Encoders, images: np.ndarray, captions: list[list[str]] | list[str],
                 name: str = "retrieval"):
        captions = [[c] if isinstance(c, str) else list(c) for c in captions]
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} caption lists; retrieval needs one per image")
        empty = [i for i, c in enumerate(captions) if not c]
        if empty:
            raise ValueError(f"images {empty[:5]} have no caption; retrieval needs at least one per image")
        self.encoders, self.images, self.name = encoders, images, name
        self.captions = [str(c) for caps in captions for c in caps]
        self.text_image = np.repeat(np.arange(len(captions)), [len(c) for c in captions])
        self.tokens = encoders.tokenize(self.captions)

    @classmethod
    def build(cls, encoders: Encoders, *, name: str, data_source: str, split: str, image_size: int,
              num_examples: int, caption: str = "synthetic", **unused) -> "RetrievalEvaluator":
        """The first `num_examples` images of a source's split with their captions of kind `caption`
        (`all`: every caption of a multi-caption set, e.g. COCO's five)."""
        eval_set = pipeline.load_eval_set(sources.make_source(data_source, split, image_size), num_examples)
        if caption not in eval_set.captions:
            raise ValueError(f"evals.{name}.caption={caption!r}; valid: {sorted(eval_set.captions)}")
        captions = eval_set.captions[caption]
        return cls(encoders, eval_set.images, captions, name=name)

    def embed(self, params: Params) -> tuple[np.ndarray, np.ndarray]:
        """(image_emb [N, D], text_emb [M, D]) of the evaluation set's images and captions."""
        return self.encoders.encode_image(params, self.images), self.encoders.encode_text(params, self.tokens)

    def run(self, params: Params) -> dict[str, float]:
        scores = recall_at_k(*self.embed(params), self.captions, self.text_image)
        return {f"{self.name}_{k}": v for k, v in scores.items()}


def cross_model_recall(query: tuple[np.ndarray, np.ndarray], gallery: tuple[np.ndarray, np.ndarray],
                       captions: list[str], text_image: np.ndarray | None = None,
                       ks: tuple[int, ...] = KS) -> dict[str, float]:
    """Recall@k with queries embedded by one model and the gallery by another (backward compatibility, XBT).

    query, gallery: (image_emb [N, D], text_emb [M, D]) of the same images and captions (caption j of image
    text_image[j]) by the query model and the gallery model, in one space (same D). Returns {i2t_r1, ..., t2i_r10}:
    i2t = the query model's images against the gallery model's captions, t2i = the query model's captions against the
    gallery model's images. A model against itself gives its own `recall_at_k`."""
    (query_image, query_text), (gallery_image, gallery_text) = query, gallery
    if query_image.shape[1:] != gallery_image.shape[1:] or query_text.shape[1:] != gallery_text.shape[1:]:
        raise ValueError(f"query embeddings of width {query_image.shape[1:]} (images) / {query_text.shape[1:]} "
                         f"(texts) and gallery embeddings of width {gallery_image.shape[1:]} / "
                         f"{gallery_text.shape[1:]} are not in one space: cross-model retrieval needs the query "
                         f"model's embeddings mapped into the gallery model's space (e.g. an XBT run)")
    i2t = recall_at_k(query_image, gallery_text, captions, text_image, ks)
    t2i = recall_at_k(gallery_image, query_text, captions, text_image, ks)
    return {**{k: v for k, v in i2t.items() if k.startswith("i2t")}, **{k: v for k, v in t2i.items()
                                                                        if k.startswith("t2i")}}
