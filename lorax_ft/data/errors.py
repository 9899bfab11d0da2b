"""The errors of bad data: a file, a record or a `data.*` key that cannot be used as given.

They are `lorax_ft.errors.UserError`s (the CLI prints one line and exits 2) and, for callers
that catch the built-in types, also `ValueError` (and `FileNotFoundError` for a missing path).

>>> raise DataError("train.csv:7: unterminated quoted field")  # doctest: +SKIP
"""

from lorax_ft.errors import UserError


class DataError(UserError, ValueError):
    """Data that cannot be used as given; the message names the file (and line) or key."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data path that does not exist; the message names it."""
