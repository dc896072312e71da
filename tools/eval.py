#!/usr/bin/env python
"""Evaluate a run's checkpoint with the evaluators of its config, or the ones named by --evals.

  python tools/eval.py --workdir=runs/x [--step=N] [--split=test] [--set evals.zeroshot.num_examples=500]
  python tools/eval.py --workdir=runs/x --evals=zeroshot,knn,linear_probe --set evals.knn.num_train=10000
  python tools/eval.py --workdir=runs/clip --evals=zeroshot,retrieval,dense   # + the dense probe (dense_miou)

Evaluators (vlp/eval/): zeroshot (top-1/5 from class names + prompt templates), retrieval (I->T and T->I
R@1/5/10, several captions per image), linear_probe (logistic regression on frozen embeddings, L2 chosen on a
validation split), knn (k = 10, 20, temperature-weighted), dense (a linear segmentation probe on frozen patch
tokens, mIoU). A name in --evals that is not in the config but is an
evaluator type is added with the settings of the config's first evaluator (split, num_examples; dense: the
probe's standard settings); `--set
evals.<name>.<key>=...` then adjusts it (e.g. source=..., train_split=..., class_names=imagenet1k,
templates=clip80). Prints a table, then one JSON line; the JSON goes to <workdir>/eval_<split>_step<N>.json (or
--out).

Cross-model retrieval (backward compatibility, e.g. an XBT run, configs/xbt.py):
  python tools/eval.py --workdir=runs/xbt --gallery_workdir=runs/old_clip [--gallery_step=N]
embeds the retrieval set's queries with --workdir's model and its gallery with --gallery_workdir's model, and
reports retrieval_cross_i2t_r{1,5,10} (the query model's images against the gallery model's captions) and
retrieval_cross_t2i_r{1,5,10} (its captions against the gallery model's images), beside each model's own figures
(retrieval_* and gallery_retrieval_*). It also works for two plain CLIPs of the same embedding width (the figure
before any compatibility training). The retrieval entry of --workdir's config (or a default one) sets the data.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_config_args, quiet_library_logs, resolve_config  # noqa: E402


def add_default_evaluators(config, names: list[str]) -> None:
    """Adds each name that is an evaluator type but not yet in config.evals, with the first entry's settings."""
    from vlp.eval import EVALUATORS

    template = next(iter(config.evals.values()), None)
    with config.unlocked():
        for name in names:
            if name in config.evals or name not in EVALUATORS:
                continue  # unknown names are reported by build_evaluators with the valid ones
            entry = {"type": name, "split": template.split if template else "validation",
                     "num_examples": template.num_examples if template else 1000,
                     "batch_size": template.get("batch_size", 500) if template else 500}
            if name in ("knn", "linear_probe"):
                entry.update(train_split="train", num_train=5000)
            if name == "dense":  # the settings every method's configs use, so mIoU compares across methods
                from vlp.eval.dense import default_eval

                entry = default_eval()
            if name == "captioning":  # greedy, with the decoding keys present so --set can switch to beam search
                from vlp.eval.captioning import default_eval as captioning_eval

                entry = captioning_eval(entry["num_examples"], split=entry["split"])
            config.evals[name] = entry


def cross_model_results(exp, state, gallery_workdir: str, gallery_step: int | None,
                        split: str | None) -> dict[str, float]:
    """Both models' own retrieval figures and the cross-model ones (`exp`'s queries against the gallery run's model)
    on the retrieval set of `exp`'s config (the gallery model reads the same images and captions)."""
    from vlp.eval.retrieval import cross_model_recall
    from vlp.train import evaluation
    from vlp.train.restore import restore_run
    from vlp.train.workdir import load_config

    gallery_config = load_config(gallery_workdir)
    entry = exp.config.evals.retrieval.to_dict()
    entry["source"] = entry.get("source") or exp.config.data.source  # the query run's data, on both sides
    with gallery_config.unlocked():
        gallery_config.evals = {"retrieval": entry}
    gallery_exp, gallery_step, gallery_state = restore_run(gallery_workdir, config=gallery_config, step=gallery_step)
    sides = {}
    for side, (run, run_state) in {"query": (exp, state), "gallery": (gallery_exp, gallery_state)}.items():
        with run.context():
            evaluator = evaluation.build_evaluators(run.config, run.objective, run.mesh, split=split,
                                                    names=["retrieval"])["retrieval"]
            sides[side] = evaluator, evaluator.embed(run.objective.eval_params(run_state.params, run_state.extra))
    (query_eval, query_emb), (gallery_eval, gallery_emb) = sides["query"], sides["gallery"]
    if query_eval.captions != gallery_eval.captions:
        raise ValueError("the query and gallery runs' retrieval sets differ (another tokenizer's text or data "
                         "source): cross-model retrieval needs the same images and captions on both sides")
    prefix = query_eval.name
    results = {"gallery_step": gallery_step}
    for key, value in cross_model_recall(query_emb, gallery_emb, query_eval.captions, query_eval.text_image).items():
        results[f"{prefix}_cross_{key}"] = value
    for key, value in recall_at_k_of(query_eval, query_emb).items():
        results[f"{prefix}_{key}"] = value
    for key, value in recall_at_k_of(gallery_eval, gallery_emb).items():
        results[f"gallery_{prefix}_{key}"] = value
    return results


def recall_at_k_of(evaluator, embeddings) -> dict[str, float]:
    """A retrieval evaluator's own recall@k from its (image_emb, text_emb)."""
    from vlp.eval.retrieval import recall_at_k

    return recall_at_k(*embeddings, evaluator.captions, evaluator.text_image)


def format_table(record: dict) -> str:
    """`metric  value` lines, metrics sorted, fractions with 4 decimals."""
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in record.items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest good one)")
    parser.add_argument("--split", default=None, help="evaluate every evaluator on this split (default: config's)")
    parser.add_argument("--evals", default=None,
                        help="comma-separated evaluator names to run (default: all of config.evals)")
    parser.add_argument("--out", default=None, help="JSON output path")
    parser.add_argument("--gallery_workdir", default=None,
                        help="cross-model retrieval: embed the gallery with this run's model (e.g. the old CLIP) and "
                             "the queries with --workdir's (e.g. an XBT run); runs only the retrieval evaluator")
    parser.add_argument("--gallery_step", type=int, default=None,
                        help="checkpoint step of --gallery_workdir (default: its newest good one)")
    args = parser.parse_args(argv)
    if args.gallery_workdir and args.evals:
        parser.error("--gallery_workdir runs the retrieval evaluator only; drop --evals")
    quiet_library_logs()

    from etils import epath

    from vlp.train import evaluation
    from vlp.train.paths import write_text_atomic
    from vlp.train.restore import restore_run

    names = ["retrieval"] if args.gallery_workdir else (
        [n.strip() for n in args.evals.split(",") if n.strip()] if args.evals else None)
    config = resolve_config(args, prepare=lambda c: add_default_evaluators(c, names or []))
    start = time.perf_counter()
    exp, step, state = restore_run(args.workdir, config=config, step=args.step)
    if args.gallery_workdir:
        results = cross_model_results(exp, state, args.gallery_workdir, args.gallery_step, args.split)
    else:
        with exp.context():
            evaluators = evaluation.build_evaluators(exp.config, exp.objective, exp.mesh, split=args.split,
                                                     names=names)
            results = {}
            for i, (name, evaluator) in enumerate(evaluators.items()):
                print(f"[{i + 1}/{len(evaluators)}] {name} ({time.perf_counter() - start:.0f}s)", file=sys.stderr,
                      flush=True)
                results.update(evaluator.run(exp.objective.eval_params(state.params, state.extra)))
    split = args.split or "config"
    record = {"step": step, "split": split, **dict(sorted(results.items())),
              "eval_seconds": round(time.perf_counter() - start, 2)}
    name = f"eval_cross_{split}_step{step}.json" if args.gallery_workdir else f"eval_{split}_step{step}.json"
    out = epath.Path(args.out) if args.out else epath.Path(args.workdir) / name
    write_text_atomic(out, json.dumps(record, indent=2))
    print(format_table(record))
    print(json.dumps(record), flush=True)
    return record


if __name__ == "__main__":
    from vlp.host_malloc import reexec_with_malloc_tunables

    reexec_with_malloc_tunables()  # on CPU: freed buffers reused, no page faults per step (vlp/host_malloc.py)
    main()
