"""Backdoor attack success rate (BadNet, CleanCLIP): the share of triggered validation images, among those whose
true class is not the attack's target, that zero-shot classification assigns to the target class."""

from __future__ import annotations

import numpy as np

from vlp.data import backdoor, pipeline, sources
from vlp.data.augment import resize_center_crop
from vlp.data.transforms import normalize_image
from vlp.eval.common import Encoders, Params
from vlp.eval.zero_shot import class_embeddings, class_prompt_lists


def attack_success_rate(image_emb: np.ndarray, class_emb: np.ndarray, target: int) -> float:
    """image_emb [N, D] (triggered images, none of the target class), class_emb [C, D] -> share whose most similar
    class is `target`."""
    return float((np.argmax(image_emb @ class_emb.T, axis=1) == target).mean())


class AttackSuccessEvaluator:
    """Yields `<name>_asr` (attack success rate) and `<name>_clean_top1` (zero-shot top-1 on the same images without
    the trigger, so one evaluator shows both sides of the trade-off)."""

    def __init__(self, encoders: Encoders, clean_images: np.ndarray, triggered_images: np.ndarray,
                 labels: np.ndarray, class_prompts: list[list[str]], target: int, name: str = "attack"):
        self.encoders, self.name, self.target, self.labels = encoders, name, target, labels
        self.clean_images, self.triggered_images = clean_images, triggered_images
        self.prompt_counts = [len(p) for p in class_prompts]
        self.prompt_tokens = encoders.tokenize([p for prompts in class_prompts for p in prompts])

    @classmethod
    def build(cls, encoders: Encoders, *, name: str, data_source: str, split: str, image_size: int,
              num_examples: int, target: str = "purple star", trigger_size: int = 4, corner: str = "lower right",
              **unused) -> "AttackSuccessEvaluator":
        """The first `num_examples` images of a labelled source's split, minus those of class `target`, with and
        without a `trigger_size` px checkerboard in `corner` (vlp.data.backdoor.add_trigger, as tools/poison.py)."""
        names = list(sources.class_names(data_source))
        if target not in names:
            raise ValueError(f"evaluator {name}: target={target!r} is not a class of {data_source}; valid: "
                             f"{names[:5]}...")
        target_label = names.index(target)
        source = sources.make_source(data_source, split, image_size)
        records = [source[i] for i in range(pipeline.eval_set_size(source, num_examples, f"evaluator {name}"))]
        records = [r for r in records if r["label"] != target_label]
        clean = np.stack([resize_center_crop(r["image"], image_size) for r in records])
        triggered = np.stack([backdoor.add_trigger(image, trigger_size, corner) for image in clean])
        return cls(encoders, normalize_image(clean), normalize_image(triggered),
                   np.asarray([r["label"] for r in records], np.int32), class_prompt_lists(data_source),
                   target_label, name=name)

    def run(self, params: Params) -> dict[str, float]:
        class_emb = class_embeddings(self.encoders.encode_text(params, self.prompt_tokens), self.prompt_counts)
        clean = self.encoders.encode_image(params, self.clean_images)
        triggered = self.encoders.encode_image(params, self.triggered_images)
        clean_top1 = float((np.argmax(clean @ class_emb.T, axis=1) == self.labels).mean())
        return {f"{self.name}_asr": attack_success_rate(triggered, class_emb, self.target),
                f"{self.name}_clean_top1": clean_top1}
