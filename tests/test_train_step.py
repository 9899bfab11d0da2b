"""The train step: LoRA trains only what it should; full fine-tuning equals a plain optax loop."""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import lorax_ft as lf
from lorax_ft.training import optim
from lorax_ft.transform import lora
from tests import toy_models as tm
from tests.tolerance import assert_close

STEPS = 10
LR = 3e-3


def _config(name="adamw", **optim_overrides):
    config = ml_collections.ConfigDict(
        {"optim": optim.default_optim_config(), "schedule": optim.default_schedule_config()}
    )
    config.optim.name = name
    config.optim.weight_decay = 0.01
    config.optim.update(optim_overrides)
    config.schedule.update(lr=LR, warmup_steps=3, total_steps=STEPS)
    return config


def _lm_loss(model, batch, rng):
    del rng
    logits = model(batch[:, :-1])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
    return loss, {}


def _setup(spec, scan=False):
    model = tm.TinyLlama(layers=2, scan=scan)
    # One batch, seen every step, so that the loss must fall (random tokens don't generalise).
    batch = jax.random.randint(jax.random.key(9), (4, 9), 0, tm.VOCAB)
    batches = jnp.broadcast_to(batch, (STEPS, *batch.shape))
    params = model.init(jax.random.key(0), batches[0])["params"]
    layouts = lf.infer_layouts(model, params, batches[0])
    adapters = lora.init(jax.random.key(1), params, spec, layouts)
    return model, params, adapters, batches


def _train(model, params, adapters, spec, config, batches):
    labels = lf.variable_labels(params, adapters, spec)
    tx = optim.make_optimizer(config, labels)
    # The step donates its state; copy so that the caller's params survive for comparisons.
    variables = jax.tree.map(jnp.copy, {"params": params, "lora": adapters})
    state = lf.init_state(variables, labels, tx, jax.random.key(2))
    train_step = lf.make_train_step(
        lf.factored(model), _lm_loss, tx, optim.make_schedule(config.schedule)
    )
    # Every step's state has the structure, shapes and dtypes of the first: one trace for all.
    # chex counts traces per call site, so the counts of earlier `_train` calls are cleared.
    chex.clear_trace_counter()
    step = jax.jit(chex.assert_max_traces(train_step, n=1), donate_argnums=0)
    losses = []
    for batch in batches:
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return state, losses, metrics


LORA_SPEC = lf.Spec(
    [
        (r".*(q|v)_proj/kernel", lf.LoRA(rank=4, alpha=8)),
        (r"lm_head/kernel", lf.Train()),
        (r".*norm/scale", lf.Train()),
    ]
)


@pytest.mark.parametrize("scan", [False, True])
def test_lora_steps_change_only_trainable_leaves(scan):
    model, params, adapters, batches = _setup(LORA_SPEC, scan)
    before = jax.tree.map(np.asarray, {"params": params, "lora": adapters})
    state, losses, metrics = _train(model, params, adapters, LORA_SPEC, _config(), batches)
    after = jax.tree.map(np.asarray, state.variables)
    labels = lf.paths.flatten(lf.variable_labels(params, adapters, LORA_SPEC))
    flat_before, flat_after = lf.paths.flatten(before), lf.paths.flatten(after)
    for path, label in labels.items():
        if label == "frozen":
            np.testing.assert_array_equal(flat_after[path], flat_before[path], err_msg=path)
        elif not path.endswith("/a"):  # A moves too, but B, heads and norms surely do
            assert np.abs(flat_after[path] - flat_before[path]).max() > 0, path
    assert losses[-1] < losses[0]
    assert set(metrics) == {"loss", "grad_norm", "lr"}

    # Optimizer state exists only for trainable leaves: AdamW keeps mu and nu (2 × float32).
    trainable = [x for p, x in flat_before.items() if labels[p] != "frozen"]
    trainable_bytes = sum(x.nbytes for x in trainable)
    # + two int32 step counts (adam's, the schedule's) for each group: lora, lora_b, train.
    assert lora.nbytes(state.opt_state) == 2 * trainable_bytes + 4 * 2 * 3
    frozen_bytes = sum(x.nbytes for p, x in flat_before.items() if labels[p] == "frozen")
    assert trainable_bytes < frozen_bytes / 5


def test_optimizer_over_all_variables_gives_frozen_leaves_no_state():
    _, params, adapters, _ = _setup(LORA_SPEC)
    variables = {"params": params, "lora": adapters}
    labels = lf.variable_labels(params, adapters, LORA_SPEC)
    tx = optim.make_optimizer(_config(), labels)
    _, trainable = lf.split(variables, labels)
    assert lora.nbytes(tx.init(variables)) == lora.nbytes(tx.init(trainable))


# Lion's update is sign(momentum): float noise of 1e-9 in a near-zero entry flips a whole
# learning-rate-sized step, so over many steps two equal programs drift apart; one step is exact.
@pytest.mark.parametrize(
    ("name", "steps"),
    [("adamw", STEPS), ("sgd", STEPS), ("adafactor", STEPS), ("adam", STEPS), ("lion", 1)],
)
def test_full_finetune_equals_plain_optax_loop(name, steps):
    model, params, _, batches = _setup(lf.FULL_FINETUNE)
    batches = batches[:steps]
    config = _config(name)
    state, losses, _ = _train(model, params, {}, lf.FULL_FINETUNE, config, batches)

    # The reference: a textbook optax loop over model.apply, no lorax_ft in sight.
    lr = optax.warmup_cosine_decay_schedule(0.0, LR, 3, STEPS, 0.0)
    no_decay = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)
    base = {
        "adamw": optax.adamw(lr, weight_decay=0.01, mask=no_decay),
        "adam": optax.adam(lr),
        "sgd": optax.chain(optax.add_decayed_weights(0.01, no_decay), optax.sgd(lr, 0.9)),
        "lion": optax.lion(lr, weight_decay=0.01, mask=no_decay),
        "adafactor": optax.adafactor(lr, weight_decay_rate=0.01, weight_decay_mask=no_decay),
    }[name]
    tx = optax.chain(optax.clip_by_global_norm(1.0), base)

    @jax.jit
    def step(p, opt_state, batch):
        loss_fn = lambda p: _lm_loss(lambda x: model.apply({"params": p}, x), batch, None)[0]
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    p, opt_state, ref_losses = params, tx.init(params), []
    for batch in batches:
        p, opt_state, loss = step(p, opt_state, batch)
        ref_losses.append(float(loss))
    # Steps of about lr whatever the gradient (Adam, Lion): compare on lr × steps, not on each
    # weight's own magnitude (tests/tolerance.py).
    assert_close(state.variables["params"], p, tol=5e-5, scale=LR * steps)
    assert_close(losses, ref_losses, tol=1e-6)


def test_loraplus_scales_b_updates():
    model, params, adapters, batches = _setup(LORA_SPEC)
    states = []
    for config in (_config("sgd"), _config("sgd", loraplus_lr_ratio=16.0)):
        config.schedule.name = "constant"  # warmup would make the one step's learning rate 0
        state, *_ = _train(model, params, adapters, LORA_SPEC, config, batches[:1])
        states.append(lora.factors_by_path(state.trainable["lora"]))
    # One SGD step from B = 0 with identical gradients: the B update is exactly 16× larger,
    # and A, whose gradient is 0 while B is, stays.
    for path, f in states[0].items():
        plus = states[1][path]
        assert np.abs(f.b).max() > 0, path
        assert_close(plus.b, 16.0 * f.b, tol=1e-5)
        np.testing.assert_array_equal(plus.a, f.a)


def test_schedules():
    config = optim.default_schedule_config()
    config.update(lr=1.0, warmup_steps=10, total_steps=110, end_lr_factor=0.1)
    for name, mid in [("constant", 1.0), ("warmup_cosine", 0.55), ("warmup_linear", 0.55)]:
        config.name = name
        schedule = optim.make_schedule(config)
        assert float(schedule(60)) == pytest.approx(mid, rel=1e-4)
        if name != "constant":
            assert float(schedule(5)) == pytest.approx(0.5)
            assert float(schedule(110)) == pytest.approx(0.1)
    config.name = "exponential"
    with pytest.raises(ValueError, match=r"schedule\.name='exponential' is not one of"):
        optim.make_schedule(config)


def test_gradient_accumulation_equals_one_big_batch():
    model, params, adapters, batches = _setup(LORA_SPEC)
    batch = jnp.concatenate([batches[0], jnp.flip(batches[0], axis=1)])  # 8 distinct rows
    labels = lf.variable_labels(params, adapters, LORA_SPEC)
    config = _config("sgd")
    tx = optim.make_optimizer(config, labels)
    results = []
    for accum in (1, 4):
        variables = jax.tree.map(jnp.copy, {"params": params, "lora": adapters})
        state = lf.init_state(variables, labels, tx, jax.random.key(2))
        step = jax.jit(lf.make_train_step(lf.factored(model), _lm_loss, tx, grad_accum=accum))
        for _ in range(2):
            state, metrics = step(state, batch)
        results.append((state.trainable, metrics["loss"], metrics["grad_norm"]))
    assert_close(results[1], results[0], tol=1e-5)


def test_nonfinite_step_is_skipped_when_asked():
    model, params, adapters, batches = _setup(LORA_SPEC)
    labels = lf.variable_labels(params, adapters, LORA_SPEC)
    tx = optim.make_optimizer(_config(), labels)

    def nan_loss(model, batch, rng):
        loss, aux = _lm_loss(model, batch, rng)
        return loss * jnp.nan, aux

    state = lf.init_state({"params": params, "lora": adapters}, labels, tx, jax.random.key(2))
    step = jax.jit(lf.make_train_step(lf.factored(model), nan_loss, tx, skip_nonfinite=True))
    new_state, metrics = step(state, batches[0])
    assert int(metrics["skipped"]) == 1 and int(new_state.step) == 1
    chex.assert_trees_all_equal(new_state.trainable, state.trainable)
    chex.assert_trees_all_equal(new_state.opt_state, state.opt_state)
