"""Evaluators by name. Each is built from encoder functions and plain arrays and has `run(params) -> dict` with
flat keys `<evaluator>_<metric>`; the trainer and tools/eval.py build them from `config.evals`."""

from vlp.eval.retrieval import RetrievalEvaluator
from vlp.eval.zero_shot import ZeroShotEvaluator

EVALUATORS = {"zeroshot": ZeroShotEvaluator, "retrieval": RetrievalEvaluator}
