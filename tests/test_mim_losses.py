"""MIM and self-distillation losses against independent numpy references; centring and the EMA teacher update under
a 2x4x1 mesh equal the single-device results."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from vlp.losses import distill, mim
from vlp.parallel.mesh import make_mesh

RNG = np.random.default_rng(0)


def np_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def np_patchify(images, p):  # loop form: patch (i, j) row-major, pixels row-major, channels last
    b, h, w, c = images.shape
    out = []
    for i in range(h // p):
        for j in range(w // p):
            out.append(images[:, i * p:(i + 1) * p, j * p:(j + 1) * p, :].reshape(b, -1))
    return np.stack(out, axis=1)


@pytest.fixture(scope="module")
def data():
    images = RNG.uniform(-1, 1, (4, 8, 8, 3)).astype(np.float32)
    pred = RNG.normal(size=(4, 4, 48)).astype(np.float32)
    mask = RNG.uniform(size=(4, 4)) < 0.5
    mask[0] = False  # an image without masked patches
    return images, pred, mask


def test_patchify(data):
    images = data[0]
    np.testing.assert_array_equal(np.asarray(mim.patchify(jnp.asarray(images), 4)), np_patchify(images, 4))


def test_simmim_l1(data):
    images, pred, mask = data
    target = np_patchify(images, 4)
    # SimMIM's formula on pixels: sum |x̂ - x| over masked pixels and channels / (masked pixels + 1e-5) / C
    pixel_mask = np.repeat(mask[..., None], 16, axis=-1)  # 16 pixels per 4x4 patch
    err = np.abs(pred - target).reshape(4, 4, 16, 3)
    want = (err * pixel_mask[..., None]).sum() / (pixel_mask.sum() + 1e-5) / 3
    np.testing.assert_allclose(float(mim.simmim_l1(pred, target, mask)), want, rtol=1e-5)
    assert float(mim.simmim_l1(pred, target, np.zeros_like(mask))) == 0.0
    grad = jax.grad(lambda p: mim.simmim_l1(p, target, mask))(jnp.asarray(pred))
    assert np.all(np.asarray(grad)[~mask] == 0)  # visible pixels get no gradient


def test_mae_mse(data):
    images, pred, mask = data
    patches = np_patchify(images, 4).astype(np.float64)
    target = (patches - patches.mean(-1, keepdims=True)) / np.sqrt(patches.var(-1, ddof=1, keepdims=True) + 1e-6)
    want = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
    np.testing.assert_allclose(float(mim.mae_mse(pred, patches.astype(np.float32), mask)), want, rtol=1e-5)
    raw = (((pred - patches) ** 2).mean(-1) * mask).sum() / mask.sum()
    np.testing.assert_allclose(float(mim.mae_mse(pred, patches.astype(np.float32), mask, norm_pix=False)), raw,
                               rtol=1e-5)
    zero = float(mim.mae_mse(np.zeros_like(pred), patches.astype(np.float32), np.ones_like(mask)))
    assert abs(zero - 47 / 48) < 1e-4  # methods.md sanity: predicting 0 on normalised targets gives (n-1)/n


def test_eva_cosine(data):
    _, pred, mask = data
    teacher = RNG.normal(size=pred.shape).astype(np.float32)
    cos = (pred * teacher).sum(-1) / np.linalg.norm(pred, axis=-1) / np.linalg.norm(teacher, axis=-1)
    want = -(cos * mask).sum() / mask.sum()
    np.testing.assert_allclose(float(mim.eva_cosine(pred, teacher, mask)), want, rtol=1e-5)
    np.testing.assert_allclose(float(mim.eva_cosine(teacher, teacher, mask)), -1.0, rtol=1e-5)


def np_ce(student, teacher, center, ts, tt):
    t = np_softmax((teacher - center) / tt)
    s = student / ts
    log_s = s - s.max(-1, keepdims=True)
    log_s = log_s - np.log(np.exp(log_s).sum(-1, keepdims=True))
    return -(t * log_s).sum(-1)


def test_dino_and_ibot_losses():
    s, t, c = RNG.normal(size=(6, 10)), RNG.normal(size=(6, 10)), RNG.normal(size=10) * 0.1
    np.testing.assert_allclose(float(distill.dino_loss(s, t, c, 0.1, 0.04)), np_ce(s, t, c, 0.1, 0.04).mean(),
                               rtol=1e-5)
    sp, tp = RNG.normal(size=(6, 5, 10)), RNG.normal(size=(6, 5, 10))
    mask = RNG.uniform(size=(6, 5)) < 0.4
    mask[2] = False
    ce = np_ce(sp, tp, c, 0.1, 0.07)
    per_image = [ce[i][mask[i]].mean() if mask[i].any() else 0.0 for i in range(6)]
    np.testing.assert_allclose(float(distill.ibot_loss(sp, tp, c, mask, 0.1, 0.07)), np.mean(per_image), rtol=1e-5)
    # At uniform outputs both losses are ln K (methods.md sanity value).
    zeros = np.zeros((6, 10))
    np.testing.assert_allclose(float(distill.dino_loss(zeros, zeros, np.zeros(10), 0.1, 0.04)), np.log(10), rtol=1e-6)


def test_schedules():
    temps = [float(distill.teacher_temperature(s, 0.04, 0.07, 30)) for s in (0, 15, 30, 100)]
    np.testing.assert_allclose(temps, [0.04, 0.055, 0.07, 0.07], rtol=1e-6)
    moms = [float(distill.ema_momentum(s, 100, 0.99, 1.0)) for s in (0, 50, 100)]
    np.testing.assert_allclose(moms, [0.99, 0.995, 1.0], rtol=1e-6)
    assert float(distill.ema_momentum(37, 100, 0.996, 0.996)) == pytest.approx(0.996)


def centre_and_ema(center, teacher_logits, patch_logits, teacher_params, student_params):
    """One step's extra-state update as the TIPS objective does it (reductions over the global batch)."""
    return (distill.update_center(center, teacher_logits, 0.9), distill.update_center(center, patch_logits, 0.8),
            distill.ema_update(teacher_params, student_params, 0.99))


def test_centre_and_ema_sharded_equal_single_device_and_numpy():
    logits = RNG.normal(size=(16, 12)).astype(np.float32)
    patches = RNG.normal(size=(16, 5, 12)).astype(np.float32)
    center = RNG.normal(size=12).astype(np.float32)
    teacher = {"w": RNG.normal(size=(8, 12)).astype(np.float32), "b": RNG.normal(size=12).astype(np.float32)}
    student = jax.tree.map(lambda x: x + 1.0, teacher)
    want = (0.9 * center + 0.1 * logits.mean(0), 0.8 * center + 0.2 * patches.reshape(-1, 12).mean(0),
            {k: 0.99 * teacher[k] + 0.01 * student[k] for k in teacher})

    single = jax.jit(centre_and_ema)(center, logits, patches, teacher, student)
    mesh = make_mesh((2, 4, 1), -1)
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    params = NamedSharding(mesh, P(None, "fsdp"))  # the teacher sharded like FSDP-sharded student params
    args = (jax.device_put(center, NamedSharding(mesh, P())), jax.device_put(logits, batch),
            jax.device_put(patches, batch), jax.device_put(teacher, {"w": params, "b": NamedSharding(mesh, P("fsdp"))}),
            jax.device_put(student, {"w": params, "b": NamedSharding(mesh, P("fsdp"))}))
    with jax.set_mesh(mesh):
        sharded = jax.jit(centre_and_ema)(*args)
    assert len(args[1].sharding.device_set) == 8
    assert sharded[2]["w"].sharding.spec == P(None, "fsdp")  # the teacher stays sharded like the student
    for got, ref in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6, atol=1e-7)
    for got, ref in zip(jax.tree.leaves(single), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-6)
