"""vlp two-tower model <-> open_clip `CLIP` (open_clip/model.py, transformer.py; checked against 3.3.0).

open_clip's own ViT (`VisionTransformer`) always has one CLS token and a bias-free `conv1`; pooling `tok` takes
the CLS token after `ln_post`; `no_ln_pre` drops `ln_pre`. Its `nn.MultiheadAttention` blocks keep a fused
`in_proj_weight` (rows q; k; v). The text tower pools at the first `eos_id` (`pool_type='eos'`) or the last
position; `no_causal_mask` gives a bidirectional tower without a padding mask. `quick_gelu` selects QuickGELU,
`act_kwargs={"approximate": "tanh"}` the tanh GELU and `norm_kwargs={"eps": ...}` the LayerNorm epsilon.
MAP-head (SigLIP) image towers exist in open_clip only as timm trunks, which this module does not map.
"""

from __future__ import annotations

from typing import Any

from vlp.export import mapping
from vlp.export.common import ExportError, ModelSpec, require

ENCODER_NAMES = dict(ln_1="ln_1", ln_2="ln_2", attn="attn", out="out_proj", fc1="mlp.c_fc", fc2="mlp.c_proj")
ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")


def check_exportable(spec: ModelSpec) -> None:
    image, text = spec.image, spec.text
    require([
        (image["pool"] == "cls", f"model.image.pool={image['pool']!r}: open_clip's ViT pools its CLS token (MAP "
                                 "heads exist only as timm trunks); use 'cls' or export SigLIP with --format=hf"),
        (image["num_cls_tokens"] == 1, f"model.image.num_cls_tokens={image['num_cls_tokens']}: open_clip has one"),
        (image["posemb"] == "learn", f"model.image.posemb={image['posemb']!r}: use 'learn'"),
        (not image["patch_bias"], "model.image.patch_bias=True: open_clip's conv1 has no bias"),
        (text["pool"] in ("eot", "last"), f"model.text.pool={text['pool']!r}: valid for open_clip: 'eot', 'last'"),
        (text["causal"] or not text["padding_mask"], "model.text.causal=False with padding_mask=True: open_clip's "
                                                      "bidirectional text tower has no padding mask"),
        (spec.image_projection and spec.text_projection, "model.image_projection/text_projection=False: open_clip "
                                                         "projects both towers"),
        (not spec.projection_bias, "model.projection_bias=True: open_clip's image projection has no bias"),
        (spec.scale_parameterization == "log", f"model.logit_scale_parameterization="
         f"{spec.scale_parameterization!r}: open_clip stores log(scale); use 'log'"),
        (image["activation"] in ACTIVATIONS, f"model.activation={image['activation']!r}; valid: {ACTIVATIONS}"),
    ], "an open_clip CLIP model")


def model_config(spec: ModelSpec) -> dict[str, Any]:
    """open_clip's model config (the `model_cfg` of open_clip_config.json)."""
    image, text = spec.image, spec.text
    act = image["activation"]
    extra = {"norm_kwargs": {"eps": image["ln_eps"]}}
    if act == "gelu_tanh":
        extra["act_kwargs"] = {"approximate": "tanh"}
    cfg = {
        "embed_dim": spec.embed_dim,
        "quick_gelu": act == "quick_gelu",
        "vision_cfg": {
            "image_size": spec.image_size, "layers": image["depth"], "width": image["width"],
            "head_width": image["width"] // image["num_heads"], "mlp_ratio": image["mlp_dim"] / image["width"],
            "patch_size": image["patch_size"], "no_ln_pre": not image["ln_pre"], "pool_type": "tok", **extra,
        },
        "text_cfg": {
            "context_length": text["max_len"], "vocab_size": text["vocab_size"], "width": text["width"],
            "heads": text["num_heads"], "layers": text["depth"], "mlp_ratio": text["mlp_dim"] / text["width"],
            "pool_type": "eos" if text["pool"] == "eot" else "last", "eos_id": text["eos_id"],
            "pad_id": text["pad_id"], "no_causal_mask": not text["causal"], **extra,
        },
    }
    if spec.logit_bias is not None:
        cfg["init_logit_bias"] = spec.logit_bias
    return cfg


def tower_overrides(vision: dict[str, Any], text: dict[str, Any]) -> dict[str, Any]:
    """vlp config keys for the shapes of open_clip's ViT (`vision_cfg`) and text transformer (`text_cfg`): input
    sizes, widths, depths, MLPs, heads; shared by the CLIP and CoCa mappings."""
    width, twidth = vision["width"], text["width"]
    return {
        "data.image_size": vision["image_size"], "data.max_text_len": text.get("context_length", 77),
        "model.image.variant": None,
        "model.image.width": width, "model.image.depth": vision["layers"],
        "model.image.mlp_dim": int(round(width * vision.get("mlp_ratio", 4.0))),
        "model.image.num_heads": width // vision.get("head_width", 64), "model.image.patch_size": vision["patch_size"],
        "model.image.pool": "cls", "model.image.num_cls_tokens": 1, "model.image.posemb": "learn",
        "model.image.ln_pre": not vision.get("no_ln_pre", False), "model.image.patch_bias": False,
        "model.text.width": twidth, "model.text.depth": text["layers"],
        "model.text.mlp_dim": int(round(twidth * text.get("mlp_ratio", 4.0))),
        "model.text.num_heads": text.get("heads", 8), "model.text.vocab_size": text.get("vocab_size", 49408),
    }


def config_overrides(cfg: dict[str, Any]) -> dict[str, Any]:
    """vlp config keys (dotted) that build the model an open_clip model config describes."""
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    unsupported = [k for k in ("timm_model_name", "hf_model_name", "attentional_pool", "ls_init_value",
                               "final_ln_after_pool", "proj_bias") if vision.get(k) or text.get(k)]
    if unsupported or cfg.get("custom_text") or isinstance(vision.get("layers"), (list, tuple)):
        raise ExportError(f"this open_clip config uses {unsupported or ['custom_text/ResNet']}, which vlp does not "
                          "map; supported: open_clip's own ViT and text transformer")
    if vision.get("pool_type", "tok") != "tok":
        raise ExportError(f"open_clip vision pool_type={vision['pool_type']!r}; vlp maps only 'tok'")
    pool = text.get("pool_type", "argmax")
    if pool not in ("argmax", "eos", "last"):
        raise ExportError(f"open_clip text pool_type={pool!r}; vlp maps 'argmax', 'eos' and 'last'")
    act_kwargs = vision.get("act_kwargs") or {}
    act = "quick_gelu" if cfg.get("quick_gelu") else ("gelu_tanh" if act_kwargs.get("approximate") == "tanh"
                                                       else "gelu")
    eps = (vision.get("norm_kwargs") or {}).get("eps", 1e-5)
    if eps != (text.get("norm_kwargs") or {}).get("eps", 1e-5) or act_kwargs != (text.get("act_kwargs") or {}):
        raise ExportError("this open_clip config uses different LayerNorm eps or activations in its two towers; "
                          "vlp shares one of each")
    causal = not text.get("no_causal_mask", False)
    return {
        **({} if causal else {"model.text.padding_mask": False}),  # open_clip never masks padding
        "objective": "siglip" if cfg.get("init_logit_bias") is not None else "clip",
        **tower_overrides(vision, text),
        "model.text.causal": causal, "model.text.pool": "last" if pool == "last" else "eot",
        "model.embed_dim": cfg["embed_dim"], "model.image_projection": True, "model.text_projection": True,
        "model.projection_bias": False, "model.activation": act, "model.ln_eps": eps,
        "model.logit_bias_init": cfg.get("init_logit_bias"), "model.logit_scale_parameterization": "log",
    }


def visual_trunk_rules(image: dict) -> list[mapping.Rule]:
    """open_clip's `visual` ViT up to its last block (patch embedding, CLS, positions, ln_pre, blocks): shared by the
    CLIP and CoCa mappings, which differ after it (ln_post + projection vs the attentional pooler)."""
    return [
        mapping.conv("visual.conv1.weight", "image/patch_embed/kernel"),
        mapping.same("visual.class_embedding", "image/cls_token", (-1,)),
        mapping.same("visual.positional_embedding", "image/pos_embed"),
        *(mapping.layer_norm("visual.ln_pre", "image/ln_pre") if image["ln_pre"] else []),
        *mapping.encoder_rules("visual.transformer.resblocks", "image/encoder", image["depth"], image["fused_qkv"],
                               ENCODER_NAMES, torch_fused_qkv=True),
    ]


def rules(spec: ModelSpec) -> list[mapping.Rule]:
    image, text = spec.image, spec.text
    r = [
        *visual_trunk_rules(image),
        *mapping.layer_norm("visual.ln_post", "image/ln_post"),
        mapping.same("visual.proj", "image_proj/kernel"),
        mapping.same("token_embedding.weight", "text/token_embed/embedding"),
        mapping.same("positional_embedding", "text/pos_embed"),
        *mapping.encoder_rules("transformer.resblocks", "text/encoder", text["depth"], text["fused_qkv"],
                               ENCODER_NAMES, torch_fused_qkv=True),
        *mapping.layer_norm("ln_final", "text/ln_final"),
        mapping.same("text_projection", "text_proj/kernel"),
        mapping.same("logit_scale", "log_logit_scale", ()),
    ]
    if spec.logit_bias is not None:
        r.append(mapping.same("logit_bias", "logit_bias", ()))
    return r
