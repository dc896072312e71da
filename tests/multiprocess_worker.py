"""One process of a multi-process test, started by tests/test_distributed.py (never collected by pytest).

    python tests/multiprocess_worker.py losses     # sharded contrastive losses vs the single-device reference
    python tests/multiprocess_worker.py dead_peer  # process 1 waits to be killed, process 0 enters a collective

The process layout comes from the environment (VLP_COORDINATOR_ADDRESS, VLP_NUM_PROCESSES, VLP_PROCESS_ID,
JAX_NUM_CPU_DEVICES), as for `python -m vlp.train`. Results are printed as `RESULT <json>` lines.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlp.parallel import distributed  # noqa: E402

BATCH, DIM = 16, 8
LOGIT_SCALE, LOGIT_BIAS, LABEL_SMOOTHING = 10.0, -10.0, 0.1


def global_norm_rel_diff(a, b) -> float:
    import numpy as np

    a, b = np.concatenate([np.ravel(x) for x in a]), np.concatenate([np.ravel(x) for x in b])
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def run_losses() -> None:
    """Loss and gradients of every (kind, variant) on a (data=2, fsdp=2) mesh spanning both processes."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P

    from vlp.losses import contrastive
    from vlp.parallel import mesh as mesh_lib

    mesh = mesh_lib.make_mesh((2, 2, 1))
    rng = np.random.RandomState(0)  # the same embeddings on every process
    image_np, text_np = (x / np.linalg.norm(x, axis=1, keepdims=True)
                         for x in rng.normal(size=(2, BATCH, DIM)).astype(np.float32))
    rows = NamedSharding(mesh, P(mesh_lib.BATCH_AXES))
    image, text = (jax.make_array_from_callback(x.shape, rows, lambda index, x=x: x[index])
                   for x in (image_np, text_np))

    def sharded(kind, variant):
        def loss(img, txt):
            return contrastive.sharded_contrastive_loss(
                kind, img, txt, np.float32(LOGIT_SCALE), np.float32(LOGIT_BIAS), label_smoothing=LABEL_SMOOTHING
                if kind == "softmax" else 0.0, mesh=mesh, batch_axes=mesh_lib.BATCH_AXES, variant=variant)[0]

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

    def reference(kind):
        def loss(img, txt):
            if kind == "softmax":
                return contrastive.softmax_contrastive_loss(img, txt, np.float32(LOGIT_SCALE), LABEL_SMOOTHING)[0]
            return contrastive.sigmoid_contrastive_loss(img, txt, np.float32(LOGIT_SCALE), np.float32(LOGIT_BIAS))[0]

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

    cases = [(kind, variant) for kind in ("softmax", "sigmoid") for variant in contrastive.LOSS_VARIANTS[kind]]
    # Compile everything first, then line the processes up: gloo collectives time out when peers arrive far apart.
    compiled = {case: sharded(*case).lower(image, text).compile() for case in cases}
    multihost_utils.sync_global_devices("losses compiled")
    local = jax.local_devices()[0]
    results = {}
    for kind, variant in cases:
        loss, grads = compiled[kind, variant](image, text)
        grads = [np.asarray(multihost_utils.process_allgather(g, tiled=True)) for g in grads]
        # The single-device reference, on this process's own copy of the whole batch.
        ref_loss, ref_grads = reference(kind)(jax.device_put(image_np, local), jax.device_put(text_np, local))
        results[f"{kind}/{variant}"] = {
            "loss": float(loss), "ref_loss": float(ref_loss),
            "loss_rel_diff": abs(float(loss) - float(ref_loss)) / abs(float(ref_loss)),
            "grad_rel_diff": global_norm_rel_diff(grads, [np.asarray(g) for g in ref_grads]),
        }
    print("RESULT " + json.dumps({"process": jax.process_index(), "results": results}), flush=True)


def run_dead_peer() -> None:
    """Process 1 reports READY and sleeps until the test kills it; process 0 blocks in a collective meanwhile."""
    import time

    import jax
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P

    from vlp.parallel import mesh as mesh_lib

    mesh = mesh_lib.make_mesh()
    total = jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, P()))
    x = jax.make_array_from_callback((jax.device_count(),), NamedSharding(mesh, P(mesh_lib.MESH_AXES)),
                                     lambda index: np.ones(jax.device_count(), np.float32)[index])
    print("warm-up sum", float(total(x)), flush=True)
    multihost_utils.sync_global_devices("dead peer test ready")
    if jax.process_index() == 1:
        print("READY", flush=True)
        time.sleep(600)
    print("entering a collective", flush=True)
    print("sum", float(total(x)), flush=True)  # blocks: process 1 never joins
    print("UNEXPECTED: the collective finished without process 1", flush=True)


if __name__ == "__main__":
    info = distributed.initialize()
    assert info.num_processes > 1, f"expected a multi-process launch, got {info}"
    {"losses": run_losses, "dead_peer": run_dead_peer}[sys.argv[1]]()
