#!/usr/bin/env python
"""Export a run's params.

  python tools/export.py --workdir=runs/x --format=safetensors --out=exported/x [--step=N]

`safetensors`: <out>/model.safetensors (flat `/`-joined parameter names, fp32) and <out>/model_config.json
(objective, model options, tokenizer ids, image size, source step). Hugging Face and open_clip formats are
added by the interop module.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_config_args, quiet_library_logs, resolve_config  # noqa: E402

FORMATS = ("safetensors",)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--format", default="safetensors", choices=FORMATS, help="output format")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest good one)")
    args = parser.parse_args(argv)
    quiet_library_logs()

    import jax

    from vlp.export.safetensors_io import save_safetensors
    from vlp.train.restore import restore_run

    exp, step, state = restore_run(args.workdir, config=resolve_config(args), step=args.step)
    params = jax.tree.map(np.asarray, jax.device_get(state.params))
    model_config = dict(exp.objective.model_config(), step=step, source_workdir=str(Path(args.workdir).absolute()))
    weights, config_path = save_safetensors(params, model_config, args.out)
    count = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params))
    print(json.dumps({"weights": str(weights), "config": str(config_path), "step": step, "parameters": count}))
    return weights


if __name__ == "__main__":
    main()
