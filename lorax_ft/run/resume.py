"""What a resume may not change: whether a checkpoint belongs to the run that restores it.

A checkpoint records the config keys its trainables depend on (`RESUME_KEYS`) and the
fingerprint of the frozen base; its arrays carry their paths, shapes and dtypes. `check_same_run`
compares them with the restoring run in the order that names the cause: the config keys first
(a changed `train.seed` also changes the classifier head, so the base fingerprint would differ
too, and name the wrong cause), then the base, then the layout of the arrays (which a config
change the keys miss, or a code change, can still alter). Each refusal is one line.

>>> meta = {"config": resume_config(old_config), "base_fingerprint": fp}    # doctest: +SKIP
>>> check_same_run("run/checkpoints/4", meta, leaf_specs(saved), leaf_specs(template),
...                base=fp, config=resume_config(config))               # doctest: +SKIP
CheckpointMismatchError: checkpoint run/checkpoints/4 was trained with peft.alpha=16.0 (now 32.0): ...
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np

from lorax_ft.errors import UserError

RESUME_KEYS = (
    "model.preset", "model.task", "model.param_dtype", "model.scan_layers",
    "model.classifier_pooling", "model.quantize", "model.double_quant",
    "model.quantize_embeddings", "peft.mode", "peft.targets", "peft.rank", "peft.alpha",
    "peft.rslora", "peft.dora", "peft.init", "peft.train", "peft.rules", "train.seed",
)  # fmt: skip
"""Config keys a checkpoint's trainables depend on: a resume that changes one is another run.

They decide which arrays are trained and what they mean (targets, rank, mode, `peft.train`),
how the adapters are applied (alpha and rslora scale them: a changed alpha would silently
rescale every trained update), the base and its new head (preset, task, dtype, layer layout,
pooling, quantization: adapters trained on a quantized base learned to correct its codes; the
seed initialises the head and orders the data). Everything else may change on
resume: steps, schedule, optimizer, logging and eval cadence, batch size, mesh and sharding,
dropout (`peft.dropout` regularises like weight decay does), data. `model.path` is left to the
base fingerprint: a moved model directory with the same weights is the same base.
"""

ADDED_KEYS = {
    "model.quantize": "none",
    "model.double_quant": False,
    "model.quantize_embeddings": False,
}
"""Resume keys added after checkpoints were first written, with the value every earlier run
had: a checkpoint that does not record one was trained with it."""


class CheckpointMismatchError(UserError, RuntimeError):
    """A checkpoint that does not belong to this run: another config, base model or layout."""


def resume_config(config) -> dict:
    """The values of `RESUME_KEYS` in `config`, as JSON would store them."""
    values = {key: config[key.split(".")[0]].get(key.split(".")[1]) for key in RESUME_KEYS}
    return json.loads(json.dumps(values))


def check_same_run(
    step_dir: str, meta: dict, saved: dict, expected: dict, *, base: str, config: dict | None
) -> None:
    """Raises CheckpointMismatchError when the checkpoint in `step_dir` is another run's.

    Args:
      step_dir: the checkpoint, for the message.
      meta: its recorded `{"config": ..., "base_fingerprint": ...}`.
      saved: `leaf_specs` of its arrays.
      expected: `leaf_specs` of the arrays this run restores into.
      base: the fingerprint of the base this run loaded.
      config: `resume_config` of this run (None: not compared).
    """
    check_same_config(step_dir, meta, config)
    if meta["base_fingerprint"] != base:
        raise CheckpointMismatchError(
            f"checkpoint {step_dir} was trained on a base model with fingerprint "
            f"{meta['base_fingerprint']}, but this run loaded {base}: resume with the same "
            "model source, or use a new --workdir"
        )
    differ = [k for k in expected.keys() | saved.keys() if expected.get(k) != saved.get(k)]
    if differ:
        first = min(differ, key=lambda k: (not k.startswith("trainable/"), k))  # the cause
        raise CheckpointMismatchError(
            f"checkpoint {step_dir} holds other arrays than this run trains ({len(differ)} "
            f"differ; {first}: {_describe(saved.get(first))} in the checkpoint, "
            f"{_describe(expected.get(first))} now): use the config it was trained with, or "
            "a new --workdir"
        )


def check_same_config(step_dir: str, meta: dict, config: dict | None) -> None:
    """Raises CheckpointMismatchError when `config` (`resume_config` of this run; None: not
    compared) changes a resume key that the checkpoint in `step_dir` recorded in `meta`.

    Needs no weights, only the checkpoint's record.
    """
    recorded = meta.get("config", {})  # empty in checkpoints of earlier versions
    if recorded:
        recorded = {**ADDED_KEYS, **recorded}
    changed = [k for k in config or {} if k in recorded and recorded[k] != config[k]]
    if changed:
        described = ", ".join(f"{k}={recorded[k]!r} (now {config[k]!r})" for k in changed)
        one = len(changed) == 1
        raise CheckpointMismatchError(
            f"checkpoint {step_dir} was trained with {described}: a run cannot change "
            f"{'this key' if one else 'these keys'} on resume; restore {'it' if one else 'them'} "
            "(the run's config is config.json in its workdir), or use a new --workdir to start "
            "another run"
        )


def leaf_specs(tree: Any) -> dict[str, tuple]:
    """'/'-joined leaf path -> (shape, dtype name), alike for arrays and orbax's metadata.

    Orbax's metadata tree has lists and dicts where the state has tuples and NamedTuples: the
    paths are compared by their names and indices only.
    """
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "/".join(_key_name(k) for k in path): (tuple(leaf.shape), np.dtype(leaf.dtype).name)
        for path, leaf in leaves
    }


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _describe(spec) -> str:
    return "absent" if spec is None else f"{spec[1]}{list(spec[0])}"
