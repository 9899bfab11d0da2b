"""Sharded training: the train state's shardings, its initialisation in place, and the jitted step.

The state is never built on one device: `init_train_state` traces the initialisation with
`jax.eval_shape`, derives every leaf's sharding from the variables' (`lorax_ft.parallel.sharding`), and
runs it under `jax.jit(..., out_shardings=...)`, so each device computes only its own shards.
The step is `lorax_ft.training.train_step.make_train_step`, the one LoRA and full fine-tuning share,
jitted with those shardings, the batch split over (`data`, `fsdp`), and the state donated.

>>> mesh = make_mesh(fsdp())                                                   # doctest: +SKIP
>>> shard = functools.partial(sharding.variable_shardings, mesh=mesh,
...                           logical_axes=logical_axes(module))                 # doctest: +SKIP
>>> state, shardings = init_train_state(init_variables, key, labels=labels, tx=tx,
...                                     rng=rng, mesh=mesh, shard_variables=shard)  # doctest: +SKIP
>>> step = make_sharded_train_step(factored(module), loss_fn, tx, shardings, mesh)  # doctest: +SKIP
>>> state, metrics = step(state, batch)                                         # doctest: +SKIP
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lorax_ft.parallel.mesh import BATCH_AXES
from lorax_ft.training.train_step import LossFn, TrainState, init_state, make_train_step
from lorax_ft.transform import partition

PyTree = Any


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of a leaf every device holds whole (step, rng, scalars, metrics)."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Splits a batch's leading dimension over (`data`, `fsdp`); usable as a pytree prefix."""
    return NamedSharding(mesh, P(tuple(a for a in BATCH_AXES if a in mesh.shape)))


def batch_devices(mesh: Mesh) -> int:
    """How many ways the batch is split: the product of the (`data`, `fsdp`) axis sizes."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape)


def _is_empty(x) -> bool:
    return x is None or isinstance(x, optax.MaskedNode)


def state_shardings(
    state: TrainState, tx: optax.GradientTransformation, variable_shardings: PyTree, mesh: Mesh
) -> TrainState:
    """A `TrainState` of `NamedSharding`s for `state` (arrays or `jax.eval_shape` output).

    Frozen and trainable leaves take their variables' shardings (a quantized frozen kernel, a
    `QuantizedKernel` of them: one per array, `sharding.quantized_sharding`); optimizer-state
    leaves shaped
    like their parameter (Adam's moments, momentum) take the parameter's, found through
    `optax.tree_map_params`; anything else (step counts, factored second moments) is replicated,
    as are `step`, `rng` and the model state (BatchNorm statistics: small).

    Args:
      state: the state, concrete or abstract.
      tx: the optimizer that made `state.opt_state`.
      variable_shardings: `lorax_ft.parallel.sharding.variable_shardings(...)` of the state's variables.
      mesh: the mesh (for the replicated leaves).
    """
    whole = replicated(mesh)
    variables = partition.combine(state.frozen, state.trainable)

    def like_variables(part):
        return jax.tree.map(
            lambda leaf, sharding: None if leaf is None else sharding,
            part,
            variable_shardings,
            is_leaf=lambda x: x is None,
        )

    def like_param(leaf, sharding, param):
        if _is_empty(leaf):
            return leaf
        return sharding if tuple(leaf.shape) == tuple(param.shape) else whole

    opt_shardings = optax.tree_map_params(
        tx,
        like_param,
        state.opt_state,
        variable_shardings,
        variables,
        transform_non_params=lambda _: whole,
        is_leaf=_is_empty,
    )
    return TrainState(
        step=whole,
        frozen=like_variables(state.frozen),
        trainable=like_variables(state.trainable),
        opt_state=opt_shardings,
        rng=whole,
        model_state=jax.tree.map(lambda _: whole, state.model_state),
    )


def _state_init(init_variables, labels, tx) -> Callable[..., TrainState]:
    """`(rng, *args) -> step-0 state` around `init_variables(*args)`."""

    def init(rng, *args):
        return init_state(init_variables(*args), labels, tx, rng)

    return init


def abstract_train_state(
    init_variables: Callable[..., PyTree],
    *args: Any,
    labels: PyTree,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    mesh: Mesh,
    shard_variables: Callable[[PyTree], PyTree],
) -> tuple[TrainState, TrainState]:
    """(shapes, shardings) of the step-0 state `init_train_state` would build; nothing runs.

    `args` may be arrays or `jax.ShapeDtypeStruct`s. The shapes come back as
    `jax.ShapeDtypeStruct`s carrying their shardings, ready for `jitted.lower(...)`.
    """
    abstract = jax.eval_shape(_state_init(init_variables, labels, tx), rng, *args)
    variables = partition.combine(abstract.frozen, abstract.trainable)
    shardings = state_shardings(abstract, tx, shard_variables(variables), mesh)
    placed = jax.tree.map(
        lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
        abstract,
        shardings,
    )
    return placed, shardings


def init_train_state(
    init_variables: Callable[..., PyTree],
    *args: Any,
    labels: PyTree,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    mesh: Mesh,
    shard_variables: Callable[[PyTree], PyTree],
    donate_args: bool = False,
    compiler_options: dict[str, Any] | None = None,
) -> tuple[TrainState, TrainState]:
    """A step-0 `TrainState` created directly in its shards, and its shardings.

    Args:
      init_variables: `(*args) -> {"params": ..., "lora": ...}`: a model init and `lora.init`,
        or a function that adapts params passed in `args`. Traced, never run eagerly.
      *args: its arguments (keys, existing params): jit arguments, not baked-in constants.
      labels: `partition.variable_labels` of the variables (computable from shapes alone).
      tx: the optimizer.
      rng: the state's rng.
      mesh: the mesh.
      shard_variables: abstract variables -> their shardings, e.g.
        `functools.partial(sharding.variable_shardings, mesh=mesh, logical_axes=...)`.
      donate_args: donate `args` to the state, so that params passed in (already placed in their
        shardings, e.g. by the loader) become the state's leaves without a second copy; they
        must not be used afterwards.
      compiler_options: XLA options for this compilation (as `jax.jit`'s).

    Returns:
      (state, shardings): the state, and a `TrainState` of its leaves' `NamedSharding`s.
    """
    _, shardings = abstract_train_state(
        init_variables, *args, labels=labels, tx=tx, rng=rng, mesh=mesh,
        shard_variables=shard_variables,
    )  # fmt: skip
    donate = tuple(range(1, 1 + len(args))) if donate_args else ()
    init = jax.jit(
        _state_init(init_variables, labels, tx),
        out_shardings=shardings,
        donate_argnums=donate,
        compiler_options=compiler_options,
    )
    return init(rng, *args), shardings


def _on_mesh(fn: Callable, mesh: Mesh) -> Callable:
    """`fn` traced with `mesh` as the current mesh: `lorax_ft.transform.factored` then keeps every adapted
    or frozen layer's output split over the batch axes (see `mesh.split_over_batch`)."""

    @functools.wraps(fn)
    def traced_on_mesh(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args)

    return traced_on_mesh


def make_sharded_train_step(
    apply_fn: Callable,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    shardings: TrainState,
    mesh: Mesh,
    schedule: optax.Schedule | None = None,
    *,
    compiler_options: dict[str, Any] | None = None,
    **step_options: Any,
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]:
    """`make_train_step(apply_fn, loss_fn, tx, schedule, **step_options)`, jitted for `mesh`.

    The state goes in and out with `shardings` and is donated; the batch is split over
    (`data`, `fsdp`), and so are the activations of the layers `factored` sees (without that,
    XLA may split activations on the model axis the FSDP weights are split on, holding the whole
    batch on every device); metrics come back replicated. `compiler_options` go to `jax.jit`, the
    other keywords (`grad_accum`, `skip_nonfinite`) to `make_train_step`. The returned function
    checks, before the jitted call, that every batch array's leading dimension divides over the
    batch devices.
    """
    step = _on_mesh(make_train_step(apply_fn, loss_fn, tx, schedule, **step_options), mesh)
    jitted = jax.jit(
        step,
        in_shardings=(shardings, batch_sharding(mesh)),
        out_shardings=(shardings, replicated(mesh)),
        donate_argnums=0,
        compiler_options=compiler_options,
    )
    ways = batch_devices(mesh)

    def sharded_step(state: TrainState, batch) -> tuple[TrainState, dict[str, jax.Array]]:
        for leaf in jax.tree.leaves(batch):
            if leaf.shape[0] % ways:
                raise ValueError(
                    f"batch size {leaf.shape[0]} does not divide over the {ways} batch devices "
                    f"(mesh data × fsdp); use a multiple of {ways}"
                )
        return jitted(state, batch)

    sharded_step.jitted = jitted  # for .lower(...) and cost analysis
    return sharded_step


def make_sharded_eval_step(
    eval_fn: Callable[[TrainState, Any], Any],
    shardings: TrainState,
    mesh: Mesh,
    *,
    compiler_options: dict[str, Any] | None = None,
) -> Callable[[TrainState, Any], Any]:
    """`eval_fn(state, batch) -> statistics`, jitted for `mesh`: the state is read, never
    donated; the batch is split over (`data`, `fsdp`); the statistics come back replicated."""
    return jax.jit(
        _on_mesh(eval_fn, mesh),
        in_shardings=(shardings, batch_sharding(mesh)),
        out_shardings=replicated(mesh),
        compiler_options=compiler_options,
    )


def global_batch(local_batch: PyTree, mesh: Mesh) -> PyTree:
    """One global batch from every process's local rows, split over (`data`, `fsdp`).

    Process `p` of `P` passes rows `[p·B/P, (p+1)·B/P)` of the global batch (what
    `lorax_ft.data.make_pipeline` gives it); on one process the local batch is the global one.

    >>> batch = global_batch(next(train_data), mesh)   # doctest: +SKIP
    """
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
