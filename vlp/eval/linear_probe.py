"""Linear probe: L2-regularised multinomial logistic regression on frozen image embeddings.

Features are standardised with the train statistics. The regularisation strength is chosen on a held-out 20% of
the train split (a fixed shuffle) from a small log-spaced sweep, then the classifier is refit on the whole train
split and scored on the eval split. The fit is full-batch L-BFGS (optax.lbfgs with its zoom line search) to a
gradient-norm tolerance: the convex problem has one optimum, so the result does not depend on a learning rate.
Yields `<name>_top1`, `<name>_top5` and `<name>_l2` (the chosen strength).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vlp.eval.features import FeatureEvaluator

DEFAULT_L2_SWEEP = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
VALIDATION_FRACTION = 0.2


def regularised_cross_entropy(params: tuple[jax.Array, jax.Array], x: jax.Array, y: jax.Array,
                              l2: jax.Array) -> jax.Array:
    """mean_i CE(x_i W + b, y_i) + l2 / 2 * |W|^2; x [N, D], y [N] int, W [D, C], b [C] (bias unpenalised)."""
    weights, bias = params
    logits = x @ weights + bias
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce + 0.5 * l2 * jnp.sum(weights * weights)


@functools.partial(jax.jit, static_argnames=("num_classes", "max_iter"))
def fit_logistic_regression(x: jax.Array, y: jax.Array, l2: float, *, num_classes: int, max_iter: int = 500,
                            tol: float = 1e-6) -> tuple[jax.Array, jax.Array]:
    """Minimises `regularised_cross_entropy` from zero weights: x [N, D] float32, y [N] -> (W [D, C], b [C])."""
    fun = functools.partial(regularised_cross_entropy, x=x, y=y, l2=l2)
    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(fun)
    params = (jnp.zeros((x.shape[1], num_classes), jnp.float32), jnp.zeros((num_classes,), jnp.float32))

    def step(carry):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=fun)
        return optax.apply_updates(params, updates), state

    def keep_going(carry):
        _, state = carry
        count = optax.tree.get(state, "count")
        return (count == 0) | ((count < max_iter) & (optax.tree.norm(optax.tree.get(state, "grad")) >= tol))

    params, _ = jax.lax.while_loop(keep_going, step, (params, solver.init(params)))
    return params


def topk_hits(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, eval_x: np.ndarray, eval_y: np.ndarray,
                   num_classes: int, l2_sweep: tuple[float, ...] = DEFAULT_L2_SWEEP) -> dict[str, float]:
    """Chooses l2 on a validation split of the train features, refits on all of them, scores eval_x."""
    mean, std = train_x.mean(axis=0), train_x.std(axis=0) + 1e-6
    train_x, eval_x = (train_x - mean) / std, (eval_x - mean) / std
    order = np.random.default_rng(0).permutation(len(train_x))
    num_val = max(1, int(round(VALIDATION_FRACTION * len(train_x))))
    val_idx, fit_idx = order[:num_val], order[num_val:]

    def fit(x, y, l2):
        weights, bias = fit_logistic_regression(jnp.asarray(x), jnp.asarray(y), jnp.float32(l2),
                                                num_classes=num_classes)
        return np.asarray(weights), np.asarray(bias)

    best_l2, best_acc = l2_sweep[0], -1.0
    for l2 in l2_sweep:  # ascending: on a tie the stronger regularisation (later) wins
        weights, bias = fit(train_x[fit_idx], train_y[fit_idx], l2)
        acc = topk_hits(train_x[val_idx] @ weights + bias, train_y[val_idx], 1)
        if acc >= best_acc:
            best_l2, best_acc = l2, acc
    weights, bias = fit(train_x, train_y, best_l2)
    logits = eval_x @ weights + bias
    return {"top1": topk_hits(logits, eval_y, 1), "top5": topk_hits(logits, eval_y, min(5, num_classes)),
            "l2": float(best_l2)}


class LinearProbeEvaluator(FeatureEvaluator):
    """Options: `l2_sweep` (default 1e-6 ... 1e-1), plus FeatureEvaluator's `train_split` and `num_train`."""

    def __init__(self, encoders, train, test, name: str = "linear_probe",
                 l2_sweep: tuple[float, ...] = DEFAULT_L2_SWEEP):
        super().__init__(encoders, train, test, name)
        if not l2_sweep or min(l2_sweep) < 0:
            raise ValueError(f"evals.{name}.l2_sweep={l2_sweep!r}: give one or more strengths >= 0")
        self.l2_sweep = tuple(sorted(float(v) for v in l2_sweep))

    def score(self, train_x, train_y, eval_x, eval_y) -> dict[str, float]:
        return probe_accuracy(train_x, train_y, eval_x, eval_y, self.num_classes, self.l2_sweep)
