"""Evaluators by name. Each is built from encoder functions and plain values through
`Evaluator.build(encoders, name=..., data_source=..., split=..., image_size=..., num_examples=..., **options)` and
has `run(params) -> dict` with flat keys `<name>_<metric>`. The trainer and tools/eval.py build them from
`config.evals` without knowing which exist: a new evaluator is one module plus one entry here."""

from vlp.eval.dense import DenseEvaluator
from vlp.eval.retrieval import RetrievalEvaluator
from vlp.eval.zero_shot import ZeroShotEvaluator

EVALUATORS = {"zeroshot": ZeroShotEvaluator, "retrieval": RetrievalEvaluator, "dense": DenseEvaluator}
