"""CLIM (Wu et al., "CLIM: Contrastive Language-Image Mosaic for Region Representation", AAAI 2024): fine-tunes a
pretrained CLIP so that region embeddings of its dense map match texts (methods.md section 15).

Each step stitches the batch into s x s mosaics (s cycling over `clim.grid_sizes`, leftovers single); a mosaic's
cell embeddings come from RoIAlign (1 x 1, aligned) on the ViT's dense map whose last block skips attention
(x + out(v(ln_1 x)), then the MLP; then ln_post, the projection and L2 normalisation), and are contrasted with the
frozen text embeddings of the cells' captions (InfoNCE over the global batch, weight 1). The model starts from a
pretrained checkpoint: set `init_from.path` (a vlp workdir, e.g. a clip.py:tiny run; or `init_from.format=open_clip`
with an OpenAI ViT-B/16 state dict for `B/16`).

Recipe of the paper's code (CC3M, OpenAI ViT-B/16; methods.md): lr 1e-5, weight decay 0.1, 3 epochs, batch 32 x 4
GPUs, 1000 warmup steps, image tower locked except its last 6 blocks (text tower frozen: its embeddings carry no
gradient), grid sizes 2, 3, 4, mosaics resized to 1024 px with the position embedding rescaled bicubically. vlp
differences: mosaics are resized to the model's own input size (`data.image_size`; vlp's ViT has no position
embedding rescaling), and the logit scale stays trainable.

Variants: `tiny` (fine-tunes a clip.py:tiny workdir on shapes: 2 x 2 mosaics, so each 32 px image becomes a 16 px
cell of 2 x 2 patches; last 2 of 4 blocks trained) and `B/16` (the recipe above at 224 px).
Usage: `--config=configs/clim.py:tiny --config.init_from.path=runs/clip`.
"""

from vlp import config as vlp_config

VARIANTS = ("tiny", "B/16")


def locked_image_patterns(depth: int, trained_blocks: int) -> tuple[str, ...]:
    """optim.freeze regexes that lock the image tower except its last `trained_blocks` blocks (and ln_post and the
    image projection), and the whole text side."""
    locked = "|".join(str(i) for i in range(depth - trained_blocks))
    return ("image/(patch_embed|cls_token|pos_embed|ln_pre).*", f"image/encoder/block_({locked})/.*",
            "text/.*", "text_proj/.*")


def get_config(arg: str | None = None):
    variant, overrides = vlp_config.parse_arg(arg, VARIANTS)
    c = vlp_config.base_config()
    c.objective = "clim"
    if variant == "tiny":
        # clip.py:tiny's towers (so its workdirs load with init_from).
        vlp_config.shapes_tiny(c)
        c.total_steps = 300
        c.clim.grid_sizes = (2,)
        c.optim.update(lr=1e-4, warmup_steps=30, weight_decay=0.1, freeze=locked_image_patterns(4, 2))
        c.log_every, c.eval_every, c.checkpoint_every = 50, 300, 300
    else:
        c.total_steps = 3 * 3_300_000 // 128  # 3 epochs of CC3M at batch 128
        c.batch_size = 128
        c.data.image_size = 224
        c.data.max_text_len = 77
        c.data.worker_count = 8
        c.model.image.variant = "B/16"
        c.model.text.update(width=512, depth=12, mlp_dim=2048, num_heads=8)
        c.model.embed_dim = 512
        c.clim.grid_sizes = (2, 3, 4)
        c.optim.update(lr=1e-5, warmup_steps=1000, weight_decay=0.1, freeze=locked_image_patterns(12, 6))
        c.init_from.format = "open_clip"
        c.mesh.shape = (1, -1, 1)
        c.log_every, c.eval_every, c.checkpoint_every = 100, 5000, 2000
    vlp_config.apply_overrides(c, overrides)
    return c
