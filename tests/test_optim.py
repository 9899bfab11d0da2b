"""The optimizer: lr/wd multipliers and a plain optax transformation, each against plain optax."""

import jax
import jax.numpy as jnp
import ml_collections
import optax
import pytest

import lorax_ft as lf
from lorax_ft.training import optim
from lorax_ft.transform import lora
from lorax_ft.transform.rules import RuleError
from tests.tolerance import assert_close

STEPS, WARMUP, LR, WD = 5, 2, 0.1, 0.01
KEYS = jax.random.split(jax.random.key(0), 4)
PARAMS = {
    "w1": jax.random.normal(KEYS[0], (4, 3)),
    "w2": jax.random.normal(KEYS[1], (3, 3)),
    "bias": jax.random.normal(KEYS[2], (3,)),
}
INPUTS = jax.random.normal(KEYS[3], (STEPS, 8, 4))


def _loss(params, x):
    h = jnp.tanh(x @ params["w1"]) @ params["w2"] + params["bias"]
    return jnp.mean((h - 1.0) ** 2)


def _config(name, **optim_overrides):
    config = ml_collections.ConfigDict(
        {"optim": optim.default_optim_config(), "schedule": optim.default_schedule_config()}
    )
    config.optim.update(name=name, weight_decay=WD, **optim_overrides)
    config.schedule.update(lr=LR, warmup_steps=WARMUP, total_steps=STEPS)
    return config


def _schedule(mult=1.0):
    schedule = optax.warmup_cosine_decay_schedule(0.0, LR, WARMUP, STEPS, 0.0)
    return lambda step: mult * schedule(step)


def _train_lorax(config):
    """Full fine-tuning of PARAMS with `make_optimizer(config, labels)`."""
    labels = lf.variable_labels(PARAMS, {}, lf.FULL_FINETUNE)
    tx = optim.make_optimizer(config, labels)
    variables = {"params": PARAMS, "lora": {}}
    state = tx.init(variables)
    for x in INPUTS:
        grads = {"params": jax.grad(_loss)(variables["params"], x), "lora": {}}
        updates, state = tx.update(grads, state, variables)
        variables = optax.apply_updates(variables, updates)
    return variables["params"]


def _train_reference(per_leaf: dict):
    """Global-norm clipping, then one textbook optax transformation per leaf."""
    states = {k: tx.init(PARAMS[k]) for k, tx in per_leaf.items()}
    params = PARAMS
    for x in INPUTS:
        grads, _ = optax.clip_by_global_norm(1.0).update(jax.grad(_loss)(params, x), None)
        new = {}
        for k, tx in per_leaf.items():
            updates, states[k] = tx.update(grads[k], states[k], params[k])
            new[k] = params[k] + updates
        params = new
    return params


def test_lr_mults_scale_the_schedule_of_matched_leaves():
    trained = _train_lorax(_config("adamw", lr_mults=((r".*w1.*", 0.5),)))
    reference = _train_reference(
        {
            "w1": optax.adamw(_schedule(0.5), weight_decay=WD),
            "w2": optax.adamw(_schedule(), weight_decay=WD),
            "bias": optax.adam(_schedule()),  # default: no decay on vectors
        }
    )
    # Adam moves every weight by about lr per step: compare on lr × steps (tests/tolerance.py).
    assert_close(trained, reference, tol=1e-6, scale=LR * STEPS)


def test_wd_mults_set_decay_and_unmatched_leaves_keep_the_default():
    config = _config("sgd", wd_mults=(("params/bias", 2.0), ("params/w1", 0)))
    trained = _train_lorax(config)
    sgd = lambda: optax.sgd(_schedule(), momentum=0.9)
    reference = _train_reference(
        {
            "w1": sgd(),  # multiplier 0: no decay on a matrix
            "w2": optax.chain(optax.add_decayed_weights(WD), sgd()),  # unmatched matrix: decays
            "bias": optax.chain(optax.add_decayed_weights(2 * WD), sgd()),  # a vector, told to
        }
    )
    assert_close(trained, reference, tol=1e-6)


def _adapted():
    """A kernel with LoRA factors beside a trained vector literally named `b`."""
    params = {"proj": {"kernel": PARAMS["w1"], "b": PARAMS["bias"]}, "w2": PARAMS["w2"]}
    spec = lf.Spec([("proj/kernel", lf.LoRA(rank=2)), ("proj/b", lf.Train())])
    adapters = lora.init(jax.random.key(1), params, spec)
    adapters = jax.tree.map(lambda a: a + 0.1, adapters)  # B = 0 would give A no gradient
    variables = {"params": params, "lora": adapters}
    return variables, lf.variable_labels(params, adapters, spec)


def test_plain_optax_transformation_trains_the_trainable_leaves_as_one_tree():
    variables, labels = _adapted()
    # A global norm that clips hard: equal only if it spans the lora and train leaves together.
    plain = lambda: optax.chain(optax.clip_by_global_norm(0.01), optax.sgd(0.1, momentum=0.9))
    tx = optim.make_optimizer(plain(), labels)
    frozen, trainable = lf.split(variables, labels)
    reference_tx = plain()
    state, reference_state = tx.init(variables), reference_tx.init(trainable)
    assert lora.nbytes(state) == lora.nbytes(reference_state) == 4 * lora.count(trainable)
    reference = trainable
    for x in INPUTS:
        loss = lambda trainable, x=x: _loss(_as_params(lf.combine(frozen, trainable)), x)
        updates, state = tx.update(jax.grad(loss)(trainable), state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        grads = jax.grad(loss)(reference)
        updates, reference_state = reference_tx.update(grads, reference_state, reference)
        reference = optax.apply_updates(reference, updates)
    assert_close(trainable, reference, tol=1e-6)
    # Over all variables, the frozen leaves' updates are zeros.
    ones = jax.tree.map(jnp.ones_like, variables)
    updates = lf.paths.flatten(tx.update(ones, tx.init(variables), variables)[0])
    for path, label in lf.paths.flatten(labels).items():
        assert bool((updates[path] == 0).all()) == (label == "frozen"), path


def _as_params(variables):
    merged = lora.merge(variables["params"], variables["lora"])
    return {"w1": merged["proj"]["kernel"], "w2": merged["w2"], "bias": merged["proj"]["b"]}


def test_loraplus_and_lr_mults_pick_b_factors_by_structure():
    _, labels = _adapted()
    config = _config("adamw", loraplus_lr_ratio=16.0, lr_mults=(("lora/.*", 2.0),))
    groups = optim.leaf_groups(config.optim, labels)
    assert groups == {
        "params/proj/b": optim.Group("train"),  # named b, but a trained param, not a factor
        "params/proj/kernel": optim.Group("frozen"),
        "params/w2": optim.Group("frozen"),
        "lora/proj/kernel/a": optim.Group("lora", 2.0),
        "lora/proj/kernel/b": optim.Group("lora_b", 32.0),
    }


def test_default_config_keeps_the_optimizer_state_layout():
    variables, labels = _adapted()
    _, partitioned = optim.make_optimizer(_config("adamw"), labels).init(variables)
    assert set(partitioned.inner_states) == {"lora", "lora_b", "train", "frozen"}
    config = _config("adamw", lr_mults=(("params/.*", 0.5),))
    _, partitioned = optim.make_optimizer(config, labels).init(variables)
    assert set(partitioned.inner_states) == {"lora", "lora_b", "train", "frozen", "train_4"}


@pytest.mark.parametrize("key", ["lr_mults", "wd_mults"])
def test_rule_matching_no_trainable_leaf_is_an_error(key):
    _, labels = _adapted()
    config = _config("adamw", **{key: ((".*/a", 1.0), ("params/w2", 2.0))})  # w2 is frozen
    with pytest.raises(
        RuleError,
        match=rf"^optim.{key} \(over the trainable variables\): rule 'params/w2' matches no "
        r"parameter .*closest paths: \[.*'params/proj/b'",
    ):
        optim.make_optimizer(config, labels)
