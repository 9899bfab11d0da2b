"""Reading raw records from disk: text files, JSONL, CSV and one-folder-per-class trees.

Readers return plain Python records and raise one-line errors that name the file (and line)
at fault, so a bad data file is found before any batch is built.

>>> read_jsonl("train.jsonl")  # doctest: +SKIP
[{'prompt': 'Hi', 'completion': 'Hello!'}]
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any


def require_path(path: str | os.PathLike, what: str = "data file") -> Path:
    """Returns `path` as a `Path`, raising `FileNotFoundError` naming it if it does not exist.

    >>> require_path("/nonexistent.txt")  # doctest: +SKIP
    FileNotFoundError: data file not found: /nonexistent.txt
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{what} not found: {p}")
    return p


def read_text(path: str | os.PathLike) -> str:
    """Reads a text file as UTF-8, falling back to Latin-1 for the odd legacy byte.

    Latin-1 decodes every byte, so old corpora with a stray `£` still load instead of failing.

    >>> read_text("corpus.txt")[:5]  # doctest: +SKIP
    'Once '
    """
    data = require_path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def read_text_documents(path: str | os.PathLike, suffix: str = ".txt") -> list[str]:
    """One document per file: `path` itself, or every `*{suffix}` file under a directory.

    Files are read in sorted path order so the token stream, and hence every packed sequence,
    is the same on every machine.

    >>> read_text_documents("shakespeare/")  # doctest: +SKIP
    ['THE TRAGEDY OF ...', ...]
    """
    p = require_path(path)
    if p.is_file():
        return [read_text(p)]
    files = sorted(f for f in p.rglob(f"*{suffix}") if f.is_file())
    if not files:
        raise ValueError(
            f"no {suffix} files under {p}; point the data path at a file or folder of them"
        )
    return [read_text(f) for f in files]


def read_jsonl(path: str | os.PathLike) -> list[tuple[str, dict[str, Any]]]:
    """Parses a JSONL file into `(where, record)` pairs, `where` being `"file:line"`.

    Blank lines are skipped; each other line must be one JSON object.

    >>> read_jsonl("chat.jsonl")[0]  # doctest: +SKIP
    ('chat.jsonl:1', {'prompt': 'Hi', 'completion': 'Hello!'})
    """
    p = require_path(path)
    out = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            out.append((where, record))
    return out


def read_csv(
    path: str | os.PathLike, columns: tuple[str, ...], encoding: str = "utf-8"
) -> list[tuple[str, dict[str, str]]]:
    """Parses a CSV file with a header row into `(where, row)` pairs holding `columns`.

    >>> read_csv("reviews.csv", ("text", "label"))[0]  # doctest: +SKIP
    ('reviews.csv:2', {'text': 'Great film', 'label': 'pos'})
    """
    p = require_path(path)
    with p.open(encoding=encoding, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(
                f"{p}: CSV header {header} lacks column(s) {missing}; expected columns {list(columns)}"
            )
        # reader.line_num is the physical line, which differs from the row count for quoted
        # multi-line fields; it is what an editor shows.
        return [(f"{p}:{reader.line_num}", {c: row[c] for c in columns}) for row in reader]


def read_class_folders(path: str | os.PathLike) -> list[dict[str, str]]:
    """Reads `path/<class>/<file>` into `{"text", "label"}` records, classes and files sorted.

    >>> read_class_folders("bbc/")[0]["label"]  # doctest: +SKIP
    'business'
    """
    root = require_path(path, "class folder")
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith((".", "_")))
    if not classes:
        raise ValueError(
            f"{root}: no class subfolders; expected {root}/<label>/<file> for each label"
        )
    records = []
    for d in classes:
        for f in sorted(d.iterdir()):
            if f.is_file() and not f.name.startswith("."):
                records.append({"text": read_text(f), "label": d.name})
    return records
