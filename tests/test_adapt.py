"""`lf.adapt`: the one-call path against the lower-level API and against plain optax loops."""

import dataclasses
import doctest
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import lorax_ft as lf
from lorax_ft.transform import lora
from tests import toy_models as tm
from tests.tolerance import assert_close

STEPS = 3
LR = 1e-2


class Mlp(nn.Module):
    """16 -> Dense 32 -> DenseGeneral (4, 8) -> Dense 3: 544 + 1056 + 99 = 1,699 params."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(32, name="hidden")(x))
        h = nn.DenseGeneral((4, 8), name="proj")(h)  # a (32, 4, 8) kernel: 1 input axis
        return nn.Dense(3, name="head")(jnp.tanh(h).reshape(*h.shape[:-2], 32))


# LoRA on both inner kernels, the head trained fully, the rest frozen.
SPEC = lf.Spec([(r"(hidden|proj)/kernel", lf.LoRA(rank=4, alpha=8)), (r"head/.*", lf.Train())])


def _mlp():
    model = Mlp()
    x = jax.random.normal(jax.random.key(3), (6, 16))
    y = jax.random.normal(jax.random.key(4), (6, 3))
    return model, model.init(jax.random.key(0), x), {"x": x, "y": y}


def _mse(model, batch, rng):
    del rng
    return jnp.mean((model(batch["x"]) - batch["y"]) ** 2), {}


def test_linen_adapters_layouts_and_forward_match_the_lower_level_api():
    model, variables, batch = _mlp()
    params = variables["params"]
    rng = jax.random.key(5)
    adapted = lf.adapt(model, SPEC, batch["x"], variables=variables, rng=rng)

    layouts = lf.infer_layouts(model, params, batch["x"])
    assert adapted.layouts == layouts
    assert (layouts["proj/kernel"].stack, layouts["proj/kernel"].inputs) == (0, 1)
    expected = lora.init(rng, params, SPEC, layouts)
    assert jax.tree.structure(adapted.adapters) == jax.tree.structure(expected)
    jax.tree.map(lambda a, e: assert_close(a, e, tol=0), adapted.adapters, expected)
    assert adapted.adapters["proj"]["kernel"].b.shape == (4, 32)  # (32, 4, 8): 32 outputs
    assert adapted.params is params and adapted.model_state == {}
    assert adapted.variables["params"] is params
    assert adapted.variables["lora"] is adapted.adapters
    assert adapted.labels == lf.variable_labels(params, adapted.adapters, SPEC)
    # rng defaults to key(0).
    default = lf.adapt(model, SPEC, batch["x"], params=params)
    jax.tree.map(
        lambda a, e: assert_close(a, e, tol=0),
        default.adapters,
        lora.init(jax.random.key(0), params, SPEC, layouts),
    )

    # With B far from zero, the adapted model is the base model on W + s·A·B.
    adapted = dataclasses.replace(adapted, adapters=tm.nonzero(adapted.adapters))
    merged = lora.merge(params, adapted.adapters)
    expected_out = model.apply({"params": merged}, batch["x"])
    assert_close(adapted(batch["x"]), expected_out, tol=1e-5)
    assert_close(adapted.apply(params, adapted.adapters, batch["x"]), expected_out, tol=1e-5)
    jax.tree.map(lambda a, e: assert_close(a, e, tol=0), adapted.merge(), merged)


def test_nnx_model():
    model = tm.NnxModel(nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(6), (2, 7), 0, tm.VOCAB)
    spec = lf.Spec([(r".*kernel", lf.LoRA(rank=4, alpha=8))])
    adapted = lf.adapt(model, spec, ids, rng=jax.random.key(1))
    params = lf.nnx_params(model)
    expected = lora.init(jax.random.key(1), params, spec, lf.infer_layouts(model, params, ids))
    jax.tree.map(lambda a, e: assert_close(a, e, tol=0), adapted.adapters, expected)

    adapted = dataclasses.replace(adapted, adapters=tm.nonzero(adapted.adapters))
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    merged = lora.merge(adapted.params, adapted.adapters)
    assert_close(adapted(ids), nnx.merge(graphdef, merged, rest)(ids), tol=1e-5)


def test_summary_counts_by_hand_in_peft_format(capsys):
    model, variables, batch = _mlp()
    adapted = lf.adapt(model, SPEC, batch["x"], variables=variables)
    # LoRA r=4: hidden A 16×4 + B 4×32 = 192; proj A 32×4 + B 4×32 = 256. Head: 32×3 + 3 = 99.
    summary = adapted.summary()
    assert summary.lora_params == 192 + 256 and summary.lora_bytes == 4 * (192 + 256)
    assert summary.trainable == 192 + 256 + 99
    assert summary.frozen == 1699 - 99  # base params, adapted kernels included
    assert summary.total == 1699 + 192 + 256
    sizes = sum(x.size for x in jax.tree.leaves(adapted.variables))
    assert summary.total == sizes
    line = "trainable params: 547 || all params: 2,147 || trainable%: 25.4774"
    assert str(summary) == line
    adapted.print_trainable_parameters()
    assert capsys.readouterr().out == line + "\n"

    full = lf.adapt(model, lf.FULL_FINETUNE, variables=variables).summary()
    assert (full.trainable, full.frozen, full.total, full.lora_params) == (1699, 0, 1699, 0)
    assert str(full) == "trainable params: 1,699 || all params: 1,699 || trainable%: 100.0000"


def test_lora_train_step_equals_a_plain_optax_loop_and_keeps_the_callers_arrays():
    model, variables, batch = _mlp()
    adapted = lf.adapt(model, SPEC, batch["x"], variables=variables)
    tx = optax.adam(LR)
    state = adapted.init_state(tx)
    traces = []

    def loss_fn(model, batch, rng):
        traces.append(1)  # runs once per trace of the step
        return _mse(model, batch, rng)

    step = adapted.train_step(loss_fn, tx)
    first = state
    losses = []
    for _ in range(STEPS):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert len(traces) == 1
    # The step donated the rest of the state (its trainable part, here the state's own copy).
    assert first.trainable["lora"]["hidden"]["kernel"].a.is_deleted()

    # The same training by hand: optax over {adapters, head}, the model run on merged kernels.
    params = variables["params"]

    def loss_of(trainable):
        merged = lora.merge({**params, "head": trainable["head"]}, trainable["lora"])
        return jnp.mean((model.apply({"params": merged}, batch["x"]) - batch["y"]) ** 2)

    trainable = {"lora": adapted.adapters, "head": params["head"]}
    opt_state = tx.init(trainable)
    expected_losses = []
    for _ in range(STEPS):
        loss, grads = jax.value_and_grad(loss_of)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        expected_losses.append(float(loss))

    assert_close(losses, expected_losses, tol=1e-5)
    assert expected_losses[-1] < expected_losses[0]
    # Adam moves every weight by about LR a step whatever its gradient: errors scale with that.
    trained = state.variables
    assert_close(trained["lora"], trainable["lora"], tol=1e-3, scale=LR * STEPS)
    assert_close(trained["params"]["head"], trainable["head"], tol=1e-3, scale=LR * STEPS)
    assert int(state.step) == STEPS
    merged = adapted.merge(state)  # the trained head and the trained adapters
    expected_merged = lora.merge({**params, "head": trainable["head"]}, trainable["lora"])
    assert_close(merged, expected_merged, tol=1e-3, scale=LR * STEPS)

    # Nothing of the caller's was donated: params, head and adapters are alive, and the frozen
    # part of the state is the caller's own arrays, not copies.
    for leaf in jax.tree.leaves((params, adapted.adapters)):
        assert not leaf.is_deleted()
    assert state.frozen["params"]["hidden"]["kernel"] is params["hidden"]["kernel"]
    assert state.frozen["params"]["head"] == {"bias": None, "kernel": None}
    # The optimizer holds state for the trainable leaves only (Adam: two moments each).
    summary = adapted.summary()
    assert lora.count(state.opt_state) < 2 * summary.trainable + 10 < summary.frozen


def test_full_finetune_equals_plain_optax_on_all_params():
    model, variables, batch = _mlp()
    params = variables["params"]
    adapted = lf.adapt(model, lf.FULL_FINETUNE, batch["x"], variables=variables)
    assert adapted.adapters == {}
    assert set(jax.tree.leaves(adapted.labels)) == {"train"}
    tx = optax.sgd(LR, momentum=0.9)
    state = adapted.init_state(tx)
    step = adapted.train_step(_mse, tx)
    for _ in range(STEPS):
        state, _ = step(state, batch)

    def loss_of(p):
        return jnp.mean((model.apply({"params": p}, batch["x"]) - batch["y"]) ** 2)

    expected, opt_state = params, tx.init(params)
    for _ in range(STEPS):
        updates, opt_state = tx.update(jax.grad(loss_of)(expected), opt_state, expected)
        expected = optax.apply_updates(expected, updates)
    assert_close(state.variables["params"], expected, tol=1e-5)
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(params))


def _one_line_error(call, match):
    with pytest.raises(TypeError, match=match) as info:
        call()
    assert "\n" not in str(info.value)


def test_bad_inputs_are_one_line_errors():
    model, variables, batch = _mlp()
    x = batch["x"]
    _one_line_error(lambda: lf.adapt(lambda p, x: x, SPEC, x), r"call lf\.factored\(fn\)")
    _one_line_error(lambda: lf.adapt(object(), SPEC, x), "linen or NNX module, got object")
    _one_line_error(lambda: lf.adapt(model, SPEC, x), "needs its params")
    _one_line_error(
        lambda: lf.adapt(model, SPEC, x, params=variables["params"], variables=variables),
        "not both",
    )
    _one_line_error(lambda: lf.adapt(model, SPEC, x, variables={"x": 1}), "no 'params'")
    _one_line_error(lambda: lf.adapt(model, SPEC, x, params=variables), "whole variables")
    _one_line_error(lambda: lf.adapt(model, SPEC, params=variables["params"]), "sample inputs")
    _one_line_error(lambda: lf.adapt(model, "lora", x, variables=variables), "lf.Spec")
    nnx_model = tm.NnxModel(nnx.Rngs(0))
    _one_line_error(lambda: lf.adapt(nnx_model, SPEC, x, params={}), "NNX module carries")
    with pytest.raises(lf.SpecError, match="matches no parameter"):
        lf.adapt(model, lf.Spec([("nope/kernel", lf.LoRA(rank=2))]), x, variables=variables)


def test_docstring_example_runs():
    result = doctest.testmod(sys.modules["lorax_ft.transform.adapt"])
    assert result.attempted > 0 and result.failed == 0
