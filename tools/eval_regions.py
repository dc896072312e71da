#!/usr/bin/env python
"""Region-level zero-shot of a two-tower run (CLIM's measure): validation images in s x s mosaics, each cell
classified from its RoIAlign region embedding of the dense map (last block on its value path).

  python tools/eval_regions.py --workdir=runs/clip [--s=2] [--num_examples=2000] [--split=validation]

Prints one JSON line: region_zeroshot_s<s>_top1/top5 and image_zeroshot_top1 (the same images encoded whole).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_config_args, quiet_library_logs, resolve_config  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--step", type=int, default=None)
    parser.add_argument("--split", default="validation")
    parser.add_argument("--s", type=int, default=2, help="mosaic side: s x s images per mosaic")
    parser.add_argument("--num_examples", type=int, default=2000)
    args = parser.parse_args(argv)
    quiet_library_logs()

    from vlp.eval.regions import region_zero_shot
    from vlp.objectives.two_tower import TwoTowerObjective
    from vlp.train.restore import restore_run

    config = resolve_config(args)
    exp, step, state = restore_run(args.workdir, config=config, step=args.step)
    if not isinstance(exp.objective, TwoTowerObjective):
        raise ValueError(f"region zero-shot needs a two-tower run (clip, align, clim, ...); {args.workdir} trains "
                         f"{config.objective!r}")
    with exp.context():
        out = region_zero_shot(exp.objective.model, state.params,
                               lambda texts: exp.objective.tokenizer.encode(texts, config.data.max_text_len),
                               data_source=config.data.source,
                               split=args.split, image_size=config.data.image_size, num_examples=args.num_examples,
                               s=args.s)
    out["step"] = step
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
