"""Checkpoints: what was trained round-trips exactly; another base model is refused."""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import pytest

import lorax_ft as lf
from lorax_ft.run.checkpointing import Checkpointer, CheckpointMismatchError, fingerprint
from lorax_ft.training import optim
from lorax_ft.transform import lora
from tests import toy_models as tm


def _state(seed=0):
    model = tm.TinyLlama(layers=1)
    ids = jnp.zeros((2, 4), jnp.int32)
    params = model.init(jax.random.key(seed), ids)["params"]
    spec = lf.Spec([(r".*(q|v)_proj/kernel", lf.LoRA(rank=2)), ("lm_head/kernel", lf.Train())])
    adapters = lora.init(jax.random.key(1), params, spec, lf.infer_layouts(model, params, ids))
    labels = lf.variable_labels(params, adapters, spec)
    config = ml_collections.ConfigDict(
        {"optim": optim.default_optim_config(), "schedule": optim.default_schedule_config()}
    )
    config.schedule.total_steps = 100
    tx = optim.make_optimizer(config, labels)
    return params, lf.init_state(
        {"params": params, "lora": adapters}, labels, tx, jax.random.key(2)
    )


def test_round_trip_with_a_relative_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # orbax wants absolute paths; the Checkpointer makes them so
    params, state = _state()
    trained = state.replace(
        step=jnp.asarray(7, jnp.int32),
        trainable=jax.tree.map(lambda x: x + 1.0, state.trainable),
        rng=jax.random.key(42),
    )
    checkpoints = Checkpointer("run/checkpoints", keep=1)
    checkpoints.save(trained, data_state={"next_batch": 7}, base=fingerprint(params))
    checkpoints.wait()
    assert checkpoints.latest_step() == 7
    restored, data_state = checkpoints.restore(state, base=fingerprint(params))
    assert data_state == {"next_batch": 7} and int(restored.step) == 7
    chex.assert_trees_all_equal(restored.trainable, trained.trainable)
    chex.assert_trees_all_equal(restored.opt_state, trained.opt_state)
    assert (jax.random.key_data(restored.rng) == jax.random.key_data(trained.rng)).all()
    # The frozen base is not in the checkpoint: it comes from the template.
    assert restored.frozen is state.frozen


def test_resume_on_another_base_is_refused(tmp_path):
    params, state = _state(seed=0)
    other_params, _ = _state(seed=1)
    assert fingerprint(params) != fingerprint(other_params)
    checkpoints = Checkpointer(tmp_path / "checkpoints", use_async=False)
    checkpoints.save(state, data_state={}, base=fingerprint(params))
    with pytest.raises(CheckpointMismatchError, match=r"fingerprint .* but this run loaded"):
        checkpoints.restore(state, base=fingerprint(other_params))
