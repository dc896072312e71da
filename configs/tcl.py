"""TCL (Yang et al., 2022): ALBEF + intra-modal contrast (second view to the momentum encoder) + local MI.

Variants: `tiny` (CPU minutes on the embedded shapes dataset, beside configs/clip.py:tiny) and `B/16` (the cluster
recipe of TCL (uta-smile/TCL@74a3e4f configs/Pretrain.yaml, built on ALBEF's; methods.md sections 10 and 12):
ViT-B/16 at 256 px, BERT-base split 6 text + 6 fusion layers, embed 256, queue 65,536, m 0.995, alpha 0.4 ramped over the first epoch,
batch 64 x 8 = 512, AdamW lr 1e-4, wd 0.02, cosine to 1e-5 (lr_min_ratio 0.1) after a warmup, 30 epochs; the
paper inits ViT from DeiT and BERT from bert-base: pass `init_from` for that). It needs a real data source and a
BERT-size tokenizer.
TCL's second view is an RRC + RandAugment crop; vlp's is photometric (vlp.data.views: shapes captions name
positions). Local MI pools the patch grid to 4x4 (`tcl.lmi_grid`; tiny: its 4x4 grid as it is).
Usage: `--config=configs/tcl.py:tiny`.
"""

from vlp import config as vlp_config

VARIANTS = ("tiny", "B/16")


def get_config(arg: str | None = None):
    variant, overrides = vlp_config.parse_arg(arg, VARIANTS)
    # ALBEF's recipe (TCL's configs/Pretrain.yaml keeps ALBEF's values), in TCL's own config block.
    c = vlp_config.sibling_config_module(__file__, "albef.py").fusion_config("tcl", variant)
    vlp_config.apply_overrides(c, overrides)
    return c
