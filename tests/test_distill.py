"""Distillation against a frozen reference (vlp/losses/reference.py, clip_distill, modx): each loss against numpy;
the sharded form equals the single-device one; a teacher equal to the student gives the plain contrastive loss and
gradient; Mod-X's term is 0 with zero gradient at a phase start and rows the old model got wrong get no gradient;
one clip_distill step on 2x4x1 equals 1 device (loss and every gradient leaf)."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from test_coca import _at
from test_eva import make_teacher

from vlp.losses import reference as ref_losses
from vlp.parallel import mesh as mesh_lib
from vlp.parallel import sharding
from vlp.train import frozen, trainer


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_kl_rows(student_logits, teacher_logits):
    """torch.nn.KLDivLoss(reduction='none')(log_softmax(student), softmax(teacher)).sum(-1), in float64."""
    lt, ls = np_log_softmax(teacher_logits), np_log_softmax(student_logits)
    return (np.exp(lt) * (lt - ls)).sum(-1)


def np_open_clip_distill(img, txt, scale, t_img, t_txt, t_scale):
    """open_clip DistillClipLoss's distill_loss (cross-entropy form) minus the teacher's entropy: the KL."""
    s, t = scale * img @ txt.T, t_scale * t_img @ t_txt.T
    ce = lambda teacher, student: -(np.exp(np_log_softmax(teacher)) * np_log_softmax(student)).sum(1).mean()  # noqa
    entropy = lambda teacher: ce(teacher, teacher)  # noqa: E731
    return 0.5 * (ce(t, s) - entropy(t) + ce(t.T, s.T) - entropy(t.T))


def np_modx(img, txt, old_img, old_txt):
    """Mod-X's cognition alignment as its code does it: raw cosine rows (tau = 1); a row whose old argmax is not the
    positive takes the new model's row as its target; KLDivLoss(reduction='sum'), halved over both directions."""
    total = 0.0
    for new, old in ((img @ txt.T, old_img @ old_txt.T), (txt @ img.T, old_txt @ old_img.T)):
        target = old.copy()
        wrong = old.argmax(1) != np.arange(len(old))
        target[wrong] = new[wrong]
        total += np_kl_rows(new, target).sum()
    return 0.5 * total


def unit_rows(rng, n, d):
    x = rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def embeddings():
    rng = np.random.default_rng(0)
    img, txt = unit_rows(rng, 16, 8), unit_rows(rng, 16, 8)
    # A teacher of another width whose rows are partly right (Mod-X keeps only those).
    t_img = unit_rows(rng, 16, 12)
    t_txt = t_img.copy()
    t_txt[:, :8] += 0.8 * unit_rows(rng, 16, 8)
    t_txt /= np.linalg.norm(t_txt, axis=1, keepdims=True)
    return img, txt, t_img, t_txt.astype(np.float32)


def test_kl_distill_matches_open_clip_form_in_numpy(embeddings):
    img, txt, t_img, t_txt = embeddings
    got, _ = ref_losses.similarity_distill_loss("kl", img, txt, 10.0, t_img, t_txt, 20.0)
    want = np_open_clip_distill(*(x.astype(np.float64) for x in (img, txt)), 10.0,
                                *(x.astype(np.float64) for x in (t_img, t_txt)), 20.0)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    assert want > 0.05


def test_modx_loss_matches_numpy_and_keeps_only_rows_the_old_model_got_right(embeddings):
    img, txt, t_img, t_txt = embeddings
    old_img, old_txt = t_img[:, :8].copy(), t_txt[:, :8].copy()  # Mod-X's old model has the new one's width
    got, metrics = ref_losses.similarity_distill_loss("modx", img, txt, 1.0, old_img, old_txt, 1.0)
    want = np_modx(*(x.astype(np.float64) for x in (img, txt, old_img, old_txt)))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    kept = float(metrics["distill_rows_kept"])
    assert 0.0 < kept < 1.0, kept  # the check below means something only with both kinds of rows
    # Rows the old model got wrong contribute zero gradient (to the new image embedding of an i2t row, through
    # that row only: t2i rows depend on every image row, so the text-side gradient is checked via the i2t half).
    old_i2t = old_img @ old_txt.T
    wrong = np.flatnonzero(old_i2t.argmax(1) != np.arange(16))
    right = np.flatnonzero(old_i2t.argmax(1) == np.arange(16))
    assert len(wrong) and len(right)

    def i2t_only(image):
        s = jnp.dot(image, jnp.asarray(txt).T)
        kl, _ = ref_losses._row_terms("modx", s, jnp.asarray(old_i2t), jnp.arange(16))
        return kl.sum()

    grads = np.asarray(jax.grad(i2t_only)(jnp.asarray(img)))
    assert np.abs(grads[wrong]).max() == 0.0
    assert np.abs(grads[right]).max() > 1e-4


def test_modx_term_is_zero_with_zero_gradient_at_a_phase_start(embeddings):
    img, txt, _, _ = embeddings
    loss_and_grads = jax.value_and_grad(
        lambda i, t: ref_losses.similarity_distill_loss("modx", i, t, 1.0, img, txt, 1.0)[0], argnums=(0, 1))
    loss, (g_img, g_txt) = loss_and_grads(jnp.asarray(img), jnp.asarray(txt))
    assert abs(float(loss)) < 1e-6
    assert max(float(jnp.abs(g_img).max()), float(jnp.abs(g_txt).max())) < 1e-6


def test_dclip_cosine_matches_numpy(embeddings):
    img, txt, _, _ = embeddings
    rng = np.random.default_rng(1)
    teacher = rng.normal(size=img.shape).astype(np.float32)  # not normalised: the cosine must normalise it
    want = np.mean(1 - (img * teacher).sum(1) / (np.linalg.norm(img, axis=1) * np.linalg.norm(teacher, axis=1)))
    np.testing.assert_allclose(float(ref_losses.embedding_cosine_loss(img, teacher)), want, rtol=1e-5)
    assert float(ref_losses.embedding_cosine_loss(img, img)) < 1e-6


@pytest.mark.parametrize("kind", ["kl", "modx"])
def test_sharded_distill_loss_equals_single_device(embeddings, kind):
    img, txt, t_img, t_txt = embeddings
    if kind == "modx":
        t_img, t_txt = t_img[:, :8], t_txt[:, :8]
    mesh = mesh_lib.make_mesh((2, 4, 1), -1)
    fn = lambda *a: ref_losses.sharded_similarity_distill_loss(kind, *a, mesh=mesh)  # noqa: E731
    grad = jax.jit(jax.value_and_grad(lambda i, t: fn(i, t, 7.0, t_img, t_txt, 9.0)[0], argnums=(0, 1)))
    single = jax.value_and_grad(
        lambda i, t: ref_losses.similarity_distill_loss(kind, i, t, 7.0, t_img, t_txt, 9.0)[0], argnums=(0, 1))
    (got, got_grads), (want, want_grads) = grad(img, txt), single(img, txt)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        assert np.linalg.norm(np.asarray(g) - np.asarray(w)) <= 1e-5 * np.linalg.norm(np.asarray(w))


# ---- the objective ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return make_teacher(tmp_path_factory.mktemp("distill") / "teacher")


def _loss_and_grads(config, batch, params=None, extra_params=None):
    exp = trainer.build_experiment(config)
    with exp.context():
        state = exp.init_state()
        if params is not None:
            state = state.replace(params=jax.device_put(params, exp.state_shardings.params))
        reference = extra_params if extra_params is not None else state.params  # the teacher = the student
        extra = dict(state.extra, **{frozen.REFERENCE_KEY: jax.device_put(
            reference, exp.state_shardings.extra[frozen.REFERENCE_KEY])})
        global_batch = sharding.host_to_global(batch, exp.mesh)
        fn = jax.jit(jax.value_and_grad(lambda p, e, b: exp.objective.loss_fn_with_extra(
            p, e, b, jax.random.key(0), jnp.int32(0)), has_aux=True))
        (loss, (metrics, _)), grads = fn(state.params, extra, global_batch)
        clip = jax.jit(jax.value_and_grad(lambda p, b: exp.objective.loss_from_embeddings(
            exp.objective.embed(p, b))[0]))
        clip_loss, clip_grads = clip(state.params, global_batch)
    return (float(loss), jax.device_get(metrics), jax.device_get(grads), float(clip_loss), jax.device_get(clip_grads),
            jax.device_get(state.params))


@pytest.fixture(scope="module")
def single_device(teacher):
    config = tiny_config(**{"objective": "clip_distill", "reference.path": str(teacher)})
    exp = trainer.build_experiment(config)
    batch = next(trainer.make_train_iterator(config, exp.objective))
    return config, batch, _loss_and_grads(config, batch)


def test_a_teacher_equal_to_the_student_gives_the_plain_contrastive_loss_and_gradient(single_device):
    _, _, (loss, metrics, grads, clip_loss, clip_grads, _) = single_device
    assert abs(float(metrics["loss_distill"])) < 1e-6
    np.testing.assert_allclose(loss, clip_loss, rtol=1e-6)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(clip_grads)):
        assert np.linalg.norm(g - w) <= 1e-5 * max(np.linalg.norm(w), 1e-6)


def test_sharded_step_equals_single_device(single_device, teacher):
    config, batch, (loss1, _, grads1, _, _, params) = single_device
    teacher_params = jax.tree.map(lambda x: 1.1 * x, params)  # a teacher unlike the student: a non-zero KL term
    loss1, metrics1, grads1, *_ = _loss_and_grads(config, batch, params, teacher_params)
    assert float(metrics1["loss_distill"]) > 1e-3
    config8 = tiny_config(**{"objective": "clip_distill", "reference.path": str(teacher), "mesh.shape": "(2, 4, 1)",
                             "mesh.num_devices": -1})
    loss8, _, grads8, *_ = _loss_and_grads(config8, batch, params, teacher_params)
    assert abs(loss8 - loss1) <= 1e-5 * abs(loss1)
    total = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads1)))
    for path, g1 in jax.tree_util.tree_leaves_with_path(grads1):
        diff = np.linalg.norm(_at(grads8, path) - g1)
        assert diff <= 1e-5 * max(np.linalg.norm(g1), 1e-3 * total), (jax.tree_util.keystr(path), diff)


def test_patch_dropout_drops_the_students_patches_and_never_the_references(single_device):
    config, batch, (*_, params) = single_device
    exp = trainer.build_experiment(tiny_config(**{
        "objective": "clip_distill", "reference.path": config.reference.path, "model.image.patch_dropout": 0.5}))
    objective = exp.objective
    dropped = objective.add_step_inputs(batch, jax.random.key(3), patch_dropout=True)
    assert dropped["patch_keep"].shape == (len(batch["image"]), 8)  # 8 of the 16 patches
    extra = {frozen.REFERENCE_KEY: params}  # the teacher = the student

    def outputs(full, dropped):  # one compilation for everything the test reads
        def term(b):
            return objective.loss_fn_with_extra(params, extra, b, jax.random.key(0), jnp.int32(0))[1][0]["loss_distill"]
        return (term(full), term(dropped), objective.reference_embed(extra, dropped)["image_emb"],
                objective.embed(params, full)["image_emb"])

    with exp.context():  # the sharded contrastive loss runs under the run's mesh
        full_term, dropped_term, reference, student_full = jax.jit(outputs)(batch, dropped)
    assert abs(float(full_term)) < 1e-6  # no dropout: the student is the teacher
    assert float(dropped_term) > 1e-4  # the student sees half the patches, the teacher all of them
    np.testing.assert_allclose(np.asarray(reference), np.asarray(student_full), rtol=1e-6, atol=1e-7)


def test_cosine_kind_needs_the_teachers_embed_dim(teacher):
    config = tiny_config(**{"objective": "clip_distill", "reference.path": str(teacher), "clip_distill.kind": "cosine",
                            "model.embed_dim": 16})
    with pytest.raises(ValueError, match=r"model.embed_dim=16 differs from the teacher's 32"):
        trainer.build_experiment(config)


@pytest.mark.parametrize("spec", ["distill.py:B/16", "modx.py:B/16", "modx.py:tiny", "modx.py:tiny_finetune"])
def test_method_configs_load_and_validate(spec):
    from conftest import REPO

    from vlp import config as vlp_config

    config = vlp_config.load_config_file(str(REPO / "configs" / spec))
    vlp_config.validate(config)  # the reference and init_from paths are the user's to set
    assert config.objective in ("clip_distill", "modx", "clip")
