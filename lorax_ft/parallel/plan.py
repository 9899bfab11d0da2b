"""`lorax-ft plan`: will this fine-tune fit on my devices? Bytes per device, before any training.

For the configured mesh the plan builds the experiment from shapes alone (no weight is read, no
array allocated), in the configured mode and in the other one (LoRA vs full), and compiles the
train step for each. Per device it reports the parameter bytes (frozen base and trainable
leaves), the trainable bytes, the optimizer-state bytes, and the compiled step's memory analysis
(arguments, outputs, donated aliases, temporaries, and their total). With
`lorax-ft plan --simulate_devices=N` it plans for N simulated CPU devices, so a pod slice's mesh
can be planned on a laptop; compiled for CPU, the temporaries are an estimate of an
accelerator's.

>>> report = plan(config)                     # doctest: +SKIP
>>> report["full"]["opt_state_bytes"]          # doctest: +SKIP
"""

from __future__ import annotations

import math
from typing import Any

import jax

from lorax_ft import data
from lorax_ft.parallel.sharded_step import batch_sharding
from lorax_ft.run.experiment import Experiment, build

MODES = ("lora", "full")


def plan(config) -> dict[str, dict[str, Any]]:
    """`{mode: figures}` for the configured mode first, then the other.

    Each mode's figures: `mesh` (axis sizes), `devices`, `param_bytes`, `trainable_bytes`,
    `opt_state_bytes` (per device: the largest over the devices), `total_param_bytes`,
    `total_trainable_bytes`, `total_opt_state_bytes` (summed over the whole model), and the
    compiled step's `argument_bytes`, `output_bytes`, `alias_bytes`, `temp_bytes` and
    `step_bytes` (= arguments + outputs - aliases + temporaries: what one device needs to run
    a step).
    """
    modes = (config.peft.mode, *(m for m in MODES if m != config.peft.mode))
    return {mode: _plan_mode(build(config, read_weights=False, mode=mode)) for mode in modes}


def _plan_mode(experiment: Experiment) -> dict[str, Any]:
    state = experiment.state
    batch = _abstract_batch(experiment)
    compiled = experiment.train_step.jitted.lower(state, batch).compile()
    memory = compiled.memory_analysis()
    figures = {
        "mesh": dict(experiment.mesh.shape),
        "devices": experiment.mesh.size,
        "param_bytes": _per_device([state.frozen, state.trainable]),
        "trainable_bytes": _per_device(state.trainable),
        "opt_state_bytes": _per_device(state.opt_state),
        "total_param_bytes": _total([state.frozen, state.trainable]),
        "total_trainable_bytes": _total(state.trainable),
        "total_opt_state_bytes": _total(state.opt_state),
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
    return "\n".join(lines)
