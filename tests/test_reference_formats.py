"""The reference model from an hf or open_clip export: a tiny CLIP exported to both (vlp.export.interop, no torch
needed) loads as EVA's teacher (`reference.format=hf|open_clip`) with the embeddings and EVA targets of the same
model read from its vlp workdir; a changed export file makes a resume fail the fingerprint check. The tools load the
prompt objective's CLIP (its evaluation encodes with it) and check its fingerprint."""

import flax.struct
import jax
import numpy as np
import pytest
from flax import traverse_util
from test_eva import eva_config, make_teacher

from vlp import config as vlp_config
from vlp.export import interop
from vlp.export.common import ModelSpec
from vlp.objectives.eva import EvaObjective
from vlp.parallel import sharding
from vlp.train import frozen

FORMATS = ("vlp", "hf", "open_clip")


@flax.struct.dataclass
class ExtraOnly:
    """The part of a TrainState that `frozen.attach_reference` reads and replaces."""

    extra: dict


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    """The same tiny CLIP (perturbed params, so LayerNorms are not identities) as a vlp workdir and as hf and
    open_clip exports."""
    root = tmp_path_factory.mktemp("reference_formats")
    teacher = make_teacher(root / "clip")
    config = vlp_config.load_json(teacher / "config.json")
    objective = frozen.build_objective(config)
    mesh = one_device_mesh()
    _, params = frozen.restore_params(teacher, frozen.abstract_params(objective, mesh, rules(config)))
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(params), sep="/").items()}
    spec = ModelSpec.from_model(objective.model, config.data.image_size)
    return {"vlp": teacher, "hf": interop.write_hf(flat, spec, root / "hf"),
            "open_clip": interop.write_open_clip(flat, spec, root / "oc")}


def one_device_mesh():
    return jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=jax.devices()[:1])


def rules(config):
    return sharding.as_rules(config.sharding_rules)


def load_teacher(path, fmt: str) -> tuple[EvaObjective, object, str, object]:
    """(EVA objective whose teacher is the reference, its params on one device, their fingerprint, shardings)."""
    config = eva_config(path, **{"reference.format": fmt})
    eva = EvaObjective(config)
    shardings = jax.tree.map(lambda x: x.sharding, frozen.abstract_params(eva.teacher, one_device_mesh(),
                                                                          rules(config)))
    params, digest = eva.reference.load(shardings)
    return eva, params, digest, shardings


@pytest.fixture(scope="module")
def loaded(sources) -> dict:
    return {fmt: load_teacher(sources[fmt], fmt) for fmt in FORMATS}


def outputs(eva: EvaObjective, params) -> dict[str, np.ndarray]:
    """The teacher's image and text embeddings, logit scale and EVA's aligned patch targets on fixed inputs."""
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
    tokens = eva.teacher.tokenizer.encode(["a red circle", "a small blue square", "green", "a big striped star"],
                                          eva.reference.config.data.max_text_len)
    fn = jax.jit(lambda p: dict(eva.teacher.embed(p, {"image": images, "text": tokens}),
                                targets=eva.targets(p, images)))
    return {k: np.asarray(v) for k, v in fn(params).items()}


@pytest.mark.parametrize("fmt", ["hf", "open_clip"])
def test_an_export_loads_as_the_teacher_with_the_workdirs_embeddings(loaded, fmt):
    eva, params, _, _ = loaded[fmt]
    assert eva.reference.config.objective == "clip" and eva.reference.config.model.image.width == 32
    want, got = outputs(*loaded["vlp"][:2]), outputs(eva, params)
    assert {"image_emb", "text_emb", "logit_scale", "targets"} <= set(got)
    assert got["targets"].shape == (4, 16, 32)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("fmt", ["hf", "open_clip"])
def test_a_changed_export_fails_the_fingerprint_at_resume(sources, loaded, fmt):
    eva, _, digest, shardings = loaded[fmt]
    root, files = frozen._reference_files(fmt, str(sources[fmt]), None)
    assert digest == frozen.fingerprint_files(root, files) and len(files) >= 2
    saved = ExtraOnly(extra={frozen.FINGERPRINT_KEY: jax.device_put(frozen.fingerprint_words(digest))})
    extra_shardings = {frozen.REFERENCE_KEY: shardings, frozen.FINGERPRINT_KEY: None}
    resumed = frozen.attach_reference(eva.reference, saved, extra_shardings, resumed=True)  # unchanged: accepted
    assert np.array_equal(np.asarray(resumed.extra[frozen.FINGERPRINT_KEY]), frozen.fingerprint_words(digest))
    weights = next(f for f in files if f.name.endswith(".safetensors"))  # one byte of a weight changes
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(frozen.ReferenceMismatchError, match=rf"reference.path='.*' \({fmt}\) is not the reference "
                                                            r"model this run was trained against"):
        frozen.attach_reference(eva.reference, saved, extra_shardings, resumed=True)


def test_the_tools_load_the_prompt_objectives_clip_and_check_its_fingerprint(tmp_path, sources):
    """The prompt objective's evaluation encodes with its frozen CLIP, so restore_run (tools/eval.py, export) loads
    the reference beside the run's params; a checkpoint written against another CLIP is refused."""
    from test_prompt import prompt_config

    from vlp.train import trainer
    from vlp.train.checkpoint import Checkpointer
    from vlp.train.restore import restore_run

    config = prompt_config(**{"reference.path": str(sources["vlp"])})
    exp = trainer.build_experiment(config)
    workdir = tmp_path / "prompt"
    checkpointer = Checkpointer(workdir / "checkpoints", max_to_keep=3, async_save=False)
    _, state = trainer._initial_state(exp, checkpointer, None)  # the CLIP attached, with its fingerprint
    checkpointer.save(1, frozen.without_reference(state), None, force=True)
    other = dict(state.extra, **{frozen.FINGERPRINT_KEY: jax.numpy.zeros_like(state.extra[frozen.FINGERPRINT_KEY])})
    checkpointer.save(2, frozen.without_reference(state.replace(extra=other)), None, force=True)
    checkpointer.close()
    (workdir / "config.json").write_text(vlp_config.to_json(config))
    _, step, restored = restore_run(workdir, step=1)
    want = jax.device_get(state.extra[frozen.REFERENCE_KEY])
    got = jax.device_get(exp.objective.eval_params(restored.params, restored.extra)["clip"])
    assert step == 1 and jax.tree.all(jax.tree.map(np.array_equal, got, want))
    with pytest.raises(frozen.ReferenceMismatchError, match=r"is not the reference model this run was trained"):
        restore_run(workdir, step=2)
