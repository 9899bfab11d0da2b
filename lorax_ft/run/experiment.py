"""Everything a run needs before its first step, built from the experiment config on its mesh.

`build(config)` validates the config, makes the mesh (`config.mesh`), loads the base weights
straight into their shardings (`config.sharding` rules over the model's logical axes and
parameter paths), creates the adapters and the optimizer state in their shards, and jits the
shared train and eval steps for the mesh. LoRA and full fine-tuning take the same path; on one
device the mesh is 1×1×1 and nothing changes. A quantized base (`model.quantize`, QLoRA) is
quantized once the adapters exist (`quantized_base`), or kept as a GGUF file's blocks; the steps
are the same, the layers dequantizing their kernels as they run. With `read_weights=False` nothing is read or
allocated: the state is `jax.ShapeDtypeStruct`s with shardings, for `lorax-ft plan`.

>>> experiment = build(config)                                          # doctest: +SKIP
>>> batch = experiment.global_batch(next(train_data))                   # doctest: +SKIP
>>> state, metrics = experiment.train_step(experiment.state, batch)     # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from lorax_ft import data
from lorax_ft.models import abstract_params, logical_axes
from lorax_ft.parallel import mesh as mesh_lib
from lorax_ft.parallel import sharded_step, sharding
from lorax_ft.quant import is_quantized
from lorax_ft.run import config as config_lib
from lorax_ft.run import quantized_base, tasks
from lorax_ft.run.checkpointing import fingerprint
from lorax_ft.run.init_from import initial_values
from lorax_ft.training import optim
from lorax_ft.training.train_step import TrainState
from lorax_ft.transform import lora, paths
from lorax_ft.transform.factored import factored, infer_layouts
from lorax_ft.transform.partition import variable_labels
from lorax_ft.transform.spec import FROZEN, Spec

PyTree = Any


@dataclasses.dataclass
class Experiment:
    """A task on a mesh with its step-0 state and its jitted steps."""

    config: Any
    task: tasks.Task  # its params are shapes: the arrays moved into `state`
    spec: Spec
    mesh: Mesh
    tx: optax.GradientTransformation
    state: TrainState  # arrays, or jax.ShapeDtypeStructs when built without weights
    shardings: TrainState  # NamedSharding of every state leaf
    base_fingerprint: str | None  # of the frozen base weights (None without weights)
    train_step: Callable  # (state, batch) -> (state, metrics); donates the state
    eval_step: Callable  # (state, batch) -> summed statistics, replicated
    # `quantized_base.report` of a quantized base (model.quantize), None for a float one.
    quantization: dict | None = None

    def global_batch(self, local_batch: PyTree) -> PyTree:
        """This process's rows of a batch -> the global batch, split over (`data`, `fsdp`)."""
        return sharded_step.global_batch(local_batch, self.mesh)


def build(config, *, read_weights: bool = True, mode: str | None = None) -> Experiment:
    """The experiment `config` describes, on `jax.devices()`.

    Args:
      config: the experiment config (validated here; `ConfigError` names a bad key).
      read_weights: False builds shapes and shardings only (nothing read or allocated).
      mode: `"lora"` or `"full"` to override `config.peft.mode` (the plan compares both).
    """
    if mode is not None:
        config = config.copy_and_resolve_references()
        config.peft.mode = mode
    config_lib.validate(config, jax.device_count(), jax.process_count())
    config = config_lib.resolve(config)
    mesh = mesh_lib.make_mesh(config.mesh)
    rules = placement_rules(config)

    def place(module):
        return sharding.param_shardings(
            abstract_params(module), mesh, logical_axes=logical_axes(module), **rules
        )

    num_labels = num_labels_of(config)
    task = tasks.build(config, num_labels, place=place, read_weights=read_weights)
    spec = config_lib.peft_spec(config.peft, task.model_config)
    # Shapes are all the layouts read: a GGUF base's blocks stand in as the kernels they hold.
    layouts = infer_layouts(task.module, _float_shapes(task.params), *task.example_inputs)
    gguf = config.model.quantize == "gguf"
    planned = place(task.module) if gguf else None  # the float params' shardings
    if gguf:
        # Blocks stay where a supported layer reads a frozen kernel; the rest becomes float.
        trained = {p for p, a in paths.flatten(spec.labels(task.params)).items() if a != FROZEN}
        params = quantized_base.gguf_base(
            task.params, layouts, trained=trained, embeddings=config.model.quantize_embeddings,
            shardings=planned,
        )  # fmt: skip
        task = dataclasses.replace(task, params=params)

    def fresh_variables(key, params):
        if gguf:
            # DoRA's magnitudes are the norms of the kernels the model reads: the dequantized
            # blocks (gguf refuses PiSSA/OLoRA: the params are not changed).
            view = quantized_base.dora_view(params, spec)
            return {"params": params, "lora": lora.initialize(key, view, spec, layouts)[1]}
        # PiSSA/OLoRA inits also change the base: its kernels become the residuals.
        params, adapters = lora.initialize(key, params, spec, layouts)
        return {"params": params, "lora": adapters}

    rng = jax.random.key(config.train.seed)
    args = (adapter_key(config), task.params)
    adapters = jax.eval_shape(fresh_variables, *args)["lora"]
    init_variables = fresh_variables
    if config.peft.init_from and read_weights:
        start = initial_values(config.peft.init_from, task.module, task.params, adapters, spec)

        def init_variables(key, params):
            variables = fresh_variables(key, params)
            params, adapters = start(variables["params"], variables["lora"])
            return {"params": params, "lora": adapters}

    labels = variable_labels(task.params, adapters, spec)
    tx = optim.make_optimizer(config, labels)
    # The params already sit in (or, as shapes, carry) their shardings; the factors follow them
    # (a GGUF block's factors follow the float kernel's planned sharding).
    param_shardings = jax.tree.map(lambda x: x.sharding, task.params)
    kernel_shardings = param_shardings
    if gguf:
        kernel_shardings = quantized_base.float_shardings(task.params, planned)

    def shard_variables(variables):
        adapters = sharding.lora_shardings(
            variables["lora"], variables["params"], kernel_shardings, layouts
        )
        return {"params": param_shardings, "lora": adapters}

    options = dict(labels=labels, tx=tx, rng=jax.random.fold_in(rng, 2), mesh=mesh)
    options["shard_variables"] = shard_variables
    base = None
    if read_weights:
        base = fingerprint(task.params)  # a GGUF base's blocks as the run keeps them
        shapes = jax.tree.map(_shape_of, task.params, is_leaf=is_quantized)
        # The loaded arrays become the state's frozen leaves: donated, not copied.
        state, shardings = sharded_step.init_train_state(
            init_variables, *args, donate_args=True, **options
        )
        task = dataclasses.replace(task, params=shapes)
        residuals = [p for p, a in spec.lora_targets(shapes).items() if a.changes_base]
        if residuals:
            # PiSSA/OLoRA: the frozen base is the residual the run computed from the loaded
            # base; a resume (or eval, export) must compute the same one.
            flat = paths.flatten(state.variables["params"])
            base += "+residual:" + fingerprint({p: flat[p] for p in residuals})
    else:
        state, shardings = sharded_step.abstract_train_state(init_variables, *args, **options)
    quantization = None
    if gguf:
        quantization = _quantization(config, {}, state)
    elif config.model.quantize in ("int8", "nf4"):
        # After the adapters' init: a PiSSA/OLoRA residual is what gets quantized.
        state, shardings, errors = quantized_base.quantize_state(
            state, shardings, method=config.model.quantize, layouts=layouts,
            double_quant=config.model.double_quant, embeddings=config.model.quantize_embeddings,
            fresh_magnitudes=not config.peft.init_from,
        )  # fmt: skip
        quantization = _quantization(config, errors, state)
        if read_weights:
            # The codes themselves: another method, block layout or set of kernels differs.
            kernels = quantized_base.quantized_kernels(state.frozen["params"])
            base += f"+{config.model.quantize}:" + fingerprint(kernels)

    apply_fn = factored(task.module, constrain=mesh_lib.split_over_batch)
    train_step = sharded_step.make_sharded_train_step(
        apply_fn, task.loss_fn, tx, shardings, mesh, optim.make_schedule(config.schedule),
        grad_accum=config.train.grad_accum,
        skip_nonfinite=config.train.on_nonfinite == "skip",
    )  # fmt: skip

    def evaluate(state: TrainState, batch):
        variables = state.variables
        model = lambda *a, **k: apply_fn(variables["params"], variables["lora"], *a, **k)
        return task.eval_fn(model, batch)

    eval_step = sharded_step.make_sharded_eval_step(evaluate, shardings, mesh)
    return Experiment(
        config, task, spec, mesh, tx, state, shardings, base, train_step, eval_step, quantization
    )  # fmt: skip


def _quantization(config, errors, state) -> dict:
    model = config.model
    return quantized_base.report(
        model.quantize, errors, double_quant=model.double_quant,
        embeddings=model.quantize_embeddings, params=state.frozen["params"],
    )  # fmt: skip


def adapter_key(config) -> jax.Array:
    """The PRNG key of the adapters' initialisation (the same on every rebuild of a run)."""
    return jax.random.fold_in(jax.random.key(config.train.seed), 1)


def placement_rules(config) -> dict[str, Any]:
    """`sharding.param_specs` keyword arguments from the config's `sharding` section."""
    return {
        "rules": tuple(tuple(rule) for rule in config.sharding.logical_rules),
        "path_rules": tuple((regex, P(*spec)) for regex, spec in config.sharding.path_rules),
    }


def _shape_of(x) -> jax.ShapeDtypeStruct:
    """An array's shape; a quantized kernel's is the float kernel's (no sharding of its own)."""
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


def _float_shapes(params: PyTree) -> PyTree:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params, is_leaf=is_quantized
    )


def num_labels_of(config) -> int | None:
    """The classes of a classification task (None for a causal LM)."""
    if config.model.task != "classification":
        return None
    # The mapping the pipelines use, so the head has exactly one output per label id.
    return len(data.label_ids(config.data))
