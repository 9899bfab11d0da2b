"""Deterministic train/eval splits of a list of records.

The split seed is separate from the training seed on purpose: changing the shuffle of a run
must never move examples between the training and the evaluation set.

>>> train = split_records(list(range(10)), "train", eval_fraction=0.2, seed=0)
>>> evl = split_records(list(range(10)), "eval", eval_fraction=0.2, seed=0)
>>> sorted(train + evl) == list(range(10)), len(evl)
(True, 2)
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

import numpy as np

from lorax_ft.data.errors import DataError

T = TypeVar("T")
SPLITS = ("train", "eval")


def check_split(split: str) -> None:
    """Raises a one-line `DataError` unless `split` is `"train"` or `"eval"`."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")


def _num_eval(n: int, eval_fraction: float) -> int:
    if not 0.0 < eval_fraction < 1.0:
        raise DataError(f"data.eval_fraction={eval_fraction!r} must be in (0, 1)")
    # At least one eval example from every group that has two or more, so a small class is
    # still measured; never all of a group, so it is still trained on.
    return min(max(round(n * eval_fraction), 1), n - 1) if n >= 2 else 0


def split_records(
    records: Sequence[T],
    split: str,
    *,
    eval_fraction: float,
    seed: int,
    group: Callable[[T], Hashable] | None = None,
) -> list[T]:
    """Returns the `split` part of a seeded random split, keeping the records' original order.

    Args:
      records: All records.
      split: `"train"` or `"eval"`.
      eval_fraction: Fraction of records (of each group, if `group`) that go to eval.
      seed: Split seed; the same seed gives the same split on every machine.
      group: Optional key (e.g. the label); the split is then stratified by it.

    Returns:
      The records of `split`, in their input order.

    >>> split_records(["a", "b", "c", "d"], "eval", eval_fraction=0.5, seed=1)
    ['a', 'b']
    """
    check_split(split)
    rng = np.random.default_rng(seed)
    keys = [group(r) for r in records] if group else [None] * len(records)
    is_eval = np.zeros(len(records), dtype=bool)
    # Groups are visited in sorted order so the rng stream, hence the split, does not depend on
    # which group happens to come first in the file.
    for key in sorted(set(keys), key=repr):
        idx = np.array([i for i, k in enumerate(keys) if k == key])
        is_eval[rng.permutation(idx)[: _num_eval(len(idx), eval_fraction)]] = True
    want = split == "eval"
    return [r for r, e in zip(records, is_eval, strict=True) if e == want]


def split_text_tail(documents: Sequence[str], split: str, *, eval_fraction: float) -> list[str]:
    """Splits every document at a line boundary: the last `eval_fraction` of its lines is eval.

    A held-out tail (as nanoGPT does for Shakespeare) works for one big file as well as for many
    documents, and keeps each part contiguous text rather than shuffled lines.

    >>> split_text_tail(["1\\n2\\n3\\n4\\n"], "eval", eval_fraction=0.25)
    ['4\\n']
    """
    check_split(split)
    out = []
    for doc in documents:
        lines = doc.splitlines(keepends=True)
        cut = len(lines) - _num_eval(len(lines), eval_fraction)
        part = lines[:cut] if split == "train" else lines[cut:]
        if part:
            out.append("".join(part))
    return out
