#!/usr/bin/env python
"""Import Hugging Face (CLIPModel / SiglipModel) or open_clip weights into vlp's own format.

  python tools/import.py --format=hf --path=path/to/hf_folder --out=imported/x
  python tools/import.py --format=open_clip --path=path/to/open_clip_folder --out=imported/x

Writes <out>/model.safetensors + model_config.json (what tools/export.py --format=safetensors writes) and prints
the vlp config keys that build the checkpoint's architecture. Train from it with those keys and
`--config.init_from.format=safetensors --config.init_from.path=<out>`, or skip this tool and point
`init_from.format=hf|open_clip` at the checkpoint itself. Give `--config` to check the import against a config
(and to pick its tokenizer); the default is the base config with the checkpoint's keys.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

FORMATS = ("hf", "open_clip")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", required=True, choices=FORMATS, help="checkpoint format")
    parser.add_argument("--path", required=True, help="Hugging Face folder, open_clip folder or state dict file")
    parser.add_argument("--out", required=True, help="output directory (vlp safetensors)")
    parser.add_argument("--config", default=None, help="config file[:arg] to import into (default: base config)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set data.tokenizer=path/spiece.model (repeatable)")
    args = parser.parse_args(argv)

    import jax

    from _common import quiet_library_logs
    from vlp import config as vlp_config
    from vlp.export.load import checkpoint_overrides, load_flat_params, model_spec
    from vlp.export.safetensors_io import save_safetensors, unflatten_params
    from vlp.objectives import get_objective
    from vlp.parallel.sharding import strip_boxes
    from vlp.train.init_from import apply_checkpoint_overrides

    quiet_library_logs()
    config = vlp_config.load_config_file(args.config) if args.config else vlp_config.base_config()
    overrides = checkpoint_overrides(args.format, args.path)
    if not overrides:
        raise SystemExit(f"{args.path} has no model config (open_clip_config.json); give --config with the "
                         "architecture, or use init_from.format=open_clip in a run whose config describes it")
    apply_checkpoint_overrides(config, overrides)
    vlp_config.apply_overrides(config, vlp_config.parse_overrides(args.set))
    objective = get_objective(config.objective)(config)
    abstract = strip_boxes(jax.eval_shape(objective.init, jax.random.key(0)))
    from flax import traverse_util

    expected = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract, sep="/").items()}
    spec = model_spec(objective.model, config.data.image_size)
    flat = load_flat_params(args.format, args.path, spec, expected)
    model_config = dict(objective.model_config(), source=str(Path(args.path).absolute()), source_format=args.format)
    weights, _ = save_safetensors(unflatten_params(flat), model_config, args.out)
    keys = " ".join(f"--config.{k}={v}" for k, v in overrides.items() if v is not None and k != "objective")
    print(json.dumps({"weights": str(weights), "parameters": int(sum(v.size for v in flat.values())),
                      "objective": config.objective, "config_overrides": overrides}, default=str))
    print(f"train from it: python -m vlp.train --config=configs/{config.objective}.py:tiny {keys} "
          f"--config.init_from.format=safetensors --config.init_from.path={args.out} --workdir=...")
    return weights


if __name__ == "__main__":
    main()
