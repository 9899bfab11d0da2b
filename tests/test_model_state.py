"""Models with mutable state (BatchNorm statistics) train with the same step: the state carries
the statistics and the step updates them, compared with a plain optax loop on merged kernels."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx

import lorax_ft as lf
from lorax_ft.transform import lora
from tests import toy_models as tm
from tests.tolerance import assert_close

SPEC = lf.Spec([(".*kernel", lf.LoRA(rank=2))])


class LinenBatchNormNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        h = nn.Dense(16, name="fc1")(x)
        h = nn.BatchNorm(use_running_average=not train, momentum=0.8, name="bn")(h)
        return nn.Dense(3, name="fc2")(nn.relu(h))


class NnxBatchNormNet(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(6, 16, rngs=rngs)
        self.bn = nnx.BatchNorm(16, momentum=0.8, rngs=rngs)
        self.fc2 = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.relu(self.bn(self.fc1(x))))


def _batches(n=3):
    keys = jax.random.split(jax.random.key(7), n)
    return [(jax.random.normal(k, (8, 6)) * 2 + 1, jax.random.randint(k, (8,), 0, 3)) for k in keys]


def _xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def test_linen_batchnorm_statistics_are_carried_and_updated_by_the_step():
    model = LinenBatchNormNet()
    x0 = jnp.ones((8, 6))
    variables = model.init(jax.random.key(0), x0, train=False)
    params, model_state = variables["params"], lf.model_state(model, variables)
    assert set(model_state) == {"batch_stats"}
    layouts = lf.infer_layouts(model, params, x0, train=False, model_state=model_state)
    adapters = tm.nonzero(lora.init(jax.random.key(1), params, SPEC, layouts))
    labels = lf.variable_labels(params, adapters, SPEC)
    tx = optax.adam(1e-2)

    def loss_fn(run, batch, rng):
        x, y = batch
        return _xent(run(x, train=True), y), {}

    state = lf.init_state(
        {"params": params, "lora": adapters}, labels, tx, jax.random.key(2), model_state=model_state
    )
    step = jax.jit(lf.make_train_step(lf.factored(model), loss_fn, tx))

    # The reference: the model on merged kernels, statistics threaded by hand, optax on the
    # factors.
    trainable = adapters

    def ref_loss(adapters, stats, batch):
        x, y = batch
        logits, updates = model.apply(
            {"params": lora.merge(params, adapters), **stats},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        return _xent(logits, y), updates

    ref_opt, ref_stats = tx.init(trainable), model_state
    for batch in _batches():
        state, metrics = step(state, batch)
        (loss, ref_stats), grads = jax.value_and_grad(ref_loss, has_aux=True)(
            trainable, ref_stats, batch
        )
        updates, ref_opt = tx.update(grads, ref_opt, trainable)
        trainable = optax.apply_updates(trainable, updates)
        assert_close(metrics["loss"], loss, tol=1e-5)
    assert_close(
        state.model_state["batch_stats"]["bn"]["mean"],
        ref_stats["batch_stats"]["bn"]["mean"],
        tol=1e-5,
    )
    assert_close(
        state.model_state["batch_stats"]["bn"]["var"],
        ref_stats["batch_stats"]["bn"]["var"],
        tol=1e-5,
    )
    # The statistics moved: the test would catch a step that dropped the updates.
    assert float(jnp.abs(state.model_state["batch_stats"]["bn"]["mean"]).max()) > 0.1
    for path, a in lf.paths.flatten(state.trainable["lora"]).items():
        # Adam moves a leaf by about lr per step: compare on that scale.
        assert_close(a, lf.paths.flatten(trainable)[path], tol=1e-3, scale=3e-2)


def test_nnx_batchnorm_trains_through_adapt_and_updates_its_statistics():
    model = NnxBatchNormNet(nnx.Rngs(0))
    x0 = jnp.ones((8, 6))
    adapted = lf.adapt(model, SPEC, x0)
    assert "bn" in adapted.model_state
    tx = optax.sgd(0.1)

    def loss_fn(run, batch, rng):
        x, y = batch
        return _xent(run(x), y), {}

    state = adapted.init_state(tx)
    step = adapted.train_step(loss_fn, tx)
    # Reference: the NNX model itself in train mode on merged kernels, sgd by hand.
    ref = NnxBatchNormNet(nnx.Rngs(0))
    graphdef, _, rest = nnx.split(ref, nnx.Param, ...)
    adapters = adapted.adapters
    for batch in _batches():
        state, metrics = step(state, batch)

        def ref_loss(adapters, rest, batch):
            merged = lora.merge(lf.nnx_params(ref), adapters)
            m = nnx.merge(graphdef, merged, jax.tree.map(lambda v: v, rest))
            out = _xent(m(batch[0]), batch[1])
            return out, nnx.state(m, nnx.Not(nnx.Param))

        (loss, rest), grads = jax.value_and_grad(ref_loss, has_aux=True)(adapters, rest, batch)
        adapters = jax.tree.map(lambda a, g: a - 0.1 * g, adapters, grads)
        assert_close(metrics["loss"], loss, tol=1e-5)
    ref_mean = nnx.to_pure_dict(rest)["bn"]["mean"]
    assert_close(state.model_state["bn"]["mean"], ref_mean, tol=1e-5)
    assert float(jnp.abs(ref_mean).max()) > 0.1
