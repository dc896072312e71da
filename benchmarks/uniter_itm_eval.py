#!/usr/bin/env python
"""ITM-head figures of a trained UNITER workdir on a labelled source (shapes by default), as one JSON line.

UNITER has no separate towers, so every figure scores (image, text) pairs with the ITM head, P(match), one joint
pass per pair:
- `zeroshot_top1`: each image's class = the class whose prompts get the highest mean P(match) (`--zeroshot_images`
  images x every class x its prompt ensemble);
- `itm_accuracy`: argmax of the ITM head on each image with its own caption (positive) and with the caption of the
  next image in the set (negative; pairs whose captions are equal are dropped);
- `i2t_r1`, `t2i_r1` (and R@5): retrieval on a gallery of `--gallery` images and their captions, ranked by P(match),
  with the rule of vlp.eval.retrieval (a caption equal to the image's own counts as a hit).
`--clip_workdir` also reports a two-tower (clip, siglip, ...) workdir's zero-shot top-1 and R@1/5 on the same images
and gallery, by its embeddings, so the two compare on equal sets.

  python benchmarks/uniter_itm_eval.py --workdir=RUN [--clip_workdir=RUN] [--gallery 100] [--zeroshot_images 100]
      [--max_prompts 4]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def pair_scores(objective, params, images: np.ndarray, tokens: np.ndarray, pairs_per_call: int = 4096) -> np.ndarray:
    """P(match) [I, T] of every image with every text, in chunks of images."""
    import jax
    import jax.numpy as jnp

    fn = jax.jit(objective.itm_scores)
    rows = max(1, pairs_per_call // len(tokens))
    return np.concatenate([np.asarray(fn(params, jnp.asarray(images[i:i + rows]), jnp.asarray(tokens)))
                           for i in range(0, len(images), rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--clip_workdir", default=None)
    parser.add_argument("--split", default="validation")
    parser.add_argument("--gallery", type=int, default=100)
    parser.add_argument("--zeroshot_images", type=int, default=100)
    parser.add_argument("--itm_pairs", type=int, default=500)
    parser.add_argument("--caption", default="synthetic")
    parser.add_argument("--max_prompts", type=int, default=0,
                        help="the last N prompts of each class (shapes: its 4 noisy-style ones); 0 = all")
    args = parser.parse_args()
    # Imported after parsing: jax and vlp take seconds to import, and `--help` needs neither.
    import jax
    import jax.numpy as jnp

    from vlp.data import pipeline, sources
    from vlp.eval.retrieval import recall_at_k
    from vlp.eval.zero_shot import class_embeddings, class_prompt_lists
    from vlp.train.restore import restore_run

    exp, step, state = restore_run(args.workdir)
    config, objective = exp.config, exp.objective
    source = sources.make_source(config.data.source, args.split, config.data.image_size)
    count = max(args.gallery, args.zeroshot_images, args.itm_pairs + 1)
    eval_set = pipeline.load_eval_set(source, count)
    captions = [str(c) for c in eval_set.captions[args.caption]]
    tokenize = lambda texts: objective.tokenizer.encode(texts, config.data.max_text_len)  # noqa: E731
    out = {"workdir": args.workdir, "step": step}
    start = time.perf_counter()
    with exp.context():
        params = state.params
        # zero-shot by ITM: mean P(match) over each class's prompt ensemble
        prompts = [p[-args.max_prompts:] if args.max_prompts else p for p in class_prompt_lists(config.data.source)]
        flat = [p for ps in prompts for p in ps]
        scores = pair_scores(objective, params, eval_set.images[:args.zeroshot_images], tokenize(flat))
        bounds = np.cumsum([0] + [len(p) for p in prompts])
        per_class = np.stack([scores[:, a:b].mean(1) for a, b in zip(bounds[:-1], bounds[1:])], axis=1)
        out["zeroshot_top1"] = float((per_class.argmax(1) == eval_set.labels[:args.zeroshot_images]).mean())
        # ITM accuracy: own caption vs the next image's caption
        n = args.itm_pairs
        fn = jax.jit(lambda p, im, tx: objective.itm_scores_paired(p, im, tx))
        own, other = captions[:n], captions[1:n + 1]
        keep = np.asarray([a != b for a, b in zip(own, other)])
        pos = np.asarray(fn(params, jnp.asarray(eval_set.images[:n]), jnp.asarray(tokenize(own))))
        neg = np.asarray(fn(params, jnp.asarray(eval_set.images[:n]), jnp.asarray(tokenize(other))))
        out["itm_accuracy"] = float(np.concatenate([pos > 0.5, (neg <= 0.5)[keep]]).mean())
        # retrieval by ITM over the gallery: recall_at_k ranks image_emb @ text_emb.T, so S @ I = S
        g = args.gallery
        scores = pair_scores(objective, params, eval_set.images[:g], tokenize(captions[:g]))
        recall = recall_at_k(scores, np.eye(g, dtype=np.float32), captions[:g], ks=(1, 5))
        out.update({f"itm_{k}": v for k, v in recall.items()})
    out["eval_seconds"] = round(time.perf_counter() - start, 1)
    if args.clip_workdir:
        cexp, cstep, cstate = restore_run(args.clip_workdir)
        with cexp.context():
            cobj = cexp.objective
            image_emb = np.asarray(jax.jit(cobj.encode_image)(cstate.params, jnp.asarray(eval_set.images[:count])))
            encode_text = jax.jit(cobj.encode_text)
            ctokenize = lambda texts: cobj.tokenizer.encode(texts, cexp.config.data.max_text_len)  # noqa: E731
            text_emb = np.asarray(encode_text(cstate.params, jnp.asarray(ctokenize(captions[:g]))))
            prompt_emb = np.asarray(encode_text(cstate.params, jnp.asarray(ctokenize(flat))))
        class_emb = class_embeddings(prompt_emb, [len(p) for p in prompts])
        zs = (image_emb[:args.zeroshot_images] @ class_emb.T).argmax(1) == eval_set.labels[:args.zeroshot_images]
        out["clip"] = {"workdir": args.clip_workdir, "step": cstep, "zeroshot_top1": float(zs.mean()),
                       **recall_at_k(image_emb[:g], text_emb, captions[:g], ks=(1, 5))}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
