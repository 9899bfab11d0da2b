"""Sequence-classification examples: labelled text, tokenized, truncated and padded.

Labels are names (strings, mapped to ids in sorted order, or by an explicit `labels` list) or
non-negative integers (used as ids). The tokenizer's post-processor is applied, so a BERT
tokenizer adds `[CLS] ... [SEP]` and truncation keeps them.

Fields: `input_ids`, `attention_mask`, `token_type_ids` (length `max_length`), `label` (scalar
int32), `weights` = 1.

>>> vocab = label_vocabulary([{"text": "x", "label": "pos"}, {"text": "y", "label": "neg"}])
>>> vocab
{'neg': 0, 'pos': 1}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from tokenizers import Tokenizer

Record = dict[str, Any]


def check_record(
    record: Record, where: str = "record", text_field: str = "text", label_field: str = "label"
) -> Record:
    """Checks one labelled record and returns it as `{"text": str, "label": str | int}`.

    Errors name `where` (e.g. `file:line`) and the fields expected.

    >>> check_record({"review": "ok", "label": "pos"}, text_field="review")
    {'text': 'ok', 'label': 'pos'}
    """
    text, label = record.get(text_field), record.get(label_field)
    if not isinstance(text, str):
        raise ValueError(
            f"{where}: expected a string {text_field!r} field; got keys {sorted(record)}"
        )
    if isinstance(label, bool) or not isinstance(label, (str, int)) or label == "":
        raise ValueError(
            f"{where}: expected a non-empty string or integer {label_field!r}, got {label!r}"
        )
    return {"text": text, "label": label}


def label_vocabulary(records: Sequence[Record], names: Sequence[str] = ()) -> dict:
    """Maps label value to id: `names` in order if given, else the records' labels sorted.

    Integer labels map to themselves (they are ids already).

    >>> label_vocabulary([{"label": 2}, {"label": 0}])
    {0: 0, 2: 2}
    """
    if names:
        return {name: i for i, name in enumerate(names)}
    values = {r["label"] for r in records}
    if all(isinstance(v, int) for v in values):
        if any(v < 0 for v in values):
            raise ValueError(f"integer labels must be >= 0, got {sorted(values)}")
        return {v: v for v in sorted(values)}
    return {v: i for i, v in enumerate(sorted(str(v) for v in values))}


def label_id(label: str | int, vocab: dict, where: str = "record") -> int:
    """Looks `label` up in `vocab`, raising a one-line error listing the valid labels.

    >>> label_id("pos", {"neg": 0, "pos": 1})
    1
    """
    key = label if isinstance(label, int) and label in vocab else str(label)
    if key not in vocab:
        valid = ", ".join(str(k) for k in vocab)
        raise ValueError(f"{where}: unknown label {label!r}; valid labels: {valid}")
    return vocab[key]


def encode_classification(
    text: str, label: int, tokenizer: Tokenizer, *, max_length: int, pad_id: int
) -> dict[str, np.ndarray]:
    """Tokenizes one text into a fixed-length classification example.

    Args:
      text: The input text.
      label: Its label id.
      tokenizer: A `tokenizers.Tokenizer`; its post-processor (e.g. `[CLS]`/`[SEP]`) is applied.
      max_length: Example length, special tokens included; longer texts are cut at the end.
      pad_id: Token for padding positions.

    Returns:
      The example dict (see the module docstring).
    """
    enc = tokenizer.encode(text, add_special_tokens=False)
    post = tokenizer.post_processor
    specials = post.num_special_tokens_to_add(False) if post is not None else 0
    # Truncating before post-processing keeps the special tokens a model such as BERT expects.
    enc.truncate(max(max_length - specials, 0))
    enc = tokenizer.post_process(enc)
    ids, types = enc.ids[:max_length], enc.type_ids[:max_length]
    n = len(ids)
    example = {
        "input_ids": np.full(max_length, pad_id, np.int32),
        "attention_mask": np.zeros(max_length, np.int32),
        "token_type_ids": np.zeros(max_length, np.int32),
        "label": np.int32(label),
        "weights": np.float32(1.0),
    }
    example["input_ids"][:n] = ids
    example["attention_mask"][:n] = 1
    example["token_type_ids"][:n] = types
    return example
