"""Config helpers: the base config every method file extends, argument parsing, validation, JSON round trip.

A config is an `ml_collections.ConfigDict`, locked after construction so that a typo in a key fails at start.
`configs/<method>.py:get_config(arg)` takes `arg = "variant"` or `"variant,key=value,..."`.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

import ml_collections
from etils import epath
from ml_collections import config_dict

from vlp.parallel.sharding import DEFAULT_RULES

COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
NAN_POLICIES = ("stop", "skip", "rollback")
ON_CHECKPOINT_ERROR = ("stop", "continue")
ON_UNRESTORABLE = ("stop", "fresh_start")


def base_config() -> ml_collections.ConfigDict:
    """Every key a run can set, with CPU-friendly defaults; method configs override values, never add keys."""
    c = ml_collections.ConfigDict()
    c.objective = "clip"
    c.seed = 0
    c.total_steps = 1000
    c.batch_size = 128  # global, across all devices and processes

    c.data = dict(
        # shapes | arrayrecord:<dir or manifest.json> (tools/make_shards.py) | tfds:<name>[:<version>]; evals read it
        source="shapes",
        train_split="train",
        # Training mixture: ("<spec>=<weight>", ...), e.g. ("arrayrecord:/d/cc3m=3", "arrayrecord:/d/coco=1");
        # empty = train on `source` alone.
        mixture=(),
        image_size=32,
        random_crop_scale=(0.9, 1.0),  # random resized crop area range for real images (never for shapes)
        random_flip=True,  # horizontal flips for real images (never for shapes: its captions name positions)
        train_caption="both",  # noisy | synthetic | both (one of the two, drawn per visit from seed and position)
        synthetic_caption_prob=0.5,  # with "both": how often the synthetic caption is the one trained on
        max_text_len=16,
        tokenizer="",  # a sentencepiece .model or a Hugging Face tokenizer.json; "" = the bundled shapes tokenizer
        worker_count=0,  # grain worker processes (0 = in the training process)
        read_threads=4,
        # Damaged (undecodable) records are skipped and counted; the run stops when more than this share of the
        # last `bad_record_window` reads of a process are damaged (10% of one default shard's 10,000 records).
        max_bad_record_share=0.1,
        bad_record_window=10_000,
    )

    c.model = dict(
        image=dict(
            variant=config_dict.placeholder(str),  # e.g. "B/16": sets width/depth/mlp_dim/num_heads/patch_size
            width=128, depth=4, mlp_dim=512, num_heads=4, patch_size=8,
            pool="cls", posemb="learn", num_cls_tokens=1, ln_pre=True, patch_bias=False,
            # FLIP patch dropout (two-tower objectives): the share of patch tokens each training image drops, drawn
            # per example from (seed, step, row); never at evaluation. 0.5 roughly halves the image tower's cost.
            patch_dropout=0.0,
            # Steps >= this train without patch dropout (FLIP's final unmasked phase); unset = dropout throughout.
            patch_dropout_until_step=config_dict.placeholder(int),
        ),
        text=dict(
            width=128, depth=2, mlp_dim=512, num_heads=4, causal=True, pool="eot",
            padding_mask=True,  # bidirectional towers: mask padding keys (False: Hugging Face SigLIP, which has none)
            # Rows of the token embedding table; unset = the tokenizer's vocab size. Set (>= the tokenizer's) to
            # benchmark a realistic table with the small bundled tokenizer (which never produces the extra ids).
            vocab_size=config_dict.placeholder(int),
        ),
        # What each transformer block keeps for the backward pass (both towers): none (everything: fastest, most
        # memory) | full (only the block input; recompute the rest) | dots_saveable (matmul outputs) |
        # dots_with_no_batch_dims_saveable | offload_dots (matmul outputs without batch dims in host memory; GPU/TPU).
        remat_policy="none",
        # True: each stack of blocks is one block under nn.scan (compiles ~depth times faster; params
        # encoder/blocks/... with a leading [depth] axis, logical name `layers`). Checkpoints, init_from and export
        # convert between the two layouts.
        scan_layers=False,
        embed_dim=128,
        image_projection=True,
        text_projection=True,
        projection_bias=False,
        activation="gelu",  # gelu (exact) | gelu_tanh | quick_gelu (OpenAI CLIP weights)
        ln_eps=1e-5,
        fused_qkv=True,
        # Attention implementation: auto (the backend's fastest: cudnn on NVIDIA GPUs with bf16/fp16 compute, splash
        # on TPU, else xla) | xla (everywhere) | cudnn (NVIDIA GPU flash attention) | splash (TPU Pallas kernel).
        attention="auto",
        logit_scale_init=1 / 0.07,
        logit_scale_max=100.0,
        logit_scale_parameterization="log",  # log (CLIP) | temperature (ALIGN: divide by a learnable T)
        logit_bias_init=config_dict.placeholder(float),
    )

    # gather: local rows x all-gathered columns (fast, memory grows with the batch); ring: blocks passed around the
    # batch devices, per-device memory independent of the device count (for very large batches).
    c.loss = dict(variant="gather", label_smoothing=0.0)

    # Masked-image modelling (simmim, mae, eva, tips). Masks are drawn per visit from (seed, position in the training
    # stream) in the pipeline: a new mask every epoch, the same ones after a resume.
    c.mim = dict(
        mask_kind="block",  # block (BEiT/SimMIM/EVA/iBOT) | random (MAE)
        mask_ratio=0.6,
        min_block=4,  # block masks: smallest block, in patches
        masked_image_fraction=1.0,  # share of images that get a mask (iBOT/DINOv2: 0.5); the others none
        norm_pix=True,  # MAE: per-patch normalised pixel targets
        decoder_width=64, decoder_depth=1, decoder_heads=4, decoder_mlp_dim=256,  # MAE's light decoder
        # EVA's target space (its frozen teacher is the run's reference model: reference.format/path): aligned (the
        # teacher's patch tokens after ln_post and the image projection, CLIP's image-text space, as EVA) |
        # patch_tokens (the same tokens before the projection)
        teacher_features="aligned",
    )
    # DINO/iBOT self-distillation with an EMA teacher (tips). Defaults follow DINOv2 (methods.md section 5) except K.
    c.distill = dict(
        num_prototypes=1024, head_hidden=256, head_bottleneck=64, head_layers=3,
        student_temp=0.1, teacher_temp=0.07, teacher_temp_start=0.04, teacher_temp_warmup_steps=100,
        center_momentum=0.9,
        ema_momentum=0.996, ema_momentum_final=0.996,  # equal: fixed momentum (SILC/TIPS); else cosine to final
        dino_weight=1.0, ibot_weight=1.0,
    )
    # TIPS: CLS token 1 <-> noisy caption, CLS token 2 <-> synthetic caption (two InfoNCE terms, one text tower).
    c.tips = dict(
        contrastive_view="unmasked",  # unmasked: one more student forward pass (better); masked: the iBOT view
        contrastive_weight=1.0,
    )

    # Objectives that own their keys (DESIGN.md) declare them next to their class (`Objective.default_config`):
    # each block appears here under the objective's name, e.g. `coca`, `cappa`.
    from vlp.objectives import config_blocks

    for name, block in config_blocks().items():
        c[name] = block

    c.optim = dict(
        name="adamw", lr=1e-3, warmup_steps=100, schedule="cosine", min_lr_ratio=0.0,
        b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2,
        grad_clip_norm=1.0,  # global-norm gradient clipping; 0 (or None) = no clipping (MAE)
        # Regexes over '/'-joined param paths (full match) that get no updates and no optimizer state, e.g.
        # ("image/.*",) to lock an image tower loaded with init_from (LiT).
        freeze=(),
    )

    # steps > 1: one optimizer step over `steps` micro-batches of batch_size / steps. gradcache keeps every
    # negative of the global batch in contrastive losses (exact); plain averages micro-batch losses (fewer negatives).
    c.accumulation = dict(steps=1, mode="gradcache")

    c.mesh = dict(shape=(-1, 1, 1), num_devices=-1)  # axes (data, fsdp, tensor); -1 = all remaining devices
    c.sharding_rules = DEFAULT_RULES
    c.precision = dict(compute_dtype="auto")  # auto: bfloat16 on GPU/TPU, float32 on CPU; params always fp32
    # A non-finite loss or gradient never updates params. stop: raise (and dump what is known); skip: count and
    # go on; rollback: restore the newest checkpoint and skip the data since then.
    c.nan_policy = "stop"
    c.on_checkpoint_error = "stop"  # a checkpoint that cannot be written (full disk): stop | continue (retry later)
    c.on_unrestorable_checkpoint = "stop"  # every checkpoint in the workdir is unreadable: stop | fresh_start
    # Params that start a fresh run (fine-tuning, LiT): format vlp (a workdir or its checkpoints/; its newest
    # params), safetensors (vlp's export), hf (a CLIPModel / SiglipModel folder) or open_clip (a state dict file).
    c.init_from = dict(format="vlp", path="")
    # A frozen reference model (distillation teacher, Mod-X's previous phase, EVA's teacher, the prompt objective's
    # CLIP) for objectives that read one (vlp.train.frozen.Reference): loaded onto the mesh like the student, never
    # trained, never checkpointed (a resume reloads it and checks its fingerprint). Formats as init_from's. `config`
    # is recorded at the first start (the reference's own resolved config, JSON), so evaluating or exporting the run
    # never needs the reference (except the prompt objective's evaluation, which encodes with it).
    c.reference = dict(format="vlp", path="", config="")
    # Resuming a workdir whose saved config.json differs in a key that changes the training stream (the list is
    # vlp.train.workdir.DATA_STREAM_KEYS: batch size, seed, sources, image size, tokenizer, masks, ...) is refused,
    # because the saved data position is a batch index that the new stream would reinterpret. True: resume anyway.
    c.allow_data_change = False
    # A step that takes far longer than usual (a hung peer: gloo/NCCL collectives never time out) stops the process
    # with exit code 76 (vlp.train.watchdog.HUNG_EXIT_CODE), so the launcher can requeue the job. The limit is
    # max(factor x the median step time, min_seconds), and max_step_seconds (> 0) caps it; the first step (its
    # compilation), the next warmup_steps, evals and checkpoint saves are never timed.
    c.watchdog = dict(enabled=True, factor=10.0, min_seconds=300.0, max_step_seconds=0.0, warmup_steps=5)

    c.log_every = 50
    c.eval_every = 500
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.async_checkpointing = True

    c.evals = dict(
        zeroshot=dict(type="zeroshot", split="validation", num_examples=2000, batch_size=500,
                      prompt_ensemble=True),
        retrieval=dict(type="retrieval", split="validation", num_examples=1000, caption="synthetic",
                       batch_size=500),
    )
    c.hardware = dict(peak_flops_per_device=config_dict.placeholder(float))  # MFU denominator override
    return c


def image_only_config(objective: str, variant: str, tiny_patch_size: int) -> ml_collections.ConfigDict:
    """What the image-only objectives' configs (simmim, mae, eva) share: the `tiny` CPU run on shapes at 32 px with
    the CLIP demo's image tower, or a cluster variant (`B/16`, `L/14`: 224 px, FSDP); evaluated by the dense probe
    only (no text tower). The method files add their masks, steps, batch and optimizer."""
    from vlp.eval.dense import default_eval

    c = base_config()
    c.objective = objective
    c.evals = dict(dense=default_eval())
    if variant == "tiny":
        c.total_steps = 800
        c.batch_size = 128
        c.data.image_size = 32
        c.data.read_threads = 1
        c.model.image.update(width=96, depth=4, mlp_dim=384, num_heads=4, patch_size=tiny_patch_size)
        c.log_every, c.eval_every, c.checkpoint_every = 25, 400, 400
    else:
        c.data.image_size = 224
        c.data.worker_count = 8
        c.model.image.variant = variant
        c.model.remat_policy = "full" if variant == "L/14" else "none"
        c.mesh.shape = (1, -1, 1)
        c.log_every, c.eval_every, c.checkpoint_every = 100, 10_000, 2000
    return c


def _coerce(value: str, current: Any, key: str, declared: type | None = None) -> Any:
    # An unset placeholder (current None) is parsed by its declared type: int and float placeholders reject strings.
    if isinstance(current, str) or (current is None and declared not in (int, float, bool)):
        return value
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError) as e:
        expected = (declared or type(current)).__name__
        raise ValueError(f"config key {key!r}: cannot parse {value!r} as {expected}") from e
    if isinstance(current, float) and isinstance(parsed, int) and not isinstance(parsed, bool):
        parsed = float(parsed)
    return parsed


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, str]) -> None:
    """Sets dotted keys from strings, keeping each key's type; an unknown key names the valid ones."""
    for dotted, raw in overrides.items():
        node = config
        parts = dotted.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                if moved := moved_key_error(dotted, "the config override"):
                    raise moved
                where = ".".join(parts[:i]) or "<top level>"
                valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                raise KeyError(f"unknown config key {dotted!r}: {part!r} is not in {where}; valid keys there: "
                               f"{valid}")
            if i < len(parts) - 1:
                node = node[part]
        current, declared = node[parts[-1]], node.get_type(parts[-1])
        value = _coerce(raw, current, dotted, declared if current is None else None)
        try:
            node[parts[-1]] = value
        except TypeError as e:  # ml_collections keeps each field's type; name the key and the expected type
            raise TypeError(f"config key {dotted!r}: {raw!r} parses as {type(value).__name__}; valid: a value of "
                            f"type {declared.__name__}") from e


def shapes_tiny(c: ml_collections.ConfigDict) -> None:
    """Sets the CPU demo's data, towers and schedule (`configs/clip.py:tiny`) on `c`; each method's `tiny` starts
    from it and edits what differs, so the tiny figures of all methods compare at equal steps and dims.

    Calibrated on a 2-core CPU: 1600 steps at batch 128 in a few minutes, zero-shot top-1 ~0.97 for CLIP. Optimizer
    steps matter more than width here, so the towers are narrow and the text tower is one layer (shapes captions
    are <= 10 tokens)."""
    c.total_steps = 1600
    c.batch_size = 128
    c.data.image_size = 32
    c.data.max_text_len = 12
    c.data.read_threads = 1  # generation is GIL-bound: one background thread is fastest in-process
    c.data.synthetic_caption_prob = 0.75
    c.model.image.update(width=96, depth=4, mlp_dim=384, num_heads=4, patch_size=8)
    c.model.text.update(width=96, depth=1, mlp_dim=384, num_heads=4)
    c.model.embed_dim = 96
    c.optim.update(lr=2e-3, warmup_steps=150, weight_decay=0.05)
    c.log_every, c.eval_every, c.checkpoint_every = 100, 400, 400


def parse_arg(arg: str | None, variants: tuple[str, ...]) -> tuple[str, dict[str, str]]:
    """`"tiny,total_steps=50"` -> ("tiny", {"total_steps": "50"}); the variant must be one of `variants`."""
    variant, overrides = variants[0], {}
    for item in filter(None, (arg or "").split(",")):
        if "=" in item:
            key, value = item.split("=", 1)
            overrides[key.strip()] = value.strip()
        else:
            variant = item.strip()
    if variant not in variants:
        raise ValueError(f"unknown config variant {variant!r}; valid: {list(variants)}")
    return variant, overrides


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"invalid config: {message}")


def parse_mixture(mixture: tuple[str, ...]) -> list[tuple[str, float]]:
    """("<spec>=<weight>", ...) -> [(spec, weight), ...]; a bad entry names the expected form."""
    out = []
    for entry in mixture:
        spec, sep, weight = str(entry).rpartition("=")
        try:
            value = float(weight)
        except ValueError:
            value = None
        _check(bool(sep) and bool(spec) and value is not None and value > 0,
               f"data.mixture entry {entry!r} is not '<source spec>=<weight > 0>' (e.g. 'arrayrecord:/data/cc3m=3')")
        out.append((spec, value))
    return out


def _check_data_sources(data: ml_collections.ConfigDict) -> None:
    from vlp.data import sources

    train_specs = [spec for spec, _ in parse_mixture(data.mixture)] or [data.source]
    for key, spec in [("data.source", data.source)] + [("data.mixture", s) for s in train_specs if data.mixture]:
        try:
            sources.check_spec(spec)
        except ValueError as e:
            raise ValueError(f"invalid config: {key}={spec!r}: {e}") from e
    for spec in train_specs:
        splits = sources.split_names(spec)
        _check(splits is None or data.train_split in splits,
               f"data.train_split={data.train_split!r} is not a split of {spec!r}; valid: {list(splits or ())}")
        _check(data.train_caption != "synthetic" or sources.has_synthetic_captions(spec, data.train_split),
               f"data.train_caption='synthetic' but {spec!r} has no synthetic captions (write them with a "
               "caption_synthetic column in tools/make_shards.py); valid here: 'noisy' or 'both' (falls back to the "
               "main caption)")
    scale = tuple(data.random_crop_scale)
    _check(len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1,
           f"data.random_crop_scale={scale} must be (low, high) with 0 < low <= high <= 1")


INIT_FROM_FORMATS = ("vlp", "safetensors", "hf", "open_clip")

# Keys that were removed because what they set moved elsewhere: a config (file, override or saved config.json) that
# still sets one fails with the way to say it now, instead of an unknown-key list.
_TO_REFERENCE = ("the frozen model is now the run's reference model: set reference.path (a vlp workdir, or an export "
                 "folder/file) and reference.format (one of " + str(INIT_FROM_FORMATS) + "; 'vlp' for a workdir)")
MOVED_KEYS = {
    "mim.teacher_workdir": "EVA's teacher moved: " + _TO_REFERENCE,
    "mim.teacher_config": "EVA's teacher moved: " + _TO_REFERENCE + "; its config is recorded as reference.config",
    "prompt.clip_workdir": "the prompt objective's frozen CLIP moved: " + _TO_REFERENCE,
    "prompt.clip_config": ("the prompt objective's frozen CLIP moved: " + _TO_REFERENCE
                           + "; its config is recorded as reference.config"),
}


def moved_key_error(dotted: str, where: str) -> KeyError | None:
    """The error for a removed key `dotted` that a config still sets (None if the key was not moved)."""
    if dotted not in MOVED_KEYS:
        return None
    return KeyError(f"{where} sets {dotted!r}, which no longer exists: {MOVED_KEYS[dotted]}")


def check_init_from(init_from: ml_collections.ConfigDict, name: str = "init_from") -> None:
    """Checks an `init_from`-like block (also `reference`): a known format and a path that exists."""
    fmt, path = init_from.format, init_from.path
    _check(fmt in INIT_FROM_FORMATS, f"{name}.format={fmt!r}; valid: {INIT_FROM_FORMATS}")
    if not path:
        return
    if fmt == "vlp":
        _check(epath.Path(path).is_dir(), f"{name}.path={path!r} is not a directory; give a vlp workdir (or "
                                          "its checkpoints/)")
    elif fmt == "open_clip":
        _check(Path(path).exists(), f"{name}.path={path!r} does not exist; give an open_clip state dict file "
                                    "(.pt/.bin/.safetensors) or the folder tools/export.py --format=open_clip wrote")
    else:
        _check(Path(path).exists(), f"{name}.path={path!r} does not exist; give the folder (or "
                                    f"model.safetensors) that tools/export.py --format={fmt} wrote")


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks values that do not depend on the devices (the trainer checks mesh and batch divisibility)."""
    from vlp.data import sources
    from vlp.data.transforms import CAPTION_CHOICES
    from vlp.eval import EVALUATORS
    from vlp.losses.contrastive import LOSS_VARIANTS
    from vlp.models import layers, text, vit
    from vlp.objectives import available_objectives, get_objective
    from vlp.train import accumulation

    _check(config.objective in available_objectives(),
           f"objective={config.objective!r}; valid: {available_objectives()}")
    for key in ("total_steps", "batch_size", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
        _check(isinstance(config[key], int) and config[key] > 0, f"{key}={config[key]!r} must be a positive integer")
    _check(config.optim.lr > 0, f"optim.lr={config.optim.lr} must be > 0")
    _check(0 <= config.optim.warmup_steps < config.total_steps,
           f"optim.warmup_steps={config.optim.warmup_steps} must be in [0, total_steps={config.total_steps})")
    _check(config.optim.weight_decay >= 0, f"optim.weight_decay={config.optim.weight_decay} must be >= 0")
    clip = config.optim.grad_clip_norm
    _check(clip is None or (isinstance(clip, (int, float)) and clip >= 0),
           f"optim.grad_clip_norm={clip!r} must be >= 0 (0 or None: no clipping)")
    for pattern in config.optim.freeze:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as e:
            raise ValueError(f"invalid config: optim.freeze entry {pattern!r} is not a regular expression ({e}); "
                             "valid: e.g. 'image/.*'") from e
    _check(0 <= config.loss.label_smoothing < 1, f"loss.label_smoothing={config.loss.label_smoothing} not in [0, 1)")
    variants = sorted(LOSS_VARIANTS["softmax"])
    _check(config.loss.variant in variants, f"loss.variant={config.loss.variant!r}; valid: {variants}")
    _check_data_sources(config.data)
    _check(config.data.train_caption in CAPTION_CHOICES,
           f"data.train_caption={config.data.train_caption!r}; valid: {CAPTION_CHOICES}")
    _check(0 <= config.data.synthetic_caption_prob <= 1,
           f"data.synthetic_caption_prob={config.data.synthetic_caption_prob} must be in [0, 1]")
    _check(config.data.max_text_len >= 2, f"data.max_text_len={config.data.max_text_len} must be >= 2")
    vocab_size = config.model.text.vocab_size
    _check(vocab_size is None or (isinstance(vocab_size, int) and vocab_size > 0),
           f"model.text.vocab_size={vocab_size!r} must be unset or a positive integer")
    _check(config.data.worker_count >= 0, f"data.worker_count={config.data.worker_count} must be >= 0")
    _check(0 <= config.data.max_bad_record_share <= 1,
           f"data.max_bad_record_share={config.data.max_bad_record_share} must be in [0, 1]")
    _check(config.data.bad_record_window >= 1,
           f"data.bad_record_window={config.data.bad_record_window} must be >= 1 (reads)")
    _check(config.precision.compute_dtype in COMPUTE_DTYPES,
           f"precision.compute_dtype={config.precision.compute_dtype!r}; valid: {COMPUTE_DTYPES}")
    _check(isinstance(config.accumulation.steps, int) and config.accumulation.steps >= 1,
           f"accumulation.steps={config.accumulation.steps!r} must be a positive integer")
    _check(config.accumulation.mode in accumulation.MODES,
           f"accumulation.mode={config.accumulation.mode!r}; valid: {accumulation.MODES}")
    _check(config.nan_policy in NAN_POLICIES, f"nan_policy={config.nan_policy!r}; valid: {NAN_POLICIES}")
    _check(config.on_checkpoint_error in ON_CHECKPOINT_ERROR,
           f"on_checkpoint_error={config.on_checkpoint_error!r}; valid: {ON_CHECKPOINT_ERROR}")
    _check(config.on_unrestorable_checkpoint in ON_UNRESTORABLE,
           f"on_unrestorable_checkpoint={config.on_unrestorable_checkpoint!r}; valid: {ON_UNRESTORABLE}")
    check_init_from(config.init_from)
    # A started run has recorded its reference's config: evaluating or exporting it must not need the reference
    # (a resume still does, and the loading names a missing one).
    check_init_from(config.reference if not config.reference.config else
                    ml_collections.ConfigDict(dict(format=config.reference.format, path="")), "reference")
    _check(isinstance(config.allow_data_change, bool),
           f"allow_data_change={config.allow_data_change!r}; valid: True or False")
    _validate_watchdog(config.watchdog)
    image = config.model.image
    patch_size = image.patch_size
    if image.variant:
        try:
            patch_size = vit.vit_shape(image.variant).patch_size
        except ValueError as e:
            raise ValueError(f"invalid config: model.image.variant={image.variant!r}: {e}") from e
    size = config.data.image_size
    _check(size > 0, f"data.image_size={size} must be a positive integer")
    patch_key = f"variant={image.variant!r}" if image.variant else f"patch_size={patch_size}"
    _check(patch_size > 0 and size % patch_size == 0,
           f"model.image.{patch_key}: patch size {patch_size} does not divide data.image_size={size}; valid patch "
           f"sizes for this image size: {[p for p in range(1, size + 1) if size % p == 0]}")
    _check(image.pool in vit.POOLINGS, f"model.image.pool={image.pool!r}; valid: {vit.POOLINGS}")
    _validate_patch_dropout(config)
    try:
        layers.resolve_attention(config.model.attention, layers.attention_backend(), config.precision.compute_dtype)
    except ValueError as e:
        raise ValueError(f"invalid config: model.attention={config.model.attention!r}: {e}") from e
    _check(config.model.text.pool in text.TEXT_POOLINGS,
           f"model.text.pool={config.model.text.pool!r}; valid: {text.TEXT_POOLINGS}")
    _check(config.model.remat_policy in layers.REMAT_POLICIES,
           f"model.remat_policy={config.model.remat_policy!r}; valid: {layers.REMAT_POLICIES}")
    _check(isinstance(config.model.scan_layers, bool),
           f"model.scan_layers={config.model.scan_layers!r}; valid: True or False")
    _check(config.model.activation in layers.ACTIVATIONS,
           f"model.activation={config.model.activation!r}; valid: {sorted(layers.ACTIVATIONS)}")
    _check(not config.data.tokenizer or Path(config.data.tokenizer).is_file(),
           f"data.tokenizer={config.data.tokenizer!r} is not a file; valid: a SentencePiece .model file (e.g. from "
           "tools/train_tokenizer.py), a Hugging Face tokenizer.json, or '' for the bundled shapes tokenizer")
    _validate_mim(config)
    get_objective(config.objective).validate_config(config)
    for name, ev in config.evals.items():
        _check("type" in ev, f"evals.{name} has no 'type'; valid: {sorted(EVALUATORS)}")
        _check(ev.type in EVALUATORS, f"evals.{name}.type={ev.type!r}; valid: {sorted(EVALUATORS)}")
        source_key, source = (f"evals.{name}.source", ev.source) if ev.get("source") else ("data.source",
                                                                                        config.data.source)
        if ev.get("source"):
            try:
                sources.check_spec(ev.source)
            except ValueError as e:
                raise ValueError(f"invalid config: evals.{name}.source={ev.source!r}: {e}") from e
        splits = sources.split_names(source)
        for split_key in ("split", "train_split"):
            if split_key == "split" or split_key in ev:
                _check(splits is None or ev.get(split_key) in splits,
                       f"evals.{name}.{split_key}={ev.get(split_key)!r}; valid splits of {source_key}={source!r}: "
                       f"{list(splits or ())}")
        for key in ("num_examples", "batch_size"):
            value = ev.get(key, 1)
            _check(isinstance(value, int) and value > 0, f"evals.{name}.{key}={value!r} must be a positive integer")
        objective = get_objective(config.objective)
        needs = {"zeroshot": "encode_text", "retrieval": "encode_text", "linear_probe": "encode_image",
                 "knn": "encode_image", "dense": "encode_patches",
                 "captioning": "caption_tokens", "retrieval_itm": "itm_scores", "itm": "itm_scores"}.get(ev.type)
        _check(needs is None or hasattr(objective, needs),
               f"evals.{name}.type={ev.type!r} needs an objective with {needs}; objective={config.objective!r} has "
               f"none (image-only objectives are evaluated with type='dense'; remove evals.{name})")
        if ev.type == "zeroshot" and not ev.get("class_names"):
            try:
                sources.class_names(source)
            except ValueError as e:
                raise ValueError(f"invalid config: evals.{name}.type='zeroshot' needs class names: {e} (or set "
                                 f"evals.{name}.class_names, or remove evals.{name})") from e


def _validate_patch_dropout(config: ml_collections.ConfigDict) -> None:
    image = config.model.image
    rate, until = image.patch_dropout, image.patch_dropout_until_step
    _check(isinstance(rate, (int, float)) and 0 <= rate < 1,
           f"model.image.patch_dropout={rate!r} must be in [0, 1) (the share of patch tokens dropped; FLIP: 0.5)")
    _check(until is None or (isinstance(until, int) and 0 < until <= config.total_steps),
           f"model.image.patch_dropout_until_step={until!r} must be unset or in [1, total_steps="
           f"{config.total_steps}] (the first step trained without patch dropout)")
    _check(until is None or rate > 0,
           f"model.image.patch_dropout_until_step={until} ends a patch dropout that is off "
           f"(model.image.patch_dropout=0.0): set patch_dropout > 0 or unset patch_dropout_until_step")


def _validate_watchdog(watchdog: ml_collections.ConfigDict) -> None:
    _check(isinstance(watchdog.enabled, bool), f"watchdog.enabled={watchdog.enabled!r}; valid: True or False")
    _check(watchdog.factor > 1, f"watchdog.factor={watchdog.factor} must be > 1 (a multiple of the median step time)")
    _check(watchdog.min_seconds >= 0, f"watchdog.min_seconds={watchdog.min_seconds} must be >= 0")
    _check(watchdog.max_step_seconds >= 0,
           f"watchdog.max_step_seconds={watchdog.max_step_seconds} must be >= 0 (0 = no absolute limit)")
    _check(isinstance(watchdog.warmup_steps, int) and watchdog.warmup_steps >= 1,
           f"watchdog.warmup_steps={watchdog.warmup_steps!r} must be a positive integer")


def _validate_mim(config: ml_collections.ConfigDict) -> None:
    from vlp.data.masking import MASK_KINDS

    mim, distill = config.mim, config.distill
    _check(mim.mask_kind in MASK_KINDS, f"mim.mask_kind={mim.mask_kind!r}; valid: {MASK_KINDS}")
    _check(0 <= mim.mask_ratio < 1, f"mim.mask_ratio={mim.mask_ratio} must be in [0, 1)")
    _check(isinstance(mim.min_block, int) and mim.min_block >= 1, f"mim.min_block={mim.min_block!r} must be >= 1")
    _check(0 <= mim.masked_image_fraction <= 1,
           f"mim.masked_image_fraction={mim.masked_image_fraction} must be in [0, 1]")
    for key in ("decoder_width", "decoder_depth", "decoder_heads", "decoder_mlp_dim"):
        _check(isinstance(mim[key], int) and mim[key] > 0, f"mim.{key}={mim[key]!r} must be a positive integer")
    _check(mim.decoder_width % mim.decoder_heads == 0 and mim.decoder_width % 4 == 0,
           f"mim.decoder_width={mim.decoder_width} must be divisible by 4 and by mim.decoder_heads="
           f"{mim.decoder_heads}")
    _check(mim.teacher_features in ("aligned", "patch_tokens"),
           f"mim.teacher_features={mim.teacher_features!r}; valid: ('aligned', 'patch_tokens')")
    for key in ("num_prototypes", "head_hidden", "head_bottleneck", "head_layers"):
        _check(isinstance(distill[key], int) and distill[key] > 0,
               f"distill.{key}={distill[key]!r} must be a positive integer")
    for key in ("student_temp", "teacher_temp", "teacher_temp_start"):
        _check(distill[key] > 0, f"distill.{key}={distill[key]} must be > 0")
    for key in ("center_momentum", "ema_momentum", "ema_momentum_final"):
        _check(0 <= distill[key] <= 1, f"distill.{key}={distill[key]} must be in [0, 1]")
    _check(config.tips.contrastive_view in ("masked", "unmasked"),
           f"tips.contrastive_view={config.tips.contrastive_view!r}; valid: ('masked', 'unmasked')")


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def _lists_to_tuples(value: Any) -> Any:
    return tuple(_lists_to_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _match_types(template: Any, value: Any) -> Any:
    """JSON turns tuples into lists and whole floats into ints; give the saved values their config types back."""
    if isinstance(template, tuple) and isinstance(value, list):
        return _lists_to_tuples(value)
    if isinstance(template, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _migrate_remat(values: dict) -> dict:
    """Configs saved before model.remat_policy had a boolean model.image.remat / model.text.remat: either one
    True becomes remat_policy="full" (the same numbers; both towers now recompute their blocks)."""
    model = values.get("model")
    if not isinstance(model, dict):
        return values
    towers = [t for t in ("image", "text") if isinstance(model.get(t), dict) and "remat" in model[t]]
    if not towers:
        return values
    model = dict(model)
    flags = [model[t]["remat"] for t in towers]
    for t in towers:
        model[t] = {k: v for k, v in model[t].items() if k != "remat"}
    model.setdefault("remat_policy", "full" if any(flags) else "none")
    return dict(values, model=model)


def _update_locked(config: ml_collections.ConfigDict, values: dict, prefix: str = "") -> None:
    if not prefix:
        values = _migrate_remat(values)
    for key, value in values.items():
        if not prefix and key == "init_from" and isinstance(value, str):  # configs saved before init_from.format
            value = {"format": "vlp", "path": value}
        if key not in config:
            if prefix + key in MOVED_KEYS and value in ("", None):  # saved before the move, unset: nothing moves
                continue
            if moved := moved_key_error(prefix + key, "the saved config"):
                raise moved
            raise KeyError(f"unknown config key {prefix + key!r} in the saved config; valid: {sorted(config.keys())}")
        if isinstance(config[key], ml_collections.ConfigDict) and isinstance(value, dict):
            if key == "evals":  # evaluator entries are free-form: replace them whole
                with config.unlocked():
                    config[key] = ml_collections.ConfigDict(value)
            else:
                _update_locked(config[key], value, f"{prefix}{key}.")
        else:
            config[key] = _match_types(config[key], value)


def from_dict(values: dict) -> ml_collections.ConfigDict:
    """Rebuilds a locked config from a plain dict (e.g. a workdir's config.json) over the base config."""
    config = base_config()
    config.lock()
    _update_locked(config, values)
    return config


def load_json(path: epath.PathLike) -> ml_collections.ConfigDict:
    path = epath.Path(path)  # a workdir may be a URL (gs://...)
    if not path.is_file():
        raise FileNotFoundError(f"no config at {path}: is this a vlp workdir? (each run writes config.json)")
    return from_dict(json.loads(path.read_text()))


def _config_module(path: Path) -> Any:
    """The config file at `path`, executed as a module (config files are loaded by path, not as a package)."""
    import importlib.util

    module_spec = importlib.util.spec_from_file_location(f"vlp_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def sibling_config_module(config_file: str, name: str) -> Any:
    """The config file `name` beside `config_file` as a module, so one method's config can start from another's
    (e.g. `sibling_config_module(__file__, "clip.py").get_config("tiny")`)."""
    return _config_module(Path(config_file).with_name(name))


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """`"configs/clip.py:tiny,total_steps=5"` -> the file's get_config(arg), locked."""
    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise FileNotFoundError(f"config file {path!r} not found (expected e.g. configs/clip.py:tiny)")
    config = _config_module(Path(path)).get_config(arg or None)
    unknown = unknown_keys(config, base_config())
    for key in unknown:
        if moved := moved_key_error(key, f"config file {path!r}"):
            raise moved
    if unknown:
        raise KeyError(f"config file {path!r} sets keys that base_config() does not have: {unknown}; a method config "
                       f"may only change existing keys (see vlp/config.py:base_config), or the key was renamed")
    config.lock()
    return config


def unknown_keys(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict,
                 prefix: str = "") -> list[str]:
    """Dotted keys of `config` that `reference` lacks (`evals` entries are free-form and not compared). A method config
    edits an unlocked base config, so a misspelt or removed key would otherwise be added silently and ignored."""
    unknown = []
    for key in config.keys():
        if key not in reference:
            unknown.append(prefix + key)
        elif (key != "evals" or prefix) and isinstance(config[key], ml_collections.ConfigDict) \
                and isinstance(reference[key], ml_collections.ConfigDict):
            unknown += unknown_keys(config[key], reference[key], f"{prefix}{key}.")
    return unknown


def parse_overrides(items: list[str] | None) -> dict[str, str]:
    """["optim.lr=1e-3", ...] -> {"optim.lr": "1e-3"}."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not KEY=VALUE (e.g. evals.zeroshot.num_examples=500)")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out
