"""Reading raw records from disk: text files, JSONL, CSV and one-folder-per-class trees.

Readers return plain Python records and raise one-line errors that name the file (and line)
at fault, so a bad data file is found before any batch is built.

>>> read_jsonl("train.jsonl")  # doctest: +SKIP
[{'prompt': 'Hi', 'completion': 'Hello!'}]
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from lorax_ft.data.errors import DataError, DataFileNotFoundError


def require_path(path: str | os.PathLike, what: str = "data file") -> Path:
    """Returns `path` as a `Path`, raising `DataFileNotFoundError` naming it if it does not exist.

    >>> require_path("/nonexistent.txt")  # doctest: +SKIP
    DataFileNotFoundError: data file not found: /nonexistent.txt
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DataFileNotFoundError(f"{what} not found: {p}")
    return p


def _decode(p: Path, encoding: str = "utf-8") -> str:
    """The file's text; a byte that is not `encoding` is an error naming the file and line.

    A UTF-8 byte-order mark is dropped, so it does not end up in the first JSON key or CSV column.
    """
    if p.is_dir():
        raise DataError(f"{p} is a folder; expected a data file")
    data = p.read_bytes()
    try:
        return data.decode(
            "utf-8-sig" if encoding.lower().replace("_", "-") == "utf-8" else encoding
        )
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{p}:{line}: byte {data[e.start : e.start + 1]!r} is not valid {encoding}; "
            f"save the file as {encoding}"
        ) from None


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
        raise DataError(
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
    # StringIO splits lines at \n, \r and \r\n only, unlike str.splitlines, which also splits
    # at characters (U+2028, say) that JSON allows unescaped inside a string.
    for lineno, line in enumerate(io.StringIO(_decode(p)), start=1):
        if not line.strip():
            continue
        where = f"{p}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{where}: invalid JSON ({e.msg} at column {e.colno}); each line must be one "
                "JSON object"
            ) from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        out.append((where, record))
    return out


def read_csv(
    path: str | os.PathLike, columns: tuple[str, ...], encoding: str = "utf-8"
) -> list[tuple[str, dict[str, str]]]:
    """Parses a CSV file with a header row into `(where, row)` pairs holding `columns`.

    `where` is `"file:line"`, the line a record starts on. Quoted fields may span lines, but
    the file is parsed strictly: a quote that is never closed (which would swallow every later
    row into one field), text after a closing quote, or a row whose number of fields differs
    from the header's (an unquoted comma in the text, say) is an error naming the line.

    >>> read_csv("reviews.csv", ("text", "label"))[0]  # doctest: +SKIP
    ('reviews.csv:2', {'text': 'Great film', 'label': 'pos'})
    """
    p = require_path(path)
    reader = csv.reader(io.StringIO(_decode(p, encoding), newline=""), strict=True)
    header, out = None, []
    while True:
        start = reader.line_num + 1  # blank lines are read as rows, so this is the row's line
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            if "unexpected end of data" in str(e):
                problem = "a quoted field starting in this record is never closed"
            else:
                problem = f"malformed quoting ({e}) by line {reader.line_num}"
            raise DataError(
                f'{p}:{start}: {problem}; quote a field as "..." and double a quote inside it'
            ) from None
        if not row:
            continue
        if header is None:
            header = row
            missing = [c for c in columns if c not in header]
            if missing:
                raise DataError(
                    f"{p}: CSV header {header} lacks column(s) {missing}; expected columns "
                    f"{list(columns)}"
                )
            repeated = sorted({c for c in columns if header.count(c) > 1})
            if repeated:
                raise DataError(f"{p}: CSV header {header} repeats column(s) {repeated}")
            index = {c: header.index(c) for c in columns}
            continue
        if len(row) != len(header):
            raise DataError(
                f"{p}:{start}: CSV row has {len(row)} field(s), the header has {len(header)}; "
                'quote a field that contains a comma as "..."'
            )
        out.append((f"{p}:{start}", {c: row[i] for c, i in index.items()}))
    if header is None:
        raise DataError(f"{p}: empty CSV file; expected a header row with columns {list(columns)}")
    return out


def read_class_folders(path: str | os.PathLike) -> list[dict[str, str]]:
    """Reads `path/<class>/<file>` into `{"text", "label"}` records, classes and files sorted.

    >>> read_class_folders("bbc/")[0]["label"]  # doctest: +SKIP
    'business'
    """
    root = require_path(path, "class folder")
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith((".", "_")))
    if not classes:
        raise DataError(
            f"{root}: no class subfolders; expected {root}/<label>/<file> for each label"
        )
    records = []
    for d in classes:
        files = [f for f in sorted(d.iterdir()) if f.is_file() and not f.name.startswith(".")]
        if not files:
            # An empty class would silently drop out of the label set.
            raise DataError(f"{d}: class folder has no files; remove it or add its examples")
        records.extend({"text": read_text(f), "label": d.name} for f in files)
    return records
