"""UNITER (Chen et al., 2020): one single-stream transformer over text tokens and image patches, trained with one
task per batch (ITM + word-region alignment by optimal transport, MLM, masked region feature regression), the task
drawn with UNITER's mix ratios (methods.md section 11; docs/uniter.md).

vlp has no region detector: image patches stand in for UNITER's Faster R-CNN regions (a patch's pixels are its
feature, its learned position embedding its box), so MRC / MRC-kl (detector class targets) are left out and the
in-domain mix itm:mlm:mrfr:mrc-kl = 2:2:1:1 becomes 2:2:1.

Variants: `tiny` (CPU minutes on the embedded shapes dataset) and `B/16` (the cluster recipe).
Paper recipe, UNITER-base (ChenRocks/UNITER `config/pretrain-indomain-base-8gpu.json`, methods.md section 11):
BERT-base transformer (12 layers, 768 wide, 12 heads, MLP 3072) initialised from BERT; 10-100 regions (36) of
2048-d detector features + 7-d boxes; text up to 60 WordPiece tokens; AdamW betas (0.9, 0.98), lr 5e-5, weight
decay 0.01, 10k warmup steps then linear decay, 200k steps, gradient-norm clip 5, fp16; batches budgeted to 10,240
tokens per GPU on 8 GPUs (~ 1,000 image-text pairs per step); ITM negatives p = 0.5; WRA weight 0.1 (IPOT
beta 0.5, 50 iterations); 15% masking. `B/16` keeps those (from scratch, not from BERT: vlp's tokenizer is not
WordPiece) with 16 px patches at 224 px (196 regions), vlp's cosine schedule in place of linear decay, and a
1,024-pair batch.
Usage: `--config=configs/uniter.py:tiny`.
"""

from vlp import config as vlp_config

VARIANTS = ("tiny", "B/16")


def get_config(arg: str | None = None):
    variant, overrides = vlp_config.parse_arg(arg, VARIANTS)
    c = vlp_config.base_config()
    c.objective = "uniter"
    # No separate towers, so no zero-shot or retrieval by embeddings: benchmarks/uniter_itm_eval.py scores pairs
    # with the ITM head (zero-shot over class prompts, ITM accuracy, retrieval R@1).
    c.evals = dict()
    if variant == "tiny":
        # configs/clip.py:tiny's data and schedule; one 4-layer 96-wide transformer over 1 + 12 + 16 tokens.
        vlp_config.shapes_tiny(c)
        c.model.image.update(width=128, mlp_dim=512)
        c.model.embed_dim = 128
        c.model.image.patch_size = 8
        c.model.text.update(width=96, depth=4, mlp_dim=384, num_heads=4)
        c.optim.update(lr=1e-3, warmup_steps=150, weight_decay=0.01, b2=0.98)
    else:
        c.total_steps = 200_000
        c.batch_size = 1024
        c.data.image_size = 224
        c.data.max_text_len = 60
        c.data.worker_count = 8
        c.model.image.patch_size = 16
        c.model.text.update(width=768, depth=12, mlp_dim=3072, num_heads=12)
        c.optim.update(lr=5e-5, warmup_steps=10_000, weight_decay=0.01, b1=0.9, b2=0.98, grad_clip_norm=5.0)
        c.mesh.shape = (1, -1, 1)  # FSDP over all devices
        c.log_every, c.eval_every, c.checkpoint_every = 100, 10_000, 2000
    vlp_config.apply_overrides(c, overrides)
    return c
