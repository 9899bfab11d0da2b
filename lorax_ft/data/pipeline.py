"""The trainer's entry point: a `data` config section in, a checkpointable batch iterator out.

Config fields read by `make_pipeline` (defaults in `default_data_config()`):

- `kind`: `"text"` (causal LM on packed plain text), `"chat"` (instruction/chat JSONL, loss on
  assistant turns) or `"classification"` (labelled text). May be `""` with `name`: the named
  dataset's kind is used.
- `name`: a named dataset (`lorax_ft.data.NAMED_DATASETS`), or `""` to read files instead.
- `path`: one data source, split into train/eval by `eval_fraction` and `split_seed`.
- `train_path`, `eval_path`: separate sources per split (instead of `path`, not with it).
  Text: a `.txt` file or a folder of them (one document per file). Chat: JSONL with
  `prompt`/`completion` or `messages`. Classification: JSONL or CSV with `text_field` and
  `label_field`, or a folder with one subfolder per label (see `classification` for labels).
- `max_length`: tokens per example, >= 1 and at most the model's positions (checked where
  the model is known, `lorax_ft.run.tasks.build`).
- `eval_fraction`: fraction in (0, 1) held out for eval when splitting `path` or a named
  dataset.
- `split_seed`: seed of that split, kept apart from the training seed.
- `chat_format`: built-in chat template, `"chatml"` or `"plain"`, unless `format_chat` is passed.
- `text_field`, `label_field`: classification column/key names.
- `labels`: label names in id order; empty means the training labels, sorted (integer labels
  must then be exactly `0..K-1`; see `classification`).
- `read_threads`, `prefetch_batches`: threads computing batches and batches computed ahead.

Bad data or a bad key raises `DataError` (a `lorax_ft.errors.UserError`), one line naming the
key, or the file and line (or record) at fault.

Batches are dicts of numpy arrays with a leading dimension `batch_size // process_count`;
every kind has `weights` (1 for real rows, 0 for eval padding). Text and chat add
`input_ids`, `labels` (next tokens, already shifted), `loss_mask`, `attention_mask`;
classification adds `input_ids`, `attention_mask`, `token_type_ids`, `label`.

>>> it = make_pipeline(default_data_config(), tok, split="train", batch_size=8, seed=0)  # doctest: +SKIP
>>> batch = next(it); state = it.get_state()  # doctest: +SKIP
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import grain
import ml_collections
from tokenizers import Tokenizer

from lorax_ft.data import chat, classification, named, readers, splits, text
from lorax_ft.data.batching import BatchIterator, batch_dataset
from lorax_ft.data.errors import DataError

KINDS = ("text", "chat", "classification")


def default_data_config() -> ml_collections.ConfigDict:
    """The `data` config section with every field `make_pipeline` reads.

    >>> default_data_config().max_length
    512
    """
    c = ml_collections.ConfigDict()
    c.kind = ""  # required unless `name` is set
    c.name = ""
    c.path = ""
    c.train_path = ""
    c.eval_path = ""
    c.max_length = 512
    c.eval_fraction = 0.1  # 10% held out when splitting one source
    c.split_seed = 0  # fixed so changing the training seed never reshuffles the eval set
    c.chat_format = "chatml"
    c.text_field = "text"
    c.label_field = "label"
    c.labels = ()
    c.read_threads = 4
    c.prefetch_batches = 16
    return c


def check_data_config(cfg: ml_collections.ConfigDict) -> None:
    """Raises `DataError` naming the first `data.*` key that cannot work; returns None if all can.

    What needs the model (`max_length` against its positions) is checked in `tasks.build`.

    >>> check_data_config(ml_collections.ConfigDict({"kind": "text", "max_length": 0}))
    Traceback (most recent call last):
    lorax_ft.data.errors.DataError: data.max_length=0 must be >= 1 (tokens per example)
    """
    _kind(cfg)
    max_length = cfg.get("max_length", 512)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise DataError(f"data.max_length={max_length!r} must be >= 1 (tokens per example)")
    fraction = cfg.get("eval_fraction", 0.1)
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction < 1:
        raise DataError(
            f"data.eval_fraction={fraction!r} must be in (0, 1): the share of data.path (or the "
            "named dataset) held out for eval"
        )
    for key in ("read_threads", "prefetch_batches"):
        value = cfg.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise DataError(f"data.{key}={value!r} must be an integer >= 0")
    for key in ("text_field", "label_field"):
        value = cfg.get(key, key[: -len("_field")])
        if not isinstance(value, str) or not value:
            raise DataError(f"data.{key}={value!r} must be a non-empty column/key name")
    if cfg.get("path") and (cfg.get("train_path") or cfg.get("eval_path")):
        raise DataError(
            "set data.path (split by data.eval_fraction) or data.train_path and data.eval_path, "
            f"not both: data.path={cfg.path!r}"
        )


def _kind(cfg: ml_collections.ConfigDict) -> str:
    kind = cfg.get("kind", "")
    if cfg.get("name"):
        named_kind = named.named_dataset(cfg.name).kind
        if kind and kind != named_kind:
            raise DataError(
                f"dataset {cfg.name!r} is kind {named_kind!r}, config says {kind!r} (data.kind)"
            )
        if cfg.get("path") or cfg.get("train_path") or cfg.get("eval_path"):
            raise DataError(f"set either data.name ({cfg.name!r}) or a data path, not both")
        return named_kind
    if kind not in KINDS:
        raise DataError(
            f"unknown data.kind {kind!r}; valid kinds: {', '.join(KINDS)} (or set data.name)"
        )
    return kind


def _source(cfg: ml_collections.ConfigDict, split: str) -> tuple[str, bool]:
    """The path to read for `split`, and whether it must still be split by `eval_fraction`."""
    own = cfg.get("train_path") if split == "train" else cfg.get("eval_path")
    if own:
        return own, False
    if cfg.get("path"):
        return cfg.path, True
    raise DataError(f"no {split} data: set data.name, data.path or data.{split}_path")


def _source_name(cfg: ml_collections.ConfigDict, split: str) -> str:
    return cfg.get("name") or str(Path(_source(cfg, split)[0]))


def _read(cfg: ml_collections.ConfigDict, kind: str, path: str) -> list[Any]:
    """All records of one source: text documents, message lists or checked classification dicts."""
    if kind == "text":
        if Path(path).suffix.lower() in (".jsonl", ".json", ".csv"):
            raise DataError(
                f"{path}: data.kind='text' reads plain .txt files; for records set data.kind to "
                "'chat' or 'classification'"
            )
        return readers.read_text_documents(path)
    if kind == "chat":
        return [chat.to_messages(r, where) for where, r in readers.read_jsonl(path)]
    p = readers.require_path(path)
    fields = (cfg.get("text_field", "text"), cfg.get("label_field", "label"))
    if p.is_dir():
        rows = [(f"{p}/{r['label']}", r) for r in readers.read_class_folders(p)]
        fields = ("text", "label")
    elif p.suffix.lower() == ".csv":
        rows = readers.read_csv(p, fields)
    else:
        rows = readers.read_jsonl(p)
    records = [(where, classification.check_record(r, where, *fields)) for where, r in rows]
    classification.check_label_types(records, str(p))
    return records


def load_records(cfg: ml_collections.ConfigDict, split: str) -> list[Any]:
    """The records of `split` as the pipeline sees them (before tokenization).

    Text: documents (str); chat: message lists; classification: `(where, {"text", "label"})`.

    >>> load_records(ml_collections.ConfigDict({"name": "bbc-news"}), "eval")  # doctest: +SKIP
    """
    splits.check_split(split)
    check_data_config(cfg)
    kind = _kind(cfg)
    records = _split_records(cfg, kind, split)
    if not records or (kind == "text" and not any(doc.strip() for doc in records)):
        raise DataError(
            f"{kind} data {_source_name(cfg, split)!r} has no {split} records; check the "
            "path (an empty file?) and data.eval_fraction"
        )
    return records


def _split_records(cfg: ml_collections.ConfigDict, kind: str, split: str) -> list[Any]:
    fraction = cfg.get("eval_fraction", 0.1)
    seed = cfg.get("split_seed", 0)
    if cfg.get("name"):
        records = named.load_named(cfg.name, split, eval_fraction=fraction, seed=seed)
        if kind == "text":
            return [r["text"] for r in records]
        if kind == "chat":
            return [chat.to_messages(r, f"{cfg.name}[{i}]") for i, r in enumerate(records)]
        return [
            (f"{cfg.name}[{i}]", classification.check_record(r, f"{cfg.name}[{i}]"))
            for i, r in enumerate(records)
        ]
    path, must_split = _source(cfg, split)
    records = _read(cfg, kind, path)
    if not must_split:
        return records
    if kind == "text":
        return splits.split_text_tail(records, split, eval_fraction=fraction)
    group = (lambda r: r[1]["label"]) if kind == "classification" else None
    return splits.split_records(records, split, eval_fraction=fraction, seed=seed, group=group)


def label_ids(cfg: ml_collections.ConfigDict, train: list[Any] | None = None) -> dict:
    """`{label: id}` of a classification data config: `data.labels`, or its training labels.

    Train and eval use this one mapping; its length is the classifier's number of classes.

    Args:
      cfg: The `data` config section.
      train: The training records (`load_records(cfg, "train")`) if already read.

    >>> label_ids(ml_collections.ConfigDict({"name": "bbc-news"}))  # doctest: +SKIP
    {'business': 0, 'entertainment': 1, 'politics': 2, 'sports': 3, 'tech': 4}
    """
    names = tuple(cfg.get("labels", ()) or ())
    if not names and train is None:
        train = load_records(cfg, "train")
    train = [r for _, r in train or ()]
    return classification.label_vocabulary(train, names, source=_source_name(cfg, "train"))


def _pad_id(pad_id: int | None, tokenizer: Tokenizer, fallback: int | None, kind: str) -> int:
    if pad_id is not None:
        return pad_id
    if tokenizer.padding is not None:
        return tokenizer.padding["pad_id"]
    if fallback is not None:
        return fallback
    raise DataError(f"{kind} data needs pad_id (the tokenizer has no padding set); pass pad_id=")


def make_pipeline(
    data_config: ml_collections.ConfigDict,
    tokenizer: Tokenizer,
    *,
    split: str,
    batch_size: int,
    seed: int = 0,
    num_epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    pad_id: int | None = None,
    eos_id: int | None = None,
    bos_id: int | None = None,
    format_chat: chat.FormatChat | None = None,
) -> BatchIterator:
    """Builds this process's batch iterator for one split.

    Args:
      data_config: The `data` config section (fields in the module docstring).
      tokenizer: A Hugging Face `tokenizers.Tokenizer`.
      split: `"train"` (shuffled, repeated, remainder dropped) or `"eval"` (one ordered pass,
        last batch padded with `weights` 0).
      batch_size: Global batch size, a multiple of `process_count`.
      seed: Shuffle seed for training.
      num_epochs: Training epochs; None repeats forever.
      process_index: This process's index.
      process_count: Number of processes; each reads a disjoint slice of every global batch.
      pad_id: Padding token (chat, classification); defaults to the tokenizer's padding token,
        then (chat only) to `eos_id`.
      eos_id: End-of-sequence token; needed for text (document separator), optional for chat.
      bos_id: Optional beginning-of-sequence token for text and chat.
      format_chat: Chat template `messages -> str`; overrides `data_config.chat_format`.

    Returns:
      A `BatchIterator` (`next`, `get_state`, `set_state`, `num_batches`, `pipeline`).
    """
    kind = _kind(data_config)
    records = load_records(data_config, split)
    source = _source_name(data_config, split)
    max_length = int(data_config.get("max_length", 512))
    info: dict[str, Any] = {
        "kind": kind,
        "source": source,
        "split": split,
        "max_length": max_length,
    }
    if kind == "text":
        try:
            rows = text.pack_documents(
                tokenizer, records, max_length=max_length, eos_id=eos_id, bos_id=bos_id
            )
        except DataError as e:
            raise DataError(f"{source} ({split}): {e}") from None
        examples = grain.MapDataset.source(list(rows)).map(text.text_example)
    elif kind == "chat":
        if format_chat is None:
            name = data_config.get("chat_format", "chatml")
            if name not in chat.CHAT_FORMATS:
                raise DataError(
                    f"unknown data.chat_format {name!r}; valid: {', '.join(chat.CHAT_FORMATS)}"
                )
            format_chat = chat.CHAT_FORMATS[name]
        encode = functools.partial(
            chat.encode_chat,
            tokenizer=tokenizer,
            max_length=max_length,
            pad_id=_pad_id(pad_id, tokenizer, eos_id, kind),
            format_chat=format_chat,
            eos_id=eos_id,
            bos_id=bos_id,
        )
        examples = grain.MapDataset.source(records).map(encode)
    else:
        post = tokenizer.post_processor
        specials = post.num_special_tokens_to_add(False) if post is not None else 0
        if max_length <= specials:
            raise DataError(
                f"data.max_length={max_length} leaves no room for text: the tokenizer adds "
                f"{specials} special tokens; use at least {specials + 1}"
            )
        # Label ids come from the training labels so train and eval agree on them.
        vocab = label_ids(data_config, records if split == "train" else None)
        labelled = [(r["text"], classification.label_id(r["label"], vocab, w)) for w, r in records]
        encode = functools.partial(
            _encode_labelled,
            tokenizer=tokenizer,
            max_length=max_length,
            pad_id=_pad_id(pad_id, tokenizer, None, kind),
        )
        examples = grain.MapDataset.source(labelled).map(encode)
        info["labels"] = list(vocab)
    info.update(num_examples=len(examples), global_batch_size=batch_size)
    if split == "train":
        # num_epochs is left out: epoch e's order does not depend on it, so a run may be extended.
        info["seed"] = seed
    batches = batch_dataset(
        examples,
        train=split == "train",
        global_batch_size=batch_size,
        seed=seed,
        num_epochs=num_epochs,
        process_index=process_index,
        process_count=process_count,
    )
    return BatchIterator(
        batches,
        forever=split == "train" and num_epochs is None,
        pipeline=info,
        num_threads=int(data_config.get("read_threads", 4)),
        prefetch_buffer_size=int(data_config.get("prefetch_batches", 16)),
    )


def _encode_labelled(item: tuple[str, int], **kwargs: Any) -> dict:
    return classification.encode_classification(item[0], item[1], **kwargs)
