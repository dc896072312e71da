"""MLCD (An et al., 2024): multi-label cluster discrimination. Offline, tools/cluster.py runs k-means on image
embeddings of a trained model into K centres and writes each record's k nearest centres as its labels; training
then classifies each image against K learnable centres with the multi-label loss of
`vlp.losses.cluster_discrimination` (positives and negatives in separate terms, PartialFC negative sampling, the
centre matrix sharded over fsdp). Image-only: evaluated by the linear probe and kNN (no text tower).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np

from vlp.data.cluster_labels import LABELS_KEY, AddClusterLabels, read_cluster_meta
from vlp.data.tokenizer import Tokenizer
from vlp.losses.cluster_discrimination import num_sampled, sharded_mlcd_loss
from vlp.models import flops
from vlp.models.mlcd import ClusterDiscriminator
from vlp.objectives import register
from vlp.objectives.base import Metrics, Objective, resolve_compute_dtype
from vlp.objectives.two_tower import image_tower_kwargs
from vlp.parallel.mesh import BATCH_AXES


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"invalid config: {message}")


@register("mlcd")
class MlcdObjective(Objective):
    """loss = mean_b [log(1 + sum_{j in N_b} e^{s cos θ_bj}) + log(1 + sum_{i in P_b} e^{-s (cos θ_bi - m)})]."""

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        return dict(
            labels_path="",  # the side file of tools/cluster.py (.npy [N, k] + .json); required
            num_centres=1_000_000,  # K (paper: 1M centres on LAION-400M); must match the labels file
            positives=10,  # k nearest centres per image used as positives (<= the file's k)
            scale=64.0,  # s
            margin=0.0,  # m, subtracted from the positives' cosine
            sample_ratio=0.1,  # PartialFC: share of each shard's centres kept per step (1.0 = no sampling)
        )

    @classmethod
    def validate_config(cls, config: ml_collections.ConfigDict) -> None:
        block = config.mlcd
        _check(bool(block.labels_path), "mlcd.labels_path is empty; give the cluster-label file that "
                                        "tools/cluster.py wrote (e.g. runs/clusters/labels.npy)")
        _check(isinstance(block.num_centres, int) and block.num_centres >= 2,
               f"mlcd.num_centres={block.num_centres!r} must be an integer >= 2")
        _check(isinstance(block.positives, int) and block.positives >= 1,
               f"mlcd.positives={block.positives!r} must be an integer >= 1")
        _check(block.scale > 0, f"mlcd.scale={block.scale} must be > 0")
        _check(0.0 <= block.margin < 1.0, f"mlcd.margin={block.margin} must be in [0, 1)")
        _check(0.0 < block.sample_ratio <= 1.0, f"mlcd.sample_ratio={block.sample_ratio} must be in (0, 1]")

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        block = config.mlcd
        self.image_kwargs = image_tower_kwargs(config.model)
        self.tokenizer = Tokenizer(config.data.tokenizer or None)  # the shared pipeline tokenises captions
        self.model = ClusterDiscriminator(self.image_kwargs, config.model.embed_dim, block.num_centres,
                                          dtype=resolve_compute_dtype(config.precision.compute_dtype))

    def train_example_transform(self, default: Any) -> Any:
        meta = read_cluster_meta(self.config.mlcd.labels_path)
        _check(meta["num_centres"] == self.config.mlcd.num_centres,
               f"mlcd.num_centres={self.config.mlcd.num_centres} but {self.config.mlcd.labels_path} was clustered "
               f"into {meta['num_centres']} centres; set mlcd.num_centres={meta['num_centres']}")
        data = self.config.data
        _check((meta.get("source"), meta.get("split")) == (data.source, data.train_split),
               f"{self.config.mlcd.labels_path} labels split {meta.get('split')!r} of {meta.get('source')!r}, but "
               f"the run trains on split data.train_split={data.train_split!r} of data.source={data.source!r}; "
               f"train on the clustered split or re-run tools/cluster.py on this one")
        return AddClusterLabels(default, self.config.mlcd.labels_path, self.config.mlcd.positives)

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        size = self.config.data.image_size
        return {"image": np.zeros((batch_size, size, size, 3), np.float32),
                "label": np.zeros((batch_size,), np.int32),
                LABELS_KEY: np.zeros((batch_size, self.config.mlcd.positives), np.int32)}

    def init(self, rng: jax.Array) -> Any:
        return self.model.init(rng, self.example_batch(1)["image"])["params"]

    def loss_fn(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, Metrics]:
        block = self.config.mlcd
        emb, centres = self.model.apply({"params": params}, batch["image"])
        return sharded_mlcd_loss(emb, centres, batch[LABELS_KEY], jax.random.fold_in(rng, 1), scale=block.scale,
                                 margin=block.margin, sample_ratio=block.sample_ratio, batch_axes=BATCH_AXES,
                                 centre_axis="fsdp")

    def encode_image(self, params: Any, images: jax.Array) -> jax.Array:
        """images [B, H, W, 3] -> L2-normalised features [B, D]."""
        return self.model.apply({"params": params}, images, method=ClusterDiscriminator.encode_image)

    def encode_patches(self, params: Any, images: jax.Array) -> jax.Array:
        """images [B, H, W, 3] -> frozen patch tokens [B, N, width] (for the dense probe)."""
        return self.model.apply({"params": params}, images, method=ClusterDiscriminator.patch_tokens)

    def train_flops_per_example(self) -> float:
        """ViT + projection + the example's row of logits against the sampled centres (x3 for fwd + bwd)."""
        k, d = self.image_kwargs, self.config.model.embed_dim
        forward = flops.vit_forward_flops(self.config.data.image_size, k["patch_size"], k["width"], k["depth"],
                                          k["mlp_dim"], k["num_cls_tokens"], k["pool"])
        sampled = num_sampled(self.config.mlcd.num_centres, self.config.mlcd.sample_ratio)
        forward += 2 * d * k["width"] + 2 * d * (sampled + self.config.mlcd.positives)
        return 3.0 * forward

    def model_config(self) -> dict[str, Any]:
        out = super().model_config()
        out.update(image_tower=self.model.image, image_size=self.config.data.image_size,
                   mlcd=self.config.mlcd.to_dict())
        return out
