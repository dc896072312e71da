#!/usr/bin/env python
"""Export a run's params for use elsewhere.

  python tools/export.py --workdir=runs/x --format=safetensors --out=exported/x [--step=N]
  python tools/export.py --workdir=runs/x --format=hf --out=exported/x_hf
  python tools/export.py --workdir=runs/x --format=open_clip --out=exported/x_open_clip

`safetensors`: <out>/model.safetensors (flat `/`-joined parameter names, fp32) and <out>/model_config.json
(objective, model options, tokenizer ids, image size, source step); `init_from.format=safetensors` reads it.
`hf`: a transformers folder: CLIPModel (CLS-pooled, causal text: configs/clip.py) or SiglipModel (MAP-pooled:
configs/siglip.py), with config.json, model.safetensors, preprocessor_config.json, and the run's sentencepiece
tokenizer as spiece.model (see TOKENIZER.md there: it is not the CLIP BPE tokenizer).
`open_clip`: open_clip_config.json + open_clip_model.safetensors, for open_clip.create_model("local-dir:<out>"):
a CLIP, or a CoCa trained with coca.layout='open_clip' (its token ids are stored as `vlp_tokens` in the json: pass
them to `model.generate(..., sot_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id)`).
A model using an option the target cannot represent is refused with the option named.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_config_args, quiet_library_logs, resolve_config  # noqa: E402

FORMATS = ("safetensors", "hf", "open_clip")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--format", default="safetensors", choices=FORMATS, help="output format")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest good one)")
    args = parser.parse_args(argv)
    quiet_library_logs()

    import jax

    from vlp.export import interop
    from vlp.export.common import ExportError
    from vlp.export.common import ModelSpec
    from vlp.export.load import model_spec
    from vlp.export.safetensors_io import flatten_params, save_safetensors
    from vlp.train.restore import restore_run

    exp, step, state = restore_run(args.workdir, config=resolve_config(args), step=args.step)
    params = jax.tree.map(np.asarray, jax.device_get(state.params))
    count = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params))
    if args.format == "safetensors":
        model_config = dict(exp.objective.model_config(), step=step, source_workdir=str(Path(args.workdir).absolute()))
        weights, _ = save_safetensors(params, model_config, args.out)
    else:
        spec = model_spec(getattr(exp.objective, "model", None), exp.config.data.image_size)
        if spec is None or (args.format == "hf" and not isinstance(spec, ModelSpec)):
            raise SystemExit(f"--format={args.format} exports two-tower models (clip, siglip, align)"
                             f"{' and CoCa' if args.format == 'open_clip' else ''}; objective "
                             f"{exp.config.objective!r} is not one; use --format=safetensors")
        try:
            if args.format == "hf":
                tokenizer = getattr(exp.objective.tokenizer, "_model_proto", None)
                out = interop.write_hf(flatten_params(params), spec, args.out, tokenizer, exp.config.data.max_text_len)
                weights = out / "model.safetensors"
                if hasattr(exp.objective.tokenizer, "_json"):  # a Hugging Face tokenizer.json: ship it as is
                    (out / "tokenizer.json").write_text(exp.objective.tokenizer._json, encoding="utf-8")
            else:
                tok = exp.objective.tokenizer
                tokens = ({"bos_id": exp.config.coca.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id}
                          if exp.config.objective == "coca" else None)
                out = interop.write_open_clip(flatten_params(params), spec, args.out, tokens)
                weights = out / "open_clip_model.safetensors"
        except ExportError as e:
            raise SystemExit(f"cannot export {args.workdir} as {args.format}: {e}") from e
    print(json.dumps({"format": args.format, "weights": str(weights), "step": step, "parameters": count}))
    return weights


if __name__ == "__main__":
    main()
