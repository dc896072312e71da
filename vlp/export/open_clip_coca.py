"""vlp CoCa (`coca.layout='open_clip'`) <-> open_clip `CoCa` (open_clip/coca_model.py, transformer.py; 3.3.0).

open_clip's CoCa, as `create_model` builds it from a `coca_*` config:
- `visual`: its ViT (bias-free conv1, one CLS token), no LN after the blocks, then ONE `AttentionalPooler`
  (`attn_pool`: learned queries of width embed_dim, ln_q, ln_k, an `nn.MultiheadAttention` whose keys/values come
  from the ViT width) and `ln_post`; query 0 @ `proj` is the image embedding, queries 1.. feed the decoder.
- `text`: a causal `TextTransformer` with `embed_cls` (the CLS appended last; its output after `ln_final` @
  `text_projection` is the text embedding) and open_clip's original ("legacy") CLS/padding mask. Its inputs start
  with a start-of-text token, vlp's `coca.bos_id`.
- `text_decoder`: a `MultimodalTransformer`: per layer a causal self-attention block (`resblocks.i`) then a
  cross-attention block (`cross_attn.i`, with `ln_1_kv` on the image tokens), `ln_final`, a bias-free
  `text_projection` [width, vocab].
Its LayerNorms in the pooler and the decoder always use eps 1e-5, its activations are GELU (exact) or QuickGELU and
its multimodal MLPs are 4x the width (`_build_text_decoder_tower` passes no norm_kwargs, act_kwargs or mlp_ratio),
so those are the only ones vlp exports. The vlp layout (two poolers, a learned begin embedding, one MLP per
multimodal layer) has no open_clip counterpart: train with `coca.layout='open_clip'` to export.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vlp.export import mapping
from vlp.export.common import ExportError, require
from vlp.export.open_clip import tower_overrides, visual_trunk_rules

ACTIVATIONS = ("gelu", "quick_gelu")
OPEN_CLIP_LN_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class CocaSpec:
    """The options of a vlp `Captioner` that open_clip's CoCa must reproduce (`image` / `decoder`: the ViT /
    TextDecoder keyword arguments)."""

    image: dict[str, Any]
    decoder: dict[str, Any]
    image_size: int
    embed_dim: int
    gen_queries: int
    pooler_heads: int
    layout: str
    contrastive: bool

    @classmethod
    def from_model(cls, model: Any, image_size: int) -> CocaSpec:
        """From a `vlp.models.coca.Captioner` (unbound is fine) and the training image size."""
        return cls(dict(model.image), dict(model.decoder), image_size, model.embed_dim, model.gen_queries,
                   model.pooler_heads, model.layout, model.contrastive)


def check_exportable(spec: CocaSpec) -> None:
    image, dec = spec.image, spec.decoder
    require([
        (spec.contrastive, "objective cappa: open_clip's CoCa has a contrastive head; export CoCa runs"),
        (spec.layout == "open_clip", f"coca.layout={spec.layout!r}: open_clip's CoCa has one pooler (query 0 "
                                     "contrastive), separate cross-attention blocks and a start token; train with "
                                     "coca.layout='open_clip' (and coca.bos_id)"),
        (dec.get("cls_mask", "legacy") == "legacy", f"coca.cls_mask={dec.get('cls_mask')!r}: open_clip's "
                                                    "create_model builds CoCa with its legacy CLS mask; use 'legacy'"),
        (image["pool"] == "cls" and image["num_cls_tokens"] == 1, "model.image.pool/num_cls_tokens: open_clip's ViT "
                                                                  "has one CLS token"),
        (image["posemb"] == "learn", f"model.image.posemb={image['posemb']!r}: use 'learn'"),
        (not image["patch_bias"], "model.image.patch_bias=True: open_clip's conv1 has no bias"),
        (image["activation"] in ACTIVATIONS, f"model.activation={image['activation']!r}: open_clip's CoCa decoder "
                                             f"supports {ACTIVATIONS}"),
        (image["ln_eps"] == OPEN_CLIP_LN_EPS, f"model.ln_eps={image['ln_eps']}: open_clip's CoCa pooler and decoder "
                                              f"use {OPEN_CLIP_LN_EPS}"),
        (not dec["tied_embedding"], "coca.tied_embedding=True: open_clip's decoder head is its own matrix"),
        (dec["mlp_dim"] == 4 * dec["width"], f"model.text.mlp_dim={dec['mlp_dim']}: open_clip builds the multimodal "
                                             f"MLPs 4x the width ({4 * dec['width']}) whatever its config says"),
    ], "an open_clip CoCa model")


def model_config(spec: CocaSpec) -> dict[str, Any]:
    """open_clip's CoCa model config (the `model_cfg` of open_clip_config.json)."""
    image, dec = spec.image, spec.decoder
    width = dec["width"]
    text_common = {"context_length": dec["max_len"], "vocab_size": dec["vocab_size"], "width": width,
                   "heads": dec["num_heads"], "mlp_ratio": dec["mlp_dim"] / width}
    return {
        "embed_dim": spec.embed_dim,
        "quick_gelu": image["activation"] == "quick_gelu",
        "vision_cfg": {
            "image_size": spec.image_size, "layers": image["depth"], "width": image["width"],
            "head_width": image["width"] // image["num_heads"], "mlp_ratio": image["mlp_dim"] / image["width"],
            "patch_size": image["patch_size"], "no_ln_pre": not image["ln_pre"], "attentional_pool": True,
            "attn_pooler_queries": spec.gen_queries, "attn_pooler_heads": spec.pooler_heads, "output_tokens": True,
        },
        "text_cfg": {**text_common, "layers": dec["n_uni"], "embed_cls": True, "output_tokens": True,
                     "pad_id": dec["pad_id"]},
        "multimodal_cfg": {**text_common, "layers": dec["n_multi"], "attn_pooler_heads": spec.pooler_heads},
        "custom_text": True,
    }


def config_overrides(cfg: dict[str, Any]) -> dict[str, Any]:
    """vlp config keys (dotted) that build the CoCa an open_clip model config describes (coca.bos_id is the
    tokenizer's start-of-text id, which the config does not hold: set it)."""
    vision, text, multi = cfg["vision_cfg"], cfg["text_cfg"], cfg["multimodal_cfg"]
    unsupported = [k for k in ("timm_model_name", "hf_model_name", "ls_init_value", "norm_kwargs", "act_kwargs")
                   if vision.get(k) or text.get(k) or multi.get(k)]
    if unsupported or isinstance(vision.get("layers"), (list, tuple)):
        raise ExportError(f"this open_clip CoCa config uses {unsupported or ['a ResNet image tower']}, which vlp "
                          "does not map; supported: open_clip's own ViT and text transformer")
    if vision.get("attentional_pool") is not True or not text.get("embed_cls"):
        raise ExportError(f"open_clip CoCa with attentional_pool={vision.get('attentional_pool')!r}, embed_cls="
                          f"{text.get('embed_cls')!r}: vlp maps the original layout (attentional_pool=true, "
                          "embed_cls=true)")
    twidth = text["width"]
    if multi["width"] != twidth or multi.get("heads", 8) != text.get("heads", 8) or \
            multi.get("context_length", 77) != text.get("context_length", 77):
        raise ExportError(f"open_clip CoCa with text width/heads/context {twidth}/{text.get('heads', 8)}/"
                          f"{text.get('context_length', 77)} but multimodal {multi['width']}/{multi.get('heads', 8)}/"
                          f"{multi.get('context_length', 77)}: vlp's decoder shares them")
    if text.get("mlp_ratio", 4.0) != 4:
        raise ExportError(f"open_clip CoCa with text mlp_ratio={text['mlp_ratio']}: its multimodal MLPs are always "
                          "4x the width and vlp's decoder shares one MLP size; vlp maps mlp_ratio 4")
    return {
        "objective": "coca",
        **tower_overrides(vision, text),
        "model.embed_dim": cfg["embed_dim"], "model.activation": "quick_gelu" if cfg.get("quick_gelu") else "gelu",
        "model.ln_eps": OPEN_CLIP_LN_EPS,
        "coca.layout": "open_clip", "coca.cls_mask": "legacy", "coca.tied_embedding": False,
        "coca.multimodal_depth": multi["layers"], "coca.gen_queries": vision.get("attn_pooler_queries", 256),
        "coca.pooler_heads": vision.get("attn_pooler_heads", 8),
    }


def _block(torch_prefix: str, vlp_prefix: str, cross: bool = False) -> list[mapping.Rule]:
    """One open_clip ResidualAttentionBlock (fused in_proj) <-> a vlp DecoderBlock / CrossAttentionBlock."""
    t, v = torch_prefix, vlp_prefix
    rules = [*mapping.layer_norm(f"{t}.ln_1", f"{v}/ln_1"), *mapping.layer_norm(f"{t}.ln_2", f"{v}/ln_2"),
             *mapping.fuse_qkv(f"{t}.attn.in_proj", [f"{v}/attn/{n}" for n in ("query", "key", "value")]),
             *mapping.linear(f"{t}.attn.out_proj", f"{v}/attn/out", num_in=2),
             *mapping.linear(f"{t}.mlp.c_fc", f"{v}/mlp/fc1"), *mapping.linear(f"{t}.mlp.c_proj", f"{v}/mlp/fc2")]
    if cross:
        rules += mapping.layer_norm(f"{t}.ln_1_kv", f"{v}/ln_1_kv")
    return rules


def _pooler_attention(spec: CocaSpec) -> list[mapping.Rule]:
    """`nn.MultiheadAttention(embed_dim, kdim=vdim=ViT width)`: one fused in_proj_weight when the widths agree,
    else q/k/v_proj_weight; always one in_proj_bias."""
    t, v = "visual.attn_pool.attn", "gen_pooler/attn"
    names = [f"{v}/{n}" for n in ("query", "key", "value")]
    fused = mapping.fuse_qkv(f"{t}.in_proj", names)
    if spec.embed_dim == spec.image["width"]:
        weights = [fused[0]]
    else:
        weights = [dataclasses.replace(mapping.linear(f"{t}.{n}_proj", vn, bias=False)[0],
                                       torch=(f"{t}.{n}_proj_weight",)) for n, vn in zip("qkv", names, strict=True)]
    return [*weights, fused[1], *mapping.linear(f"{t}.out_proj", f"{v}/out", num_in=2)]


def rules(spec: CocaSpec) -> list[mapping.Rule]:
    image, dec = spec.image, spec.decoder
    return [
        *visual_trunk_rules(image),
        mapping.same("visual.attn_pool.query", "gen_pooler/queries"),
        *mapping.layer_norm("visual.attn_pool.ln_q", "gen_pooler/ln_q"),
        *mapping.layer_norm("visual.attn_pool.ln_k", "gen_pooler/ln_k"),
        *_pooler_attention(spec),
        *mapping.layer_norm("visual.ln_post", "gen_pooler/ln_post"),
        mapping.same("visual.proj", "image_proj/kernel"),
        mapping.same("text.token_embedding.weight", "decoder/token_embed"),
        mapping.same("text.positional_embedding", "decoder/pos_embed"),
        mapping.same("text.cls_emb", "decoder/cls_embed"),
        *[r for i in range(dec["n_uni"]) for r in _block(f"text.transformer.resblocks.{i}", f"decoder/uni_{i}")],
        *mapping.layer_norm("text.ln_final", "decoder/ln_cls"),
        mapping.same("text.text_projection", "text_proj/kernel"),
        *[r for i in range(dec["n_multi"]) for r in _block(f"text_decoder.resblocks.{i}", f"decoder/multi_{i}")],
        *[r for i in range(dec["n_multi"])
          for r in _block(f"text_decoder.cross_attn.{i}", f"decoder/cross_{i}", cross=True)],
        *mapping.layer_norm("text_decoder.ln_final", "decoder/ln_final"),
        mapping.same("text_decoder.text_projection", "decoder/head/kernel"),
        mapping.same("logit_scale", "log_logit_scale", ()),
    ]
