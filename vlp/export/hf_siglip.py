"""vlp two-tower model <-> Hugging Face `SiglipModel` (transformers/models/siglip/modeling_siglip.py).

SiglipModel's fixed choices (checked against transformers 5.24): no CLS token and no `pre_layrnorm`; a patch
embedding with bias; the image embedding is the MAP head output (`vision_model.head`: a learned probe,
`nn.MultiheadAttention` with a fused in_proj, LayerNorm and MLP with a residual), so there is no vision
projection and the embedding dim is the vision width; a bidirectional text tower taken at the last position,
without a padding mask when called without `attention_mask`, through `text_model.head` (Linear with bias);
`logit_scale` in log space and a `logit_bias`, both of shape [1].
"""

from __future__ import annotations

from typing import Any

from vlp.export import mapping
from vlp.export.common import ACT_TO_HF, HF_TO_ACT, ExportError, ModelSpec, require
from vlp.export.hf_clip import ENCODER_NAMES


def check_exportable(spec: ModelSpec) -> None:
    image, text = spec.image, spec.text
    require([
        (image["pool"] == "map", f"model.image.pool={image['pool']!r}: SiglipModel pools with a MAP head; use 'map'"),
        (image["posemb"] == "learn", f"model.image.posemb={image['posemb']!r}: SiglipModel learns its position "
                                     "embedding; use 'learn'"),
        (not image["ln_pre"], "model.image.ln_pre=True: SiglipModel has no LayerNorm before the blocks; use False"),
        (image["patch_bias"], "model.image.patch_bias=False: SiglipModel's patch embedding has a bias; use True"),
        (not text["causal"], "model.text.causal=True: SiglipModel's text tower is bidirectional; use False"),
        (not text["padding_mask"], "model.text.padding_mask=True: SiglipModel's text tower attends to padding; "
                                   "use False"),
        (text["pool"] == "last", f"model.text.pool={text['pool']!r}: SiglipModel takes the last position; use "
                                 "'last'"),
        (not spec.image_projection, "model.image_projection=True: SiglipModel has no vision projection (the MAP "
                                    "head output is the embedding); use False"),
        (spec.text_projection and spec.projection_bias, "model.text_projection/projection_bias: SiglipModel's "
                                                        "text head is a Linear with bias; use both True"),
        (spec.embed_dim == image["width"], f"model.embed_dim={spec.embed_dim}: SiglipModel's embedding dim is the "
                                           f"vision width {image['width']}"),
        (spec.logit_bias is not None, "model.logit_bias_init is unset: SiglipModel has a logit bias"),
        (spec.scale_parameterization == "log", f"model.logit_scale_parameterization="
         f"{spec.scale_parameterization!r}: SiglipModel stores log(scale); use 'log'"),
        (image["activation"] in ACT_TO_HF, f"model.activation={image['activation']!r}; valid: {sorted(ACT_TO_HF)}"),
    ], "SiglipModel")


def hf_config(spec: ModelSpec) -> dict[str, Any]:
    image, text = spec.image, spec.text
    act, eps = ACT_TO_HF[image["activation"]], image["ln_eps"]
    return {
        "architectures": ["SiglipModel"],
        "model_type": "siglip",
        "dtype": "float32",
        "text_config": {
            "model_type": "siglip_text_model", "vocab_size": text["vocab_size"], "hidden_size": text["width"],
            "intermediate_size": text["mlp_dim"], "num_hidden_layers": text["depth"],
            "num_attention_heads": text["num_heads"], "max_position_embeddings": text["max_len"],
            "hidden_act": act, "layer_norm_eps": eps, "projection_size": spec.embed_dim,
            "pad_token_id": text["pad_id"], "eos_token_id": text["eos_id"], "bos_token_id": None,
        },
        "vision_config": {
            "model_type": "siglip_vision_model", "hidden_size": image["width"], "intermediate_size": image["mlp_dim"],
            "num_hidden_layers": image["depth"], "num_attention_heads": image["num_heads"],
            "image_size": spec.image_size, "patch_size": image["patch_size"], "num_channels": 3,
            "hidden_act": act, "layer_norm_eps": eps, "vision_use_head": True,
        },
    }


def config_overrides(hf: dict[str, Any]) -> dict[str, Any]:
    """vlp config keys (dotted) that build the model a SiglipModel config.json describes."""
    text, vision = hf["text_config"], hf["vision_config"]
    act = text.get("hidden_act", "gelu_pytorch_tanh")
    eps = text.get("layer_norm_eps", 1e-6)
    if act != vision.get("hidden_act", "gelu_pytorch_tanh") or eps != vision.get("layer_norm_eps", 1e-6):
        raise ExportError("this SiglipModel uses different activations or LayerNorm eps in its two towers; vlp "
                          "shares one of each")
    if act not in HF_TO_ACT:
        raise ExportError(f"SiglipModel hidden_act={act!r} has no vlp equivalent; valid: {sorted(HF_TO_ACT)}")
    if not vision.get("vision_use_head", True):
        raise ExportError("SiglipModel vision_use_head=False (no MAP head) has no vlp equivalent")
    projection = text.get("projection_size") or text["hidden_size"]
    if projection != vision["hidden_size"]:
        raise ExportError(f"SiglipModel text projection_size={projection} differs from the vision width "
                          f"{vision['hidden_size']}; the two embeddings could not be compared")
    return {
        "objective": "siglip",
        "data.image_size": vision["image_size"], "data.max_text_len": text["max_position_embeddings"],
        "model.image.variant": None,
        "model.image.width": vision["hidden_size"], "model.image.depth": vision["num_hidden_layers"],
        "model.image.mlp_dim": vision["intermediate_size"], "model.image.num_heads": vision["num_attention_heads"],
        "model.image.patch_size": vision["patch_size"], "model.image.pool": "map", "model.image.posemb": "learn",
        "model.image.ln_pre": False, "model.image.patch_bias": True,
        "model.text.width": text["hidden_size"], "model.text.depth": text["num_hidden_layers"],
        "model.text.mlp_dim": text["intermediate_size"], "model.text.num_heads": text["num_attention_heads"],
        "model.text.causal": False, "model.text.padding_mask": False, "model.text.pool": "last",
        "model.text.vocab_size": text["vocab_size"],
        "model.embed_dim": projection, "model.image_projection": False, "model.text_projection": True,
        "model.projection_bias": True, "model.activation": HF_TO_ACT[act], "model.ln_eps": eps,
        "model.logit_bias_init": -10.0, "model.logit_scale_parameterization": "log",
    }


def rules(spec: ModelSpec) -> list[mapping.Rule]:
    image, text = spec.image, spec.text
    v, t, h = "vision_model", "text_model", "vision_model.head"
    return [
        mapping.conv(f"{v}.embeddings.patch_embedding.weight", "image/patch_embed/kernel"),
        mapping.same(f"{v}.embeddings.patch_embedding.bias", "image/patch_embed/bias"),
        mapping.same(f"{v}.embeddings.position_embedding.weight", "image/pos_embed"),
        *mapping.encoder_rules(f"{v}.encoder.layers", "image/encoder", image["depth"], image["fused_qkv"],
                               ENCODER_NAMES, torch_fused_qkv=False),
        *mapping.layer_norm(f"{v}.post_layernorm", "image/ln_post"),
        mapping.same(f"{h}.probe", "image/map_head/probe"),
        *mapping.fuse_qkv(f"{h}.attention.in_proj", [f"image/map_head/{n}" for n in ("query", "key", "value")]),
        *mapping.linear(f"{h}.attention.out_proj", "image/map_head/out", num_in=2),
        *mapping.layer_norm(f"{h}.layernorm", "image/map_head/ln"),
        *mapping.linear(f"{h}.mlp.fc1", "image/map_head/mlp/fc1"),
        *mapping.linear(f"{h}.mlp.fc2", "image/map_head/mlp/fc2"),
        mapping.same(f"{t}.embeddings.token_embedding.weight", "text/token_embed/embedding"),
        mapping.same(f"{t}.embeddings.position_embedding.weight", "text/pos_embed"),
        *mapping.encoder_rules(f"{t}.encoder.layers", "text/encoder", text["depth"], text["fused_qkv"],
                               ENCODER_NAMES, torch_fused_qkv=False),
        *mapping.layer_norm(f"{t}.final_layer_norm", "text/ln_final"),
        *mapping.linear(f"{t}.head", "text_proj"),
        mapping.same("logit_scale", "log_logit_scale", (1,)),
        mapping.same("logit_bias", "logit_bias", (1,)),
    ]
