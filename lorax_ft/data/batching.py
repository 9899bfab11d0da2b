"""From a random-access dataset of examples to this process's batches, on `grain.MapDataset`.

Training shuffles with the seed (a fresh, still deterministic, order every epoch), repeats
(forever by default) and drops the incomplete last global batch. Evaluation reads each example
once in order and pads the last global batch with zero-`weights` rows.

Global batch `b` is examples `[b * B, (b + 1) * B)` of that stream; process `p` of `P` gets rows
`[p * B / P, (p + 1) * B / P)` of it. Local batch `b` therefore always belongs to global batch
`b`, so the iterator state (the next batch index) is the same on every process.

>>> ds = grain.MapDataset.source([{"x": np.int32(i)} for i in range(10)])  # doctest: +SKIP
>>> it = BatchIterator(batch_dataset(ds, train=True, global_batch_size=4, seed=0))  # doctest: +SKIP
>>> next(it)["x"].shape  # doctest: +SKIP
(4,)
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from lorax_ft.data.errors import DataError

Example = dict[str, np.ndarray]


def padding_example(example: Example) -> Example:
    """A row shaped like `example` that every metric ignores: zeros, with `weights` 0.

    Its attention mask is all ones so no attention row is fully masked (which gives NaN in
    softmax); `weights` and `loss_mask` 0 keep it out of losses and metrics.

    >>> float(padding_example({"input_ids": np.array([5, 6]), "weights": np.float32(1)})["weights"])
    0.0
    """
    pad = {k: np.zeros_like(v) for k, v in example.items()}
    if "attention_mask" in pad:
        pad["attention_mask"] = np.ones_like(pad["attention_mask"])
    return pad


def batch_dataset(
    examples: grain.MapDataset,
    *,
    train: bool,
    global_batch_size: int,
    seed: int = 0,
    num_epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """Returns a `MapDataset` whose element `b` is this process's part of global batch `b`.

    Args:
      examples: Fixed-shape example dicts, one per index.
      train: Shuffle, repeat and drop the remainder (True) or one padded ordered pass (False).
      global_batch_size: Rows of a batch summed over all processes.
      seed: Shuffle seed (training only), in `[0, 2**32)`.
      num_epochs: Training epochs; None repeats forever. Evaluation is always one pass.
      process_index: This process, in `[0, process_count)`.
      process_count: Number of processes that read the data.

    Returns:
      A dataset of batches: dicts of arrays with leading size `global_batch_size // process_count`.
    """
    n = len(examples)
    if n == 0:
        raise DataError("the dataset is empty; check the data path, split and eval_fraction")
    if global_batch_size < 1 or global_batch_size % process_count:
        raise DataError(
            f"batch_size {global_batch_size} must be a positive multiple of the process count "
            f"{process_count}"
        )
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} not in [0, {process_count})")
    local = global_batch_size // process_count
    if train:
        ds = examples.shuffle(seed).repeat(num_epochs)
        if num_epochs is not None:
            batches = n * num_epochs // global_batch_size
            if batches == 0:
                raise DataError(
                    f"{n} examples x {num_epochs} epochs do not fill one batch of {global_batch_size}"
                )
            ds = ds[: batches * global_batch_size]
    else:
        if num_epochs not in (None, 1):
            raise DataError(f"evaluation is a single pass; got num_epochs={num_epochs}")
        missing = -n % global_batch_size
        pad = grain.MapDataset.source([padding_example(examples[0])] * missing)
        ds = grain.MapDataset.concatenate([examples, pad]) if missing else examples
    # Chunk c of `local` rows is part (c mod P) of global batch (c div P).
    return ds.batch(local, drop_remainder=True)[process_index::process_count]


class BatchIterator:
    """Iterator over batches with a JSON-able, restorable position.

    `get_state()` returns `{"next_batch": int, "grain": dict, "pipeline": dict}`; `set_state` on
    an iterator of the same pipeline (same data, batch size and seed) continues with exactly the
    batches the saved iterator would have produced next. `pipeline` describes what the batches
    are made of; a state saved by a different pipeline is refused rather than silently giving
    other batches.

    >>> it = BatchIterator(batches)  # doctest: +SKIP
    >>> state = it.get_state(); a = next(it)  # doctest: +SKIP
    >>> it2 = BatchIterator(batches); it2.set_state(state); b = next(it2)  # a == b  # doctest: +SKIP
    """

    def __init__(
        self,
        batches: grain.MapDataset,
        *,
        forever: bool = False,
        pipeline: dict[str, Any] | None = None,
        num_threads: int = 4,
        prefetch_buffer_size: int = 16,
    ):
        """Starts iterating over `batches` (see `batch_dataset`) from the first one.

        Args:
          batches: The batch dataset.
          forever: Whether `batches` repeats without end (training with `num_epochs=None`).
          pipeline: JSON-able facts that must match for a state to be restorable (e.g. number
            of examples, global batch size, seed); a `"source"` entry is informational only, so
            data moved to another directory still resumes.
          num_threads: Threads computing batches.
          prefetch_buffer_size: Batches computed ahead.
        """
        self._num_batches = None if forever else len(batches)
        self.pipeline = dict(pipeline or {})
        # Batches are computed in threads but returned in order, so threading never changes
        # what a run sees; the buffer counts batches.
        options = grain.ReadOptions(
            num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size
        )
        self._iter = batches.to_iter_dataset(options).__iter__()
        self._next = 0

    @property
    def num_batches(self) -> int | None:
        """Batches in a full pass, or None when training repeats forever."""
        return self._num_batches

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iter)
        self._next += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        """The position: index of the next batch, plus grain's own iterator state."""
        return {
            "next_batch": self._next,
            "grain": self._iter.get_state(),
            "pipeline": dict(self.pipeline),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Moves to a position saved by `get_state` (from this or an identical pipeline)."""
        if not isinstance(state, dict) or "grain" not in state or "next_batch" not in state:
            raise DataError(
                f"not a data iterator state: {state!r}; expected get_state()'s "
                "{'next_batch': int, 'grain': dict}"
            )
        saved = {k: v for k, v in state.get("pipeline", {}).items() if k != "source"}
        if saved != {k: v for k, v in self.pipeline.items() if k != "source"}:
            raise DataError(
                f"iterator state is from another pipeline: saved {saved}, this one {self.pipeline}"
            )
        self._iter.set_state(state["grain"])
        self._next = int(state["next_batch"])

    def close(self) -> None:
        """Stops the prefetch threads."""
        self._iter.close()
