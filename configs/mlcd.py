"""MLCD (An et al., ECCV 2024, "Multi-label Cluster Discrimination for Visual Representation Learning"; methods.md
section 16): image-only pretraining on cluster labels.

Two steps: (1) `tools/cluster.py` embeds the training images with a trained model (any vlp workdir or imported
checkpoint), runs k-means into K centres and writes each record's k nearest centres to a side file; (2) this config
trains a ViT against K learnable centres with the multi-label loss
  L = log(1 + sum_{j in N} e^{s cos θ_j}) + log(1 + sum_{i in P} e^{-s (cos θ_i - m)}),
negatives subsampled PartialFC-style, the [K, D] centres sharded over fsdp (vlp/losses/cluster_discrimination.py).

Paper values [paper; no training code released, the deepglint repo keeps only UNICOM's PartialFC_V2]: 1M centres
from LAION-400M embeddings of an off-the-shelf CLIP, the k nearest centres as positives, negative sample ratio 0.1;
s, m and k come from the paper's ablations [unverified here: s = 64, m = 0, k = 10 are UNICOM/PartialFC's customary
values]. The B/16 optimizer and batch are vlp's CLIP B/16 recipe (configs/clip.py), not the paper's. Variants: `tiny` (CPU, shapes: 64 centres clustered from a clip.py:tiny run, k = 3), `B/16` (224 px,
1M centres, FSDP over all devices). Evaluated by the linear probe and kNN (no text tower).
Usage:
  python tools/cluster.py --workdir=runs/clip --split=test --num_centres=64 --positives=3 \
      --out=runs/clusters/labels.npy
  python -m vlp.train --config=configs/mlcd.py:tiny,mlcd.labels_path=runs/clusters/labels.npy --workdir=runs/mlcd
"""

from vlp import config as vlp_config

VARIANTS = ("tiny", "B/16")


def get_config(arg: str | None = None):
    variant, overrides = vlp_config.parse_arg(arg, VARIANTS)
    c = vlp_config.base_config()
    c.objective = "mlcd"
    c.evals = dict(
        linear_probe=dict(type="linear_probe", split="validation", num_examples=1000, num_train=2000,
                          batch_size=500),
        knn=dict(type="knn", split="validation", num_examples=1000, num_train=2000, batch_size=500),
    )
    if variant == "tiny":
        # The clip.py:tiny image tower and schedule, so the probes compare at equal steps.
        c.total_steps = 1600
        c.batch_size = 128
        c.data.image_size = 32
        c.data.read_threads = 1
        # Shapes' train split has 1M records; its 10k-record `test` split is clustered in a minute on a CPU, so
        # the demo trains on that (20 epochs in 1600 steps). The probes fit on `train` and score `validation`.
        c.data.train_split = "test"
        c.model.image.update(width=96, depth=4, mlp_dim=384, num_heads=4, patch_size=8)
        c.model.embed_dim = 96
        c.mlcd.update(num_centres=64, positives=3, scale=32.0, margin=0.0, sample_ratio=0.5)
        c.optim.update(lr=2e-3, warmup_steps=150, weight_decay=0.05)
        c.log_every, c.eval_every, c.checkpoint_every = 100, 400, 400
    else:
        c.total_steps = 100_000
        c.batch_size = 32_768
        c.data.image_size = 224
        c.data.worker_count = 8
        c.model.image.variant = variant
        c.model.embed_dim = 512
        c.mlcd.update(num_centres=1_000_000, positives=10, scale=64.0, margin=0.0, sample_ratio=0.1)
        c.optim.update(lr=5e-4, warmup_steps=2000, weight_decay=0.2)
        c.mesh.shape = (1, -1, 1)  # FSDP over all devices; the centres split over the same axis
        c.log_every, c.eval_every, c.checkpoint_every = 100, 5000, 2000
    vlp_config.apply_overrides(c, overrides)
    return c
