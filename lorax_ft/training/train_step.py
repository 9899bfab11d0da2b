"""The train step: one pure `(state, batch) -> (state, metrics)` for LoRA and full fine-tuning.

The state holds the frozen variables and the trainable ones separately (see
`lorax_ft.transform.partition`); gradients are taken only with respect to the trainable part, so frozen
kernels never get a gradient, let alone optimizer state. Full fine-tuning is the same step with
nothing frozen and no adapters.

>>> step = jax.jit(make_train_step(factored(model), loss_fn, tx), donate_argnums=0)  # doctest: +SKIP
>>> state, metrics = step(state, batch)                                           # doctest: +SKIP
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from lorax_ft.transform import partition

PyTree = Any
# loss_fn(model, batch, rng) -> (scalar loss, dict of scalar metrics); `model(*inputs, **kw)`
# runs the adapted model with the current variables.
LossFn = Callable[[Callable, Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


@struct.dataclass
class TrainState:
    """Everything a step reads and writes; a plain pytree."""

    step: jax.Array
    frozen: PyTree
    trainable: PyTree
    opt_state: optax.OptState
    rng: jax.Array
    # What the model updates as it runs besides its params (BatchNorm statistics, ...), as
    # `lorax_ft.transform.factored.model_state` gives it; {} for most models. Not differentiated.
    model_state: PyTree = struct.field(default_factory=dict)

    @property
    def variables(self) -> PyTree:
        """`{"params": ..., "lora": ...}` with frozen and trained leaves together."""
        return partition.combine(self.frozen, self.trainable)


def init_state(
    variables: PyTree,
    labels: PyTree,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    model_state: PyTree | None = None,
) -> TrainState:
    """A step-0 state; the optimizer state covers the trainable leaves only.

    `model_state` (e.g. `{"batch_stats": ...}` of a linen BatchNorm model) is carried and
    updated by the step: the model is then run with `model_state=` (see `lorax_ft.transform.factored`).
    """
    frozen, trainable = partition.split(variables, labels)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        frozen=frozen,
        trainable=trainable,
        opt_state=tx.init(trainable),
        rng=rng,
        model_state=model_state or {},
    )


def make_train_step(
    apply_fn: Callable,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule | None = None,
    *,
    grad_accum: int = 1,
    skip_nonfinite: bool = False,
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]:
    """Builds the step for `apply_fn(params, adapters, *inputs, lora_rng=..., **kw)`.

    Args:
      apply_fn: the adapted model, usually `lorax_ft.transform.factored(model)`.
      loss_fn: `(model, batch, rng) -> (loss, metrics)`; `model` is `apply_fn` bound to the
        step's variables, `rng` is this step's key (for the model's own dropout).
      tx: the optimizer, e.g. `lorax_ft.training.optim.make_optimizer(config, labels)`.
      schedule: when given, the learning rate is reported as `metrics["lr"]`.
      grad_accum: split the batch into this many strided micro-batches along its leading axis
        and average their gradients (a `lax.scan`, so memory is that of one micro-batch).
      skip_nonfinite: leave params, optimizer and model state unchanged when the loss or the gradient
        norm is not finite (`metrics["skipped"]` says so) instead of applying the update.

    Returns:
      `step(state, batch) -> (state, metrics)` with `loss`, `grad_norm` and the loss_fn's metrics.
    """

    def loss_of(trainable, frozen, model_state, batch, rng):
        variables = partition.combine(frozen, trainable)
        model_rng, lora_rng = jax.random.split(rng)
        current = [model_state]

        def model(*inputs, **kwargs):
            run = functools.partial(
                apply_fn, variables["params"], variables["lora"], *inputs, lora_rng=lora_rng
            )
            if not current[0]:
                return run(**kwargs)
            # Each call of the model sees the state the previous one left.
            out, current[0] = run(model_state=current[0], **kwargs)
            return out

        loss, aux = loss_fn(model, batch, model_rng)
        return loss, (aux, current[0])

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)

    def accumulated(trainable, frozen, model_state, batch, rng):
        # Micro-batch k is rows k, k + grad_accum, ...: a batch split over devices then gives
        # every device its share of each micro-batch, with no data moved between devices.
        micro = jax.tree.map(
            lambda x: x.reshape(-1, grad_accum, *x.shape[1:]).swapaxes(0, 1), batch
        )

        def body(carry, inputs):
            total, model_state = carry
            index, micro_batch = inputs
            rng_k = jax.random.fold_in(rng, index)
            (loss, (aux, model_state)), grads = grad_fn(
                trainable, frozen, model_state, micro_batch, rng_k
            )
            # Gradients, loss and metrics are averaged; the model state runs through in order.
            total = jax.tree.map(jnp.add, total, (loss, aux, grads))
            return (total, model_state), None

        (loss, (aux, _)), grads = jax.eval_shape(
            grad_fn, trainable, frozen, model_state, jax.tree.map(lambda x: x[0], micro), rng
        )
        zeros = jax.tree.map(lambda z: jnp.zeros(z.shape, z.dtype), (loss, aux, grads))
        (total, model_state), _ = jax.lax.scan(
            body, (zeros, model_state), (jnp.arange(grad_accum), micro)
        )
        loss, aux, grads = jax.tree.map(lambda x: x / grad_accum, total)
        return (loss, (aux, model_state)), grads

    def step(state: TrainState, batch) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(state.rng, state.step)
        run = grad_fn if grad_accum == 1 else accumulated
        (loss, (aux, model_state)), grads = run(
            state.trainable, state.frozen, state.model_state, batch, rng
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        grad_norm = optax.tree.norm(grads)
        metrics = {"loss": loss, "grad_norm": grad_norm, **aux}
        if skip_nonfinite:
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            keep = lambda new, old: jnp.where(finite, new, old)
            trainable = jax.tree.map(keep, trainable, state.trainable)
            opt_state = jax.tree.map(keep, opt_state, state.opt_state)
            model_state = jax.tree.map(keep, model_state, state.model_state)
            metrics["skipped"] = (~finite).astype(jnp.int32)
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        new_state = state.replace(
            step=state.step + 1, trainable=trainable, opt_state=opt_state, model_state=model_state
        )
        return new_state, metrics

    return step
