"""vlp two-tower model <-> Hugging Face `CLIPModel` (transformers/models/clip/modeling_clip.py).

CLIPModel's fixed choices (checked against transformers 5.24): one CLS token pooled after `post_layernorm`,
`pre_layrnorm` always applied, a patch embedding without bias, separate q/k/v projections, a causal text tower
pooled at the first `eos_token_id` (at the argmax of the ids when `eos_token_id == 2`: legacy configs such as
OpenAI's, which import when the tokenizer's eos is its highest id, so that both pick the same token),
bias-free projections, `logit_scale` in log space and no logit bias. One `hidden_act` and `layer_norm_eps` per
tower; vlp shares them between towers, so both get the same.
"""

from __future__ import annotations

from typing import Any

from vlp.export import mapping
from vlp.export.common import ACT_TO_HF, HF_TO_ACT, ExportError, ModelSpec, require

ENCODER_NAMES = dict(ln_1="layer_norm1", ln_2="layer_norm2", attn="self_attn", out="out_proj", q="q_proj",
                     k="k_proj", v="v_proj", fc1="mlp.fc1", fc2="mlp.fc2")


def check_exportable(spec: ModelSpec) -> None:
    """Raises ExportError naming each vlp option CLIPModel cannot represent."""
    image, text = spec.image, spec.text
    require([
        (image["pool"] == "cls", f"model.image.pool={image['pool']!r}: CLIPModel pools one CLS token; use 'cls'"),
        (image["num_cls_tokens"] == 1, f"model.image.num_cls_tokens={image['num_cls_tokens']}: CLIPModel has one"),
        (image["posemb"] == "learn", f"model.image.posemb={image['posemb']!r}: CLIPModel learns its position "
                                     "embedding; use 'learn'"),
        (image["ln_pre"], "model.image.ln_pre=False: CLIPModel always applies pre_layrnorm; use True"),
        (not image["patch_bias"], "model.image.patch_bias=True: CLIPModel's patch embedding has no bias"),
        (text["causal"], "model.text.causal=False: CLIPModel's text tower is causal"),
        (text["pool"] == "eot", f"model.text.pool={text['pool']!r}: CLIPModel pools at the end-of-text token; "
                                "use 'eot'"),
        (text["eos_id"] != 2, "the tokenizer's eos id is 2, which CLIPModel treats as a legacy config (argmax "
                              "pooling); use a tokenizer with more pieces"),
        (spec.image_projection and spec.text_projection,
         "model.image_projection/text_projection=False: CLIPModel projects both towers"),
        (not spec.projection_bias, "model.projection_bias=True: CLIPModel's projections have no bias"),
        (spec.logit_bias is None, "model.logit_bias_init is set: CLIPModel has no logit bias (a sigmoid-loss "
                                  "model exports as SigLIP with --format=hf)"),
        (spec.scale_parameterization == "log", f"model.logit_scale_parameterization="
         f"{spec.scale_parameterization!r}: CLIPModel stores log(scale); use 'log'"),
        (image["activation"] in ACT_TO_HF, f"model.activation={image['activation']!r}; valid: {sorted(ACT_TO_HF)}"),
    ], "CLIPModel")


def hf_config(spec: ModelSpec) -> dict[str, Any]:
    """config.json of a CLIPModel folder."""
    image, text = spec.image, spec.text
    act, eps = ACT_TO_HF[image["activation"]], image["ln_eps"]
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": spec.embed_dim,
        "logit_scale_init_value": 2.6592,
        "dtype": "float32",
        "text_config": {
            "model_type": "clip_text_model", "vocab_size": text["vocab_size"], "hidden_size": text["width"],
            "intermediate_size": text["mlp_dim"], "num_hidden_layers": text["depth"],
            "num_attention_heads": text["num_heads"], "max_position_embeddings": text["max_len"],
            "hidden_act": act, "layer_norm_eps": eps, "projection_dim": spec.embed_dim,
            "pad_token_id": text["pad_id"], "eos_token_id": text["eos_id"], "bos_token_id": text["eos_id"],
        },
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": image["width"], "intermediate_size": image["mlp_dim"],
            "num_hidden_layers": image["depth"], "num_attention_heads": image["num_heads"],
            "image_size": spec.image_size, "patch_size": image["patch_size"], "num_channels": 3,
            "hidden_act": act, "layer_norm_eps": eps, "projection_dim": spec.embed_dim,
        },
    }


def config_overrides(hf: dict[str, Any]) -> dict[str, Any]:
    """vlp config keys (dotted) that build the model a CLIPModel config.json describes."""
    text, vision = hf["text_config"], hf["vision_config"]
    if text.get("hidden_act", "quick_gelu") != vision.get("hidden_act", "quick_gelu") or \
            text.get("layer_norm_eps", 1e-5) != vision.get("layer_norm_eps", 1e-5):
        raise ExportError("this CLIPModel uses different activations or LayerNorm eps in its two towers; vlp "
                          "shares one of each")
    act = text.get("hidden_act", "quick_gelu")
    if act not in HF_TO_ACT:
        raise ExportError(f"CLIPModel hidden_act={act!r} has no vlp equivalent; valid: {sorted(HF_TO_ACT)}")
    return {
        "objective": "clip",
        "data.image_size": vision["image_size"], "data.max_text_len": text["max_position_embeddings"],
        "model.image.variant": None,
        "model.image.width": vision["hidden_size"], "model.image.depth": vision["num_hidden_layers"],
        "model.image.mlp_dim": vision["intermediate_size"], "model.image.num_heads": vision["num_attention_heads"],
        "model.image.patch_size": vision["patch_size"], "model.image.pool": "cls", "model.image.num_cls_tokens": 1,
        "model.image.posemb": "learn", "model.image.ln_pre": True, "model.image.patch_bias": False,
        "model.text.width": text["hidden_size"], "model.text.depth": text["num_hidden_layers"],
        "model.text.mlp_dim": text["intermediate_size"], "model.text.num_heads": text["num_attention_heads"],
        "model.text.causal": True, "model.text.pool": "eot", "model.text.vocab_size": text["vocab_size"],
        "model.embed_dim": hf.get("projection_dim", 512), "model.image_projection": True,
        "model.text_projection": True, "model.projection_bias": False, "model.activation": HF_TO_ACT[act],
        "model.ln_eps": text.get("layer_norm_eps", 1e-5), "model.logit_bias_init": None,
        "model.logit_scale_parameterization": "log",
    }


def rules(spec: ModelSpec) -> list[mapping.Rule]:
    image, text = spec.image, spec.text
    v, t = "vision_model", "text_model"
    r = [
        mapping.conv(f"{v}.embeddings.patch_embedding.weight", "image/patch_embed/kernel"),
        mapping.same(f"{v}.embeddings.class_embedding", "image/cls_token", (-1,)),
        mapping.same(f"{v}.embeddings.position_embedding.weight", "image/pos_embed"),
        *mapping.layer_norm(f"{v}.pre_layrnorm", "image/ln_pre"),
        *mapping.encoder_rules(f"{v}.encoder.layers", "image/encoder", image["depth"], image["fused_qkv"],
                               ENCODER_NAMES, torch_fused_qkv=False),
        *mapping.layer_norm(f"{v}.post_layernorm", "image/ln_post"),
        mapping.same(f"{t}.embeddings.token_embedding.weight", "text/token_embed/embedding"),
        mapping.same(f"{t}.embeddings.position_embedding.weight", "text/pos_embed"),
        *mapping.encoder_rules(f"{t}.encoder.layers", "text/encoder", text["depth"], text["fused_qkv"],
                               ENCODER_NAMES, torch_fused_qkv=False),
        *mapping.layer_norm(f"{t}.final_layer_norm", "text/ln_final"),
        *mapping.linear("visual_projection", "image_proj", bias=False),
        *mapping.linear("text_projection", "text_proj", bias=False),
        mapping.same("logit_scale", "log_logit_scale", ()),
    ]
    return r
