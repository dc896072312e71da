"""MOFI (Wu et al., 2023, arXiv 2306.07952; code: apple/ml-mofi, which releases weights and GPR1200 / zero-shot
eval scripts only, no training code): a CLIP-style two-tower model trained jointly on entity classification
and image <-> entity-name contrastive learning.

From the paper / abstract: I2E = 1B images with 2M entities, mined by NER on alt-texts and filtered with CLIP;
recipes compared: supervised (entity classifier), contrastive (entity names, enriched with descriptions, as free-form
text) and multi-task (both; best on GPR1200 image retrieval: 86.66 mAP for H/14). vlp's `mofi` objective is the
multi-task recipe: loss = contrastive_weight * InfoNCE(image, entity names) + entity_weight * multi-label softmax CE
over the entities, weights 1 and 1 [paper's sum of both losses; the entity descriptions are not reproduced]. The
released models embed images and texts like CLIP (normalised dot products) with an OPT-based tokenizer.

Variants: `tiny` (shapes, multi-label entities: each image's colour and shape, 16 entities, text = "red circle"),
`B/16` (224 px, entities = the records' class labels named by the source's class names; FSDP).
Usage: `--config=configs/mofi.py:tiny`.
"""

from vlp import config as vlp_config

VARIANTS = ("tiny", "B/16")


def get_config(arg: str | None = None):
    variant, overrides = vlp_config.parse_arg(arg, VARIANTS)
    c = vlp_config.load_config_file(f"{__file__.rsplit('/', 1)[0]}/clip.py:{'tiny' if variant == 'tiny' else variant}")
    c.objective = "mofi"
    c.mofi.update(entities="shapes_attributes" if variant == "tiny" else "label", names_as_text=True,
                  contrastive_weight=1.0, entity_weight=1.0)
    vlp_config.apply_overrides(c, overrides)
    return c
