"""The one exception type for bad input: the CLI reports it as one line and exits 2.

Anything a user can get wrong (a config key, a file, a damaged checkpoint, a busy workdir)
raises a subclass of `UserError` whose message names the key, path or file and what would be
valid. Other exceptions are bugs and keep their traceback.

>>> raise UserError("train.steps=0 must be >= 1")  # doctest: +SKIP
"""


class UserError(Exception):
    """Bad input, reported by `lorax-ft` as `lorax-ft COMMAND: message` with exit code 2."""
