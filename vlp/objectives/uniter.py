"""UNITER (Chen et al., 2020): a single-stream transformer trained with one task per batch (methods.md section 11).

Tasks, each batch one of them drawn with the mix ratios `uniter.{itm,mlm,mrfr}_ratio` (UNITER's in-domain
itm:mlm:mrfr:mrc-kl = 2:2:1:1 without MRC, which needs detector classes that patches do not have):
- `itm`: image-text matching; each example's text is replaced by another example's with probability 0.5 (a
  random negative, as UNITER), CE on the CLS pooler; plus word-region alignment (WRA) folded in as UNITER's code
  does: L = L_itm + `wra_weight` * (sum_pos D - sum_neg D) / n, D the IPOT optimal-transport distance.
- `mlm`: the BERT-masked caption (vlp.data.mlm, drawn per visit) with the image intact; CE on the masked tokens.
- `mrfr`: masked region feature regression: 15% of the patches (drawn per visit) zeroed with the text intact; MSE
  of the regressed patch features (the patch pixels, per-patch standardised with `mrfr_norm_pix`) on them.
Conditional masking: `task_inputs` gives each task its inputs, so one modality at most is ever masked.

vlp has no region detector: image patches stand in for UNITER's regions (see vlp/models/uniter.py).
The single transformer takes its size from `model.text` (width, depth, heads, MLP) and its regions from
`model.image.patch_size`; the ViT fields of `model.image` are unused.

Under jit the task is `lax.switch` on an index drawn from the step's rng: all three branches are compiled into the
one step, and each step runs only its own branch (the cost is measured in docs/uniter.md).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlp.data.mlm import MLM_LABELS_KEY, MLM_TEXT_KEY, AddMLMMask, mlm_vocab_size
from vlp.data.tokenizer import load_tokenizer
from vlp.data.transforms import AddPatchMask
from vlp.losses.fusion import itm_loss, mlm_loss
from vlp.losses.mim import mae_mse, patchify
from vlp.losses.ot import ot_distance, wra_loss
from vlp.models import flops
from vlp.models.uniter import Uniter
from vlp.objectives import register
from vlp.objectives.base import Metrics, Objective, image_text_batch, resolve_compute_dtype

TASKS = ("itm", "mlm", "mrfr")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"invalid config: {message}")


def task_inputs(task: str, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array | None]:
    """UNITER's conditional masking: (text ids [B, L], region mask [B, N] or None) a task's model sees. `mlm`
    masks the text only, `mrfr` the image only, `itm` neither."""
    if task == "mlm":
        return batch[MLM_TEXT_KEY], None
    if task == "mrfr":
        return batch["text"], batch["mim_mask"]
    if task == "itm":
        return batch["text"], None
    raise ValueError(f"unknown UNITER task {task!r}; valid: {TASKS}")


def random_negatives(rng: jax.Array, batch_size: int, neg_prob: float) -> tuple[jax.Array, jax.Array]:
    """(is_negative bool [B], partner int32 [B]): each example is a negative with probability `neg_prob` and then
    takes the text of a uniformly drawn other example (partner != i). From the step's rng on the global batch, so
    one device and any mesh draw the same."""
    if batch_size < 2:
        raise ValueError(f"ITM random negatives need a batch of >= 2 examples, got {batch_size}")
    k_neg, k_other = jax.random.split(rng)
    is_negative = jax.random.bernoulli(k_neg, neg_prob, (batch_size,))
    offset = jax.random.randint(k_other, (batch_size,), 1, batch_size)
    return is_negative, ((jnp.arange(batch_size) + offset) % batch_size).astype(jnp.int32)


@register("uniter")
class UniterObjective(Objective):

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        return dict(
            itm_ratio=2.0,  # task mix (UNITER in-domain itm:mlm:mrfr = 2:2:1; MRC needs detector classes)
            mlm_ratio=2.0,
            mrfr_ratio=1.0,
            mlm_prob=0.15,  # BERT masking (80/10/10) of the caption in mlm batches
            mrfr_prob=0.15,  # share of patches masked in mrfr batches (UNITER: 15% of regions)
            itm_neg_prob=0.5,  # ITM: share of examples whose text is replaced by a random other one
            wra_weight=0.1,  # UNITER's itm_ot_lambda
            ot_beta=0.5,  # IPOT proximal step
            ot_iterations=50,
            mrfr_norm_pix=True,  # regress per-patch standardised pixels (UNITER regresses raw detector features)
            tied_mlm=True,  # MLM decoder tied to the token embedding (BERT)
            tied_mrfr=True,  # MRFR output tied to the transposed region-input kernel (UNITER)
        )

    @classmethod
    def validate_config(cls, config: ml_collections.ConfigDict) -> None:
        block = config.uniter
        ratios = [block[f"{t}_ratio"] for t in TASKS]
        _check(all(isinstance(r, (int, float)) and r >= 0 for r in ratios) and sum(ratios) > 0,
               f"uniter task ratios itm/mlm/mrfr = {ratios} must be >= 0 with a positive sum")
        for key in ("mlm_prob", "mrfr_prob", "itm_neg_prob"):
            _check(0.0 <= block[key] <= 1.0, f"uniter.{key}={block[key]} must be in [0, 1]")
        _check(block.mrfr_prob * (config.data.image_size // config.model.image.patch_size) ** 2 >= 0.5
               or block.mrfr_ratio == 0,
               f"uniter.mrfr_prob={block.mrfr_prob} masks no patch of a "
               f"{config.data.image_size // config.model.image.patch_size}^2 grid; raise it or set mrfr_ratio=0")
        _check(block.ot_beta > 0, f"uniter.ot_beta={block.ot_beta} must be > 0")
        _check(isinstance(block.ot_iterations, int) and block.ot_iterations >= 1,
               f"uniter.ot_iterations={block.ot_iterations!r} must be an integer >= 1")
        _check(block.wra_weight >= 0, f"uniter.wra_weight={block.wra_weight} must be >= 0")
        _check(not config.model.image.variant,
               f"model.image.variant={config.model.image.variant!r}: UNITER has no ViT; set model.text's sizes "
               "for its transformer and model.image.patch_size for its regions")

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.block = config.uniter
        self.tokenizer = load_tokenizer(config.data.tokenizer or None)
        self.patch_size = config.model.image.patch_size
        side = config.data.image_size // self.patch_size
        self.grid = (side, side)
        m = config.model
        self.model = Uniter(
            vocab_size=max(m.text.get("vocab_size") or 0, mlm_vocab_size(self.tokenizer)),
            max_len=config.data.max_text_len, num_regions=side * side, region_dim=self.patch_size ** 2 * 3,
            width=m.text.width, depth=m.text.depth, num_heads=m.text.num_heads, mlp_dim=m.text.mlp_dim,
            pad_id=self.tokenizer.pad_id, tied_mlm=self.block.tied_mlm, tied_mrfr=self.block.tied_mrfr,
            activation=m.activation, remat_policy=m.remat_policy, scan_layers=m.scan_layers, attention=m.attention,
            dtype=resolve_compute_dtype(config.precision.compute_dtype))
        ratios = np.asarray([self.block[f"{t}_ratio"] for t in TASKS], np.float64)
        self.task_probs = ratios / ratios.sum()

    # --- data -----------------------------------------------------------------------------------------------------
    def train_example_transform(self, default: Any) -> Any:
        """Per visit: the caption's MLM mask (`mlm_text`, `mlm_labels`) and the MRFR patch mask (`mim_mask`); each
        task reads only its own (`task_inputs`)."""
        seed = self.config.seed
        mlm = AddMLMMask(default, self.tokenizer, self.config.data.max_text_len, seed, self.block.mlm_prob)
        return AddPatchMask(mlm, "random", self.grid, self.block.mrfr_prob, seed=seed)

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        length = self.config.data.max_text_len
        return dict(image_text_batch(self.config, batch_size), **{
            MLM_TEXT_KEY: np.zeros((batch_size, length), np.int32),
            MLM_LABELS_KEY: np.zeros((batch_size, length), np.int32),
            "mim_mask": np.zeros((batch_size, self.grid[0] * self.grid[1]), bool)})

    def init(self, rng: jax.Array) -> Any:
        b = self.example_batch(1)
        return self.model.init(rng, jnp.asarray(b["text"]), self.patches(jnp.asarray(b["image"])),
                               jnp.asarray(b["mim_mask"]), method=Uniter.init_all)["params"]

    def apply(self, params: Any, *args: Any, method: Any = None) -> Any:
        return self.model.apply({"params": params}, *args, method=method)

    def patches(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, 3] -> region features [B, N, p*p*3] (the patches' pixels)."""
        return patchify(images, self.patch_size)

    # --- losses ---------------------------------------------------------------------------------------------------
    def task_loss(self, task: str, params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array,
                                                                                                   Metrics]:
        """The loss of one task on the batch, and every task's metrics (zero for the other tasks, so all branches of
        the switch return the same structure)."""
        block = self.block
        metrics = {k: jnp.zeros((), jnp.float32) for k in
                   ("loss_itm", "loss_wra", "itm_accuracy", "ot_distance_pos", "ot_distance_neg", "loss_mlm",
                    "mlm_accuracy", "loss_mrfr")}
        metrics.update({f"task_{t}": jnp.asarray(float(t == task), jnp.float32) for t in TASKS})
        text, region_mask = task_inputs(task, batch)
        patches = self.patches(batch["image"])
        if task == "itm":
            is_negative, partner = random_negatives(jax.random.fold_in(rng, 1), text.shape[0], block.itm_neg_prob)
            text = jnp.where(is_negative[:, None], jnp.take(text, partner, axis=0), text)
            out = self.apply(params, text, patches)
            loss_itm, itm_metrics = itm_loss(out["itm_logits"], (~is_negative).astype(jnp.int32))
            distance = ot_distance(out["words"], out["regions"], text != self.tokenizer.pad_id,
                                   jnp.ones(out["regions"].shape[:2], bool), block.ot_beta, block.ot_iterations)
            loss_wra = wra_loss(distance, ~is_negative)
            pos = (~is_negative).astype(jnp.float32)
            metrics.update(loss_itm=loss_itm, loss_wra=loss_wra, **itm_metrics,
                           ot_distance_pos=(distance * pos).sum() / jnp.maximum(pos.sum(), 1.0),
                           ot_distance_neg=(distance * (1 - pos)).sum() / jnp.maximum((1 - pos).sum(), 1.0))
            return loss_itm + block.wra_weight * loss_wra, metrics
        out = self.apply(params, text, patches, region_mask)
        if task == "mlm":
            logits = self.apply(params, out["words"], method=Uniter.mlm_logits)
            loss, mlm_metrics = mlm_loss(logits, batch[MLM_LABELS_KEY])
            metrics.update(loss_mlm=loss, mlm_accuracy=mlm_metrics["mlm_accuracy"])
            return loss, metrics
        pred = self.apply(params, out["regions"], method=Uniter.mrfr_features)
        loss = mae_mse(pred, patches, region_mask, block.mrfr_norm_pix)
        metrics.update(loss_mrfr=loss)
        return loss, metrics

    def sample_task(self, rng: jax.Array) -> jax.Array:
        """The step's task index into TASKS, drawn with the mix ratios from the step's rng (int32 [])."""
        return jax.random.choice(jax.random.fold_in(rng, 0), len(TASKS), p=jnp.asarray(self.task_probs, jnp.float32))

    def loss_fn(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, Metrics]:
        branches = [lambda p, b, r, t=t: self.task_loss(t, p, b, r) for t in TASKS]
        return jax.lax.switch(self.sample_task(rng), branches, params, batch, rng)

    # --- evaluation -----------------------------------------------------------------------------------------------
    def itm_scores(self, params: Any, images: jax.Array, tokens: jax.Array) -> jax.Array:
        """P(match) of every pair: images [I, H, W, 3], tokens [T, L] -> [I, T] (one joint pass per pair)."""
        n_img, n_txt = images.shape[0], tokens.shape[0]
        pair_images = jnp.repeat(images, n_txt, axis=0)
        return self.itm_scores_paired(params, pair_images, jnp.tile(tokens, (n_img, 1))).reshape(n_img, n_txt)

    def itm_scores_paired(self, params: Any, images: jax.Array, tokens: jax.Array) -> jax.Array:
        """P(match) of image i with text i: images [B, H, W, 3], tokens [B, L] -> [B]."""
        logits = self.apply(params, tokens, self.patches(images))["itm_logits"]
        return jax.nn.softmax(logits, -1)[:, 1]

    def train_flops_per_example(self) -> float:
        model = self.model
        length = model.max_len + 1 + model.num_regions
        forward = flops.text_forward_flops(length, model.width, model.depth, model.mlp_dim, True)
        forward += 2 * model.num_regions * model.region_dim * model.width
        # heads, weighted by how often each task runs: MLM over every text position, MRFR over every region
        p_itm, p_mlm, p_mrfr = self.task_probs
        forward += p_mlm * 2 * model.max_len * model.width * (model.width + model.vocab_size)
        forward += p_mrfr * 2 * model.num_regions * model.width * (model.width + model.region_dim)
        forward += p_itm * 2 * model.width * (model.width + 2)
        return 3.0 * forward

    def model_config(self) -> dict[str, Any]:
        out = super().model_config()
        out["uniter"] = self.block.to_dict()
        return out
