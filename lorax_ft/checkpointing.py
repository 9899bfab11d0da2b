"""Checkpoints of a fine-tune with orbax: what was trained, never the frozen base weights.

A checkpoint holds the trainable variables, the optimizer state, the step, the rng, the data
iterator's state and a fingerprint of the frozen base. The base is reloaded from its source on
resume, and a checkpoint refuses to resume on a base with another fingerprint. Saves are atomic
(orbax writes to a temporary directory and renames it on commit), asynchronous, and only the
newest `keep` are kept.

>>> ckpt = Checkpointer(workdir / "checkpoints", keep=2)        # doctest: +SKIP
>>> ckpt.save(state, data_state=it.get_state(), base=fingerprint(params))  # doctest: +SKIP
>>> state, data_state = ckpt.restore(state, base=fingerprint(params))      # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lorax_ft.train_step import TrainState

PyTree = Any


class CheckpointMismatchError(RuntimeError):
    """A checkpoint that does not belong to this base model or state layout."""


def fingerprint(params: PyTree, samples_per_leaf: int = 4096) -> str:
    """A short hash of a params pytree: paths, shapes, dtypes and a strided sample of values.

    Cheap enough to compute for every run, and different for different weights in practice. The
    samples are taken on the devices and only they are fetched, so params sharded over many
    devices or processes are never gathered; the hash does not depend on how they are sharded.
    """
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    strides = [max(1, leaf.size // samples_per_leaf) for _, leaf in leaves]

    def sample(arrays):
        return [x.reshape(-1)[::stride] for x, stride in zip(arrays, strides, strict=True)]

    arrays = [leaf for _, leaf in leaves]
    meshes = {
        x.sharding.mesh for x in arrays if isinstance(getattr(x, "sharding", None), NamedSharding)
    }
    # Replicated samples are readable on every process, whichever devices hold the leaves.
    out = NamedSharding(meshes.pop(), P()) if len(meshes) == 1 else None
    samples = jax.device_get(jax.jit(sample, out_shardings=out)(arrays))
    digest = hashlib.sha256()
    for (keypath, leaf), values in zip(leaves, samples, strict=True):
        digest.update(f"{jax.tree_util.keystr(keypath)}{tuple(leaf.shape)}{leaf.dtype}".encode())
        digest.update(np.ascontiguousarray(values).tobytes())
    return digest.hexdigest()[:16]


class Checkpointer:
    """An orbax CheckpointManager for `TrainState` plus data-iterator state and base fingerprint."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3, use_async: bool = True):
        self.directory = os.path.abspath(directory)  # orbax requires absolute paths
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=use_async, create=True
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, state: TrainState, *, data_state: dict, base: str) -> None:
        """Starts saving `state` at its step (returns before the write finishes when async)."""
        step = int(jax.device_get(state.step))
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(_saved(state)),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave({"base_fingerprint": base, "step": step}),
        )
        self._manager.save(step, args=args, force=True)

    def restore(self, template: TrainState, *, base: str, step: int | None = None):
        """(state, data_state) from the checkpoint at `step` (default: the latest).

        Args:
          template: a state with the right structure, shapes, dtypes and shardings (a freshly
            initialised one); its frozen part is kept as it is.
          base: the fingerprint of the frozen base the run has loaded.

        Raises:
          CheckpointMismatchError: the checkpoint was made on another base model.
        """
        step = self.latest_step() if step is None else step
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        saved_base = meta["meta"]["base_fingerprint"]
        if saved_base != base:
            raise CheckpointMismatchError(
                f"checkpoint {self.directory}/{step} was trained on a base model with fingerprint "
                f"{saved_base}, but this run loaded {base}: resume with the same model source, or "
                "use a new --workdir"
            )
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _saved(template))
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()
            ),
        )
        saved = restored["state"]
        state = template.replace(
            step=saved["step"],
            trainable=saved["trainable"],
            opt_state=saved["opt_state"],
            rng=jax.random.wrap_key_data(saved["rng"]),
        )
        return state, restored["data"]

    def wait(self) -> None:
        """Blocks until every started save has been committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def _saved(state: TrainState) -> dict:
    return {
        "step": state.step,
        "trainable": state.trainable,
        "opt_state": state.opt_state,
        "rng": jax.random.key_data(state.rng),
    }
