"""Checkpoints of a fine-tune with orbax: what was trained, never the frozen base weights.

A checkpoint holds the trainable variables, the optimizer state, the step, the rng, the data
iterator's state, a fingerprint of the frozen base and the config keys the trainables depend
on (`lorax_ft.run.resume`). The base is reloaded from its source on resume. Saves are atomic (orbax
writes to a temporary directory and renames it on commit), asynchronous, checksummed
(`lorax_ft.run.integrity`), and only the newest `keep` are kept.

Restoring takes the newest checkpoint that is intact: a damaged one is named in a one-line
warning and skipped (and, when training resumes, moved out of the way to `set_aside`); a
checkpoint of another run is refused with one line naming what differs (`lorax_ft.run.resume`). A
full disk while saving is one line too, and leaves no partial checkpoint behind.

>>> ckpt = Checkpointer(workdir / "checkpoints", keep=2)        # doctest: +SKIP
>>> run = resume_config(config)                                 # doctest: +SKIP
>>> ckpt.save(state, data_state=it.get_state(), base=fp, config=run)  # doctest: +SKIP
>>> state, data_state = ckpt.restore(state, base=fp, config=run)      # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging as pylogging
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lorax_ft.errors import UserError
from lorax_ft.run import integrity
from lorax_ft.run.resume import CheckpointMismatchError, check_same_run, leaf_specs
from lorax_ft.training.train_step import TrainState

__all__ = ["CheckpointMismatchError", "Checkpointer", "fingerprint"]  # the error lives in resume

PyTree = Any

_ORBAX_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's name for a step being written


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
    """An orbax CheckpointManager for `TrainState` plus data-iterator state and what the run is.

    `use_async=False` makes `save` return once the checkpoint is committed (orbax still writes
    it in its background thread, so that the checksum manifest is recorded in one place).
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 3, use_async: bool = True):
        self.directory = os.path.abspath(directory)  # orbax requires absolute paths
        self._use_async = use_async
        self._saving: int | None = None  # the step being written; read by `_record_manifest`
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=True,
            create=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._record_manifest),
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        # A full disk is reported once, by `_writing`, not also as orbax's threads' tracebacks.
        self._quiet = _OrbaxOutOfSpaceFilter()
        logging.get_absl_logger().addFilter(self._quiet)

    def steps(self) -> list[int]:
        """The steps of the committed checkpoints in the directory, oldest first."""
        names = os.listdir(self.directory) if os.path.isdir(self.directory) else []
        return sorted(
            int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(self.directory, n))
        )

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(
        self, state: TrainState, *, data_state: dict, base: str, config: dict | None = None
    ) -> None:
        """Starts saving `state` at its step (returns before the write finishes when async).

        Args:
          state: the train state.
          data_state: the data iterator's state after the batches `state` was trained on.
          base: the fingerprint of the frozen base.
          config: `resume_config(config)` of the run.

        Raises:
          UserError: the disk is full (this save's partial files are removed).
        """
        step = int(jax.device_get(state.step))
        meta = {"base_fingerprint": base, "step": step, "config": config or {}}
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(_saved(state)),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta),
        )
        with self._writing():
            self._manager.wait_until_finished()  # orbax would too; then `_saving` is this step's
            self._saving = step
            self._manager.save(step, args=args, force=True)
            if not self._use_async:
                self._manager.wait_until_finished()

    def restore(
        self,
        template: TrainState,
        *,
        base: str,
        config: dict | None = None,
        set_aside: str | None = None,
    ) -> tuple[TrainState, dict]:
        """(state, data_state) from the newest intact checkpoint.

        A damaged checkpoint (see `lorax_ft.run.integrity`; or one orbax cannot read) is skipped with
        a one-line warning naming it and what is wrong.

        Args:
          template: a state with the right structure, shapes, dtypes and shardings (a freshly
            initialised one); its frozen part is kept as it is.
          base: the fingerprint of the frozen base the run has loaded.
          config: `resume_config(config)` of this run (None: not checked).
          set_aside: a directory to move the skipped damaged checkpoints into (a resumed run
            will write those steps again); None leaves them where they are.

        Raises:
          CheckpointMismatchError: the checkpoint belongs to another run (config, base, layout).
          UserError: no checkpoint is intact.
        """
        damaged = {}  # step -> what is wrong, newest first
        for step in reversed(self.steps()):
            try:
                restored = self._read(step, template, base=base, config=config)
            except _Damaged as e:
                damaged[step] = str(e)
                continue
            self._skip(damaged, step, set_aside)
            saved = restored["state"]
            state = template.replace(
                step=saved["step"],
                trainable=saved["trainable"],
                opt_state=saved["opt_state"],
                rng=jax.random.wrap_key_data(saved["rng"]),
            )
            return state, restored["data"]
        reasons = "; ".join(f"step {s}: {why}" for s, why in damaged.items())
        raise UserError(
            f"no intact checkpoint in {self.directory} ({reasons or 'it is empty'}): move the "
            "directory away to train from the start, or use a new --workdir"
        )

    def wait(self) -> None:
        """Blocks until every started save has been committed."""
        with self._writing():
            self._manager.wait_until_finished()

    def close(self) -> None:
        with self._writing():
            self._manager.close()
        logging.get_absl_logger().removeFilter(self._quiet)

    def _read(self, step: int, template: TrainState, *, base: str, config: dict | None) -> dict:
        """The checkpoint at `step`, verified and checked to be this run's.

        Raises:
          _Damaged: its files are not as written (or orbax cannot read them).
          CheckpointMismatchError: it is another run's.
        """
        step_dir = os.path.join(self.directory, str(step))
        problem = integrity.verify(step_dir)
        if problem not in (None, integrity.NO_MANIFEST):
            raise _Damaged(problem)
        handler = ocp.StandardCheckpointHandler()
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            saved = leaf_specs(handler.metadata(epath.Path(step_dir) / "state").tree)
        except Exception as e:  # a checkpoint without manifest, or orbax's step-level files
            raise _Damaged(f"unreadable: {_first_line(e)}") from e
        finally:
            handler.close()
        expected = leaf_specs(_saved(template))
        check_same_run(step_dir, meta["meta"], saved, expected, base=base, config=config)
        try:
            restored = self._manager.restore(step, args=_restore_args(template))
        except Exception as e:
            raise _Damaged(f"unreadable: {_first_line(e)}") from e
        if problem == integrity.NO_MANIFEST:
            logging.warning(
                "checkpoint %s has %s, written by an earlier lorax-ft: restoring it unverified",
                step_dir, integrity.NO_MANIFEST,
            )  # fmt: skip
        return restored

    def _skip(self, damaged: dict, used: int, set_aside: str | None) -> None:
        """Warns about each damaged checkpoint newer than `used`, moving it to `set_aside`."""
        moved = {}
        if set_aside is not None and damaged:
            if jax.process_index() == 0:
                os.makedirs(set_aside, exist_ok=True)
                for step in damaged:
                    moved[step] = _free_name(os.path.join(set_aside, str(step)))
                    os.replace(os.path.join(self.directory, str(step)), moved[step])
            if jax.process_count() > 1:
                multihost_utils.sync_global_devices("lorax_ft: damaged checkpoints set aside")
            self._manager.reload()
        for step, why in damaged.items():
            where = f"; moved it to {moved[step]}" if step in moved else ""
            logging.warning(
                "checkpoint %s/%d is damaged (%s)%s; using step %d instead",
                self.directory, step, why, where, used,
            )  # fmt: skip

    def _record_manifest(self) -> None:
        """orbax's post-finalization hook: on the primary process, once every process has
        written its files and before the temporary directory is renamed into place."""
        step_dir = os.path.join(self.directory, str(self._saving))
        tmp = step_dir + _ORBAX_TMP_SUFFIX
        integrity.write_manifest(tmp if os.path.isdir(tmp) else step_dir)

    @contextlib.contextmanager
    def _writing(self):
        """Turns a full disk into a `UserError`, removing the partial checkpoint."""
        try:
            yield
        except Exception as e:
            if not _out_of_space(e):
                raise
            if jax.process_index() == 0:
                for name in os.listdir(self.directory):
                    if _ORBAX_TMP_SUFFIX in name:
                        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
            steps = self.steps()
            kept = f"step {steps[-1]} is the newest checkpoint" if steps else "none was complete"
            raise UserError(
                f"no space left on the device while saving checkpoint {self._saving} to "
                f"{self.directory}: its partial files were removed and {kept}; free some "
                "space (or lower checkpoint.keep) and run the same command again to resume"
            ) from e


class _OrbaxOutOfSpaceFilter(pylogging.Filter):
    """Drops orbax's log records of a full disk: its writer threads log the error, with its
    traceback, three times before the `Checkpointer` can report it as one line."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        full = _out_of_space(error) or "No space left on device" in record.getMessage()
        return not (full and f"{os.sep}orbax{os.sep}" in record.pathname)


class _Damaged(Exception):
    """A checkpoint whose files are not as they were written; the message says what is wrong."""


def _restore_args(template: TrainState) -> ocp.args.Composite:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _saved(template))
    return ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore())


def _free_name(path: str) -> str:
    candidate, n = path, 1
    while os.path.exists(candidate):
        n += 1
        candidate = f"{path}-{n}"
    return candidate


def _out_of_space(error: BaseException | None) -> bool:
    """Whether `error` or one it came from is a full disk or quota (tensorstore reports it as a
    ValueError whose message holds the OS error)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(error)
        if "No space left on device" in text or "Disk quota exceeded" in text:
            return True
        error = error.__cause__ or error.__context__
    return False


def _first_line(error: BaseException) -> str:
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return line if len(line) <= 200 else line[:197] + "..."


def _saved(state: TrainState) -> dict:
    return {
        "step": state.step,
        "trainable": state.trainable,
        "opt_state": state.opt_state,
        "rng": jax.random.key_data(state.rng),
    }
