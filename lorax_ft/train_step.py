"""The train step: one pure `(state, batch) -> (state, metrics)` for LoRA and full fine-tuning.

The state holds the frozen variables and the trainable ones separately (see
`lorax_ft.partition`); gradients are taken only with respect to the trainable part, so frozen
kernels never get a gradient, let alone optimizer state. Full fine-tuning is the same step with
nothing frozen and no adapters.

>>> step = jax.jit(make_train_step(factored(model), loss_fn, tx), donate_argnums=0)  # doctest: +SKIP
>>> state, metrics = step(state, batch)                                           # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from lorax_ft import partition

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

    @property
    def variables(self) -> PyTree:
        """`{"params": ..., "lora": ...}` with frozen and trained leaves together."""
        return partition.combine(self.frozen, self.trainable)


def init_state(
    variables: PyTree, labels: PyTree, tx: optax.GradientTransformation, rng: jax.Array
) -> TrainState:
    """A step-0 state; the optimizer state covers the trainable leaves only."""
    frozen, trainable = partition.split(variables, labels)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        frozen=frozen,
        trainable=trainable,
        opt_state=tx.init(trainable),
        rng=rng,
    )


def make_train_step(
    apply_fn: Callable,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule | None = None,
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]:
    """Builds the step for `apply_fn(params, adapters, *inputs, lora_rng=..., **kw)`.

    Args:
      apply_fn: the adapted model, usually `lorax_ft.factored(model)`.
      loss_fn: `(model, batch, rng) -> (loss, metrics)`; `model` is `apply_fn` bound to the
        step's variables, `rng` is this step's key (for the model's own dropout).
      tx: the optimizer, e.g. `lorax_ft.optim.make_optimizer(config, labels)`.
      schedule: when given, the learning rate is reported as `metrics["lr"]`.

    Returns:
      `step(state, batch) -> (state, metrics)` with `loss`, `grad_norm` and the loss_fn's metrics.
    """

    def loss_of(trainable, frozen, batch, rng):
        variables = partition.combine(frozen, trainable)
        model_rng, lora_rng = jax.random.split(rng)

        def model(*inputs, **kwargs):
            return apply_fn(
                variables["params"], variables["lora"], *inputs, lora_rng=lora_rng, **kwargs
            )

        return loss_fn(model, batch, model_rng)

    def step(state: TrainState, batch) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(state.rng, state.step)
        (loss, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(
            state.trainable, state.frozen, batch, rng
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)
        return new_state, metrics

    return step
