"""Causal-LM examples from plain text: tokenize, join documents with EOS, pack fixed-length rows.

Every example is `max_length + 1` consecutive tokens of the stream, cut with stride
`max_length`, so each token is a target exactly once and no padding is ever needed:

- `input_ids[t]`  = stream token `t`,
- `labels[t]`     = stream token `t + 1` (already shifted: the loss compares logits with it),
- `loss_mask`, `attention_mask` all ones, `weights` = 1.

>>> rows = pack_documents(tok, ["a b c", "d e"], max_length=4, eos_id=0)  # doctest: +SKIP
>>> text_example(rows[0])["input_ids"]                                     # doctest: +SKIP
array([5, 6, 7, 0], dtype=int32)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tokenizers import Tokenizer

from lorax_ft.data.errors import DataError


def pack_documents(
    tokenizer: Tokenizer,
    documents: Sequence[str],
    *,
    max_length: int,
    eos_id: int,
    bos_id: int | None = None,
) -> np.ndarray:
    """Tokenizes and packs documents into an `int32` array of shape `[rows, max_length + 1]`.

    Each document becomes `[bos] + tokens + [eos]`; the trailing tokens that do not fill a whole
    row are dropped.

    Args:
      tokenizer: A `tokenizers.Tokenizer`; its own special tokens are not added, the ids below
        are used instead so the stream is the same whatever the post-processor does.
      documents: The texts, in order.
      max_length: Sequence length of an example.
      eos_id: Token appended after every document.
      bos_id: Optional token prepended to every document.

    Returns:
      The packed rows; row `i` covers stream tokens `[i * max_length, (i + 1) * max_length]`.

    >>> pack_documents(tok, ["a b", "c"], max_length=2, eos_id=0).shape  # doctest: +SKIP
    (2, 3)
    """
    if eos_id is None:
        raise DataError("text packing needs eos_id (the token put between documents)")
    encodings = tokenizer.encode_batch(list(documents), add_special_tokens=False)
    head = [bos_id] if bos_id is not None else []
    stream = np.fromiter(
        (t for enc in encodings for t in (*head, *enc.ids, eos_id)), dtype=np.int32
    )
    rows = (len(stream) - 1) // max_length
    if rows < 1:
        raise DataError(
            f"text data has {len(stream)} tokens, fewer than one sequence of max_length "
            f"{max_length} + 1; add text or lower max_length"
        )
    # Overlapping windows of max_length + 1 with stride max_length: row i's last token is row
    # i + 1's first, which is what makes every stream token a label exactly once.
    starts = np.arange(rows)[:, None] * max_length
    return stream[starts + np.arange(max_length + 1)[None, :]]


def text_example(row: np.ndarray) -> dict[str, np.ndarray]:
    """Turns a packed row of `max_length + 1` tokens into one training example.

    >>> text_example(np.array([5, 6, 7]))["labels"]
    array([6, 7], dtype=int32)
    """
    row = np.asarray(row, dtype=np.int32)
    length = len(row) - 1
    return {
        "input_ids": row[:-1],
        "labels": row[1:],
        "loss_mask": np.ones(length, np.float32),
        "attention_mask": np.ones(length, np.int32),
        "weights": np.float32(1.0),
    }
