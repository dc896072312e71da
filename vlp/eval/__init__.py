"""Evaluators by name. Each is built from encoder functions and plain values through
`Evaluator.build(encoders, name=..., data_source=..., split=..., image_size=..., num_examples=..., **options)` and
has `run(params) -> dict` with flat keys `<name>_<metric>`. The trainer and tools/eval.py build them from
`config.evals` without knowing which exist: a new evaluator is one module plus one entry here.

- `zeroshot`: class names + prompt templates (`class_names`, `templates`: bundled sets or files), top-1/top-5.
- `retrieval`: image<->text R@1/5/10 with one or several captions per image (`caption`: a kind or `all`).
- `linear_probe`: L2-regularised logistic regression on frozen image embeddings, strength chosen on a validation
  split (`train_split`, `num_train`, `l2_sweep`).
- `knn`: weighted kNN on frozen image embeddings (`ks`, `temperature`, `train_split`, `num_train`).
- `dense`: a linear segmentation probe on frozen patch tokens (shapes masks), `dense_miou`.
- `signal_zeroshot`: the best of a signal modality's candidates given image and text (Symile; `scoring`).
- `captioning`: CIDEr, BLEU-4 and exact match of generated captions (coca, cappa; `method`, `beams`, ...).
- `retrieval_itm`: retrieval re-ranked by an ITM head (albef, tcl; `k` candidates), beside contrastive-only.
- `itm`: ITM accuracy on held-out positive and negative pairs.
- `attack_success`: backdoor attack success rate of triggered images (`target`, `trigger_size`, `corner`).
"""

from vlp.eval.attack import AttackSuccessEvaluator
from vlp.eval.captioning import CaptioningEvaluator

from vlp.eval.dense import DenseEvaluator
from vlp.eval.itm import ItmEvaluator, RetrievalItmEvaluator
from vlp.eval.knn import KnnEvaluator
from vlp.eval.linear_probe import LinearProbeEvaluator
from vlp.eval.multimodal import SignalZeroShotEvaluator
from vlp.eval.retrieval import RetrievalEvaluator
from vlp.eval.zero_shot import ZeroShotEvaluator

EVALUATORS = {"zeroshot": ZeroShotEvaluator, "retrieval": RetrievalEvaluator, "linear_probe": LinearProbeEvaluator,
              "knn": KnnEvaluator, "dense": DenseEvaluator,
              "captioning": CaptioningEvaluator, "retrieval_itm": RetrievalItmEvaluator, "itm": ItmEvaluator,
              "attack_success": AttackSuccessEvaluator, "signal_zeroshot": SignalZeroShotEvaluator}
