"""Sequence-classification examples: labelled text, tokenized, truncated and padded.

Labels are given in one of three ways, and one dataset uses one of them:

- names (strings), mapped to ids in sorted order (numerically for names that are all
  integers, such as CSV's `"0"`, `"1"`, ... `"10"`), or
- names listed in id order by `data.labels` (strings and integers are looked up as strings), or
- integers, which are the ids themselves: they must be exactly `0..K-1` in the training data,
  so a gap (`{0, 5}`) is an error rather than a silently wasted or out-of-range class.

An integer among string labels (or the reverse) is an error naming the record, and an eval
label that training never saw is an error naming it. The tokenizer's post-processor is
applied, so a BERT tokenizer adds `[CLS] ... [SEP]` and truncation keeps them.

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

from lorax_ft.data.errors import DataError

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
        raise DataError(
            f"{where}: expected a string {text_field!r} field, got {_shown(text)}; "
            f"the record has keys {sorted(record)}"
        )
    if not text.strip():
        raise DataError(f"{where}: the {text_field!r} field is empty; remove the record")
    if isinstance(label, bool) or not isinstance(label, (str, int)) or label == "":
        raise DataError(
            f"{where}: expected a non-empty string or integer {label_field!r}, got {label!r}"
        )
    return {"text": text, "label": label}


def _shown(value: Any) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {str(value)[:40]!r}"


def check_label_types(records: Sequence[tuple[str, Record]], source: str) -> None:
    """Refuses a mix of integer and string labels, naming the first record of the rarer type.

    A stray `"label": 3` among `"sport"`, `"tech"` would otherwise become a class of its own.

    >>> check_label_types([("a:1", {"label": "x"}), ("a:2", {"label": 3})], "a")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    lorax_ft.data.errors.DataError: a:2: label 3 is an integer, but 1 of 2 labels in a are strings...
    """
    ints = [(w, r["label"]) for w, r in records if isinstance(r["label"], int)]
    if not ints or len(ints) == len(records):
        return
    strs = [(w, r["label"]) for w, r in records if not isinstance(r["label"], int)]
    if len(ints) <= len(strs):
        (where, label), kind, others, other = ints[0], "an integer", len(strs), "strings"
    else:
        (where, label), kind, others, other = strs[0], "a string", len(ints), "integers"
    raise DataError(
        f"{where}: label {label!r} is {kind}, but {others} of {len(records)} labels in {source} "
        f"are {other}; give every label one type (quote integers to make them names)"
    )


def label_vocabulary(
    records: Sequence[Record], names: Sequence[str] = (), source: str = "the training data"
) -> dict:
    """Maps label value to id: `names` in order if given, else the records' labels (see above).

    Args:
      records: The training records (`{"label": ...}` dicts).
      names: `data.labels`: label names in id order, or empty.
      source: What `records` are, for error messages (a file, a dataset name).

    Returns:
      `{label: id}` with ids `0..K-1`, K >= 2.

    >>> label_vocabulary([{"label": 1}, {"label": 0}])
    {0: 0, 1: 1}
    >>> label_vocabulary([{"label": "10"}, {"label": "9"}])
    {'9': 0, '10': 1}
    """
    if names:
        names = list(names)
        if not all(isinstance(n, str) and n for n in names):
            raise DataError(f"data.labels={tuple(names)!r} must be non-empty strings")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise DataError(f"data.labels={tuple(names)!r} repeats {repeated}")
        if len(names) < 2:
            raise DataError(f"data.labels={tuple(names)!r} names fewer than 2 classes")
        return {name: i for i, name in enumerate(names)}
    values = {r["label"] for r in records}
    if len(values) < 2:
        raise DataError(
            f"{source}: {len(values)} distinct label(s) {sorted(map(str, values))}; "
            "classification needs at least 2"
        )
    if all(isinstance(v, int) for v in values):
        expected = set(range(len(values)))
        if values != expected:
            missing = sorted(set(range(max(values) + 1)) - values)
            raise DataError(
                f"{source}: integer labels {_listed(sorted(values))} are not the class ids "
                f"0..{len(values) - 1}"
                + (f" (missing {_listed(missing)})" if missing else "")
                + "; integer labels must be exactly 0..K-1 for K classes: renumber them, or "
                "list their names in id order in data.labels, e.g. "
                f"data.labels={tuple(str(v) for v in sorted(values)[:10])}"
            )
        return {v: v for v in sorted(values)}
    if not all(isinstance(v, str) for v in values):
        raise DataError(
            f"{source}: mixes integer and string labels: {_listed(sorted(values, key=str))}"
        )
    by_stripped: dict[str, str] = {}
    for v in sorted(values):
        if v.strip() in by_stripped:
            raise DataError(
                f"{source}: labels {by_stripped[v.strip()]!r} and {v!r} differ only in "
                "surrounding spaces; clean the labels (in a CSV, no space after the comma)"
            )
        by_stripped[v.strip()] = v
    return {v: i for i, v in enumerate(sorted(values, key=_name_order))}


def _name_order(name: str) -> tuple:
    # Names that are all integers sort numerically ("2" before "10"), the rest as strings.
    try:
        return (0, int(name), name)
    except ValueError:
        return (1, 0, name)


def _listed(values: Sequence[Any], limit: int = 10) -> str:
    shown = ", ".join(repr(v) for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"


def label_id(label: str | int, vocab: dict, where: str = "record") -> int:
    """Looks `label` up in `vocab`, raising a one-line error listing the valid labels.

    >>> label_id("pos", {"neg": 0, "pos": 1})
    1
    """
    key = label if isinstance(label, int) and label in vocab else str(label)
    if key not in vocab:
        valid = ", ".join(str(k) for k in vocab)
        raise DataError(
            f"{where}: unknown label {label!r}, not among the training labels; valid labels: {valid}"
        )
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
