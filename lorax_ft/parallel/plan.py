"""`lorax-ft plan`: will this fine-tune fit on my devices? Bytes per device, before any training.

For the configured mesh the plan builds the experiment from shapes alone (no weight is read, no
array allocated), in the configured mode and in the other one (LoRA vs full), and compiles the
train step for each. Per device it reports the parameter bytes (frozen base and trainable
leaves), the trainable bytes, the optimizer-state bytes, and the compiled step's memory analysis
(arguments, outputs, donated aliases, temporaries, and their total). With
`lorax-ft plan --simulate_devices=N` it plans for N simulated CPU devices, so a pod slice's mesh
can be planned on a laptop; compiled for CPU, the temporaries are an estimate of an
accelerator's.

With `model.quantize` (QLoRA) the LoRA plan's base is the quantized one, measured from the
abstract `QuantizedKernel`s the experiment builds (codes, block scales: their shapes and
shardings, nothing loaded; a GGUF base's own blocks, Q4_1 at 0.625 bytes a parameter), and the
plan also gives the same base unquantized: every quantized kernel counted as the float kernel it
stands for, placed by the kernel's own spec. Full fine-tuning trains every weight in float, so its
plan is the unquantized model's.

>>> report = plan(config)                     # doctest: +SKIP
>>> report["full"]["opt_state_bytes"]          # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import NamedSharding

from lorax_ft import data
from lorax_ft.parallel.sharded_step import batch_sharding
from lorax_ft.parallel.sharding import kernel_spec
from lorax_ft.quant import is_quantized
from lorax_ft.run.experiment import Experiment, build

MODES = ("lora", "full")


def plan(config, modes: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """`{mode: figures}` for the configured mode first, then the other (or for `modes`).

    Each mode's figures: `mesh` (axis sizes), `devices`, `quantize` (the base's method, "none"
    for a float one), `param_bytes`, `base_bytes` (the frozen leaves), `trainable_bytes`,
    `opt_state_bytes` (per device: the largest over the devices), their `total_*` (summed over
    the whole model), `unquantized_param_bytes` and `unquantized_base_bytes` (per device, and
    `total_unquantized_*`: the same figures with every quantized kernel counted in float; equal
    to the others for a float base), and the compiled step's `argument_bytes`, `output_bytes`,
    `alias_bytes`, `temp_bytes` and `step_bytes` (= arguments + outputs - aliases +
    temporaries: what one device needs to run a step).

    >>> report = plan(config, modes=["lora"])          # doctest: +SKIP
    >>> report["lora"]["param_bytes"] / report["lora"]["unquantized_param_bytes"]  # doctest: +SKIP
    0.345
    """
    if modes is None:
        modes = (config.peft.mode, *(m for m in MODES if m != config.peft.mode))
    return {
        mode: _plan_mode(build(_config_for(config, mode), read_weights=False, mode=mode))
        for mode in modes
    }


def _config_for(config, mode: str):
    """The config planned for `mode`: a quantized base is frozen, so full fine-tuning (which
    trains every weight) plans the float model."""
    if mode == "lora" or config.model.quantize == "none":
        return config
    config = config.copy_and_resolve_references()
    config.model.update(quantize="none", double_quant=False, quantize_embeddings=False)
    return config


def _plan_mode(experiment: Experiment) -> dict[str, Any]:
    state = experiment.state
    batch = _abstract_batch(experiment)
    compiled = experiment.train_step.jitted.lower(state, batch).compile()
    memory = compiled.memory_analysis()
    params = [state.frozen, state.trainable]
    floats = [unquantized(state.frozen), state.trainable]
    figures = {
        "mesh": dict(experiment.mesh.shape),
        "devices": experiment.mesh.size,
        "quantize": experiment.config.model.quantize,
        "param_bytes": _per_device(params),
        "base_bytes": _per_device(state.frozen),
        "trainable_bytes": _per_device(state.trainable),
        "opt_state_bytes": _per_device(state.opt_state),
        "unquantized_param_bytes": _per_device(floats),
        "unquantized_base_bytes": _per_device(floats[0]),
        "total_param_bytes": _total(params),
        "total_base_bytes": _total(state.frozen),
        "total_trainable_bytes": _total(state.trainable),
        "total_opt_state_bytes": _total(state.opt_state),
        "total_unquantized_param_bytes": _total(floats),
        "total_unquantized_base_bytes": _total(floats[0]),
        "argument_bytes": memory.argument_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes,
        "alias_bytes": memory.alias_size_in_bytes,
        "temp_bytes": memory.temp_size_in_bytes,
    }
    figures["step_bytes"] = (
        figures["argument_bytes"]
        + figures["output_bytes"]
        - figures["alias_bytes"]
        + figures["temp_bytes"]
    )
    return figures


def _abstract_batch(experiment: Experiment):
    """Shapes of one global training batch, from the first batch the data pipeline makes."""
    config, task = experiment.config, experiment.task
    batches = data.make_pipeline(
        config.data, task.tokenizer, split="train", batch_size=config.train.batch_size,
        seed=config.train.seed, **task.data_kwargs,
    )  # fmt: skip
    first = next(batches)
    batches.close()
    sharding = batch_sharding(experiment.mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), first)


def unquantized(tree):
    """`tree` (abstract leaves with shardings) with every quantized kernel as the float kernel it
    stands for: its shape and dtype, placed by the kernel's spec (`sharding.kernel_spec`).

    >>> unquantized({"w": nf4_kernel_shapes})["w"].shape == nf4_kernel_shapes.shape  # doctest: +SKIP
    True
    """

    def floating(leaf):
        if not is_quantized(leaf):
            return leaf
        shardings = jax.tree.map(lambda x: x.sharding, leaf)
        sharding = NamedSharding(leaf.values.sharding.mesh, kernel_spec(shardings))
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    return jax.tree.map(floating, tree, is_leaf=is_quantized)


def _leaf_bytes(leaf) -> int:
    return math.prod(leaf.shape) * leaf.dtype.itemsize


def _per_device(tree) -> int:
    """Bytes the most loaded device holds of `tree` (abstract leaves with shardings)."""
    held: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        for device, index in leaf.sharding.devices_indices_map(tuple(leaf.shape)).items():
            shape = [len(range(*i.indices(n))) for i, n in zip(index, leaf.shape, strict=True)]
            held[device] = held.get(device, 0) + math.prod(shape) * leaf.dtype.itemsize
    return max(held.values(), default=0)


def _total(tree) -> int:
    return sum(_leaf_bytes(leaf) for leaf in jax.tree.leaves(tree))


def format_plan(report: dict[str, dict[str, Any]]) -> str:
    """The plan as a table, modes side by side, in MiB per device."""
    modes = list(report)
    first = report[modes[0]]
    mesh = " × ".join(f"{axis}={size}" for axis, size in first["mesh"].items())
    rows = [
        ("parameters (base + trainable)", "param_bytes"),
        ("trainable parameters", "trainable_bytes"),
        ("optimizer state", "opt_state_bytes"),
        ("step arguments", "argument_bytes"),
        ("step temporaries", "temp_bytes"),
        ("step total", "step_bytes"),
    ]
    lines = [
        f"Plan for {first['devices']} devices, mesh {mesh}; MiB per device",
        "",
        f"| {'':32} | " + " | ".join(f"{m:>12}" for m in modes) + " |",
        f"|{'-' * 34}|" + "|".join("-" * 14 for _ in modes) + "|",
    ]
    for label, key in rows:
        values = " | ".join(f"{report[m][key] / 2**20:12.2f}" for m in modes)
        lines.append(f"| {label:32} | {values} |")
    for mode, figures in report.items():
        if figures.get("quantize", "none") != "none":
            lines += ["", quantized_line(mode, figures)]
    return "\n".join(lines)


def quantized_line(mode: str, figures: dict[str, Any]) -> str:
    """What a quantized base saves per device, e.g. `lora: base params: 166.0 MiB per device
    (nf4; 513.1 MiB unquantized, 0.32x); parameters (base + trainable): 184.6 MiB (0.35x)`."""
    mib = lambda key: figures[key] / 2**20
    ratio = lambda key: figures[key] / max(figures[f"unquantized_{key}"], 1)
    return (
        f"{mode}: base params: {mib('base_bytes'):.1f} MiB per device ({figures['quantize']}; "
        f"{mib('unquantized_base_bytes'):.1f} MiB unquantized, {ratio('base_bytes'):.2f}x); "
        f"parameters (base + trainable): {mib('param_bytes'):.1f} MiB "
        f"({ratio('param_bytes'):.2f}x)"
    )
