"""Loading an experiment config file: `path/to/config.py[:arg]` -> `get_config(arg)`.

The file is run as a module with its own directory first on `sys.path`, so a config can import
helpers that sit next to it (`from my_helpers import ...`) from wherever `lorax-ft` is started.
Everything a user can get wrong here — a missing file, a syntax error, no `get_config`, a
`get_config` that raises or returns something other than a `ConfigDict` — is a `ConfigFileError`
whose one-line message names the file.

>>> config = load_config_file("configs/bbc_minilm.py:lora,tiny")  # doctest: +SKIP
>>> config.train.steps  # doctest: +SKIP
4
"""

from __future__ import annotations

import importlib.util
import os
import sys
import traceback

import ml_collections

from lorax_ft.errors import UserError


class ConfigFileError(UserError):
    """A config file that cannot give a config; the message names the file."""


def split_config_arg(value: str) -> tuple[str, str | None]:
    """`"file.py:arg"` -> `("file.py", "arg")`; `"file.py"` -> `("file.py", None)`."""
    path, sep, arg = value.partition(":")
    return path, (arg if sep else None)


def load_config_file(value: str) -> ml_collections.ConfigDict:
    """The `ConfigDict` that `get_config(arg)` of the file `value` (`path[:arg]`) returns."""
    path, arg = split_config_arg(value)
    shown = f"--config={value}"
    if not path:
        raise ConfigFileError(f"{shown}: give a config file, e.g. --config=configs/bbc_minilm.py")
    if not os.path.isfile(path):
        what = "is a directory" if os.path.isdir(path) else "does not exist"
        raise ConfigFileError(f"{shown}: {path} {what}; give a Python file with get_config(arg)")
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    sys.path.insert(0, directory)  # helpers next to the config import as top-level modules
    try:
        module = _run_module(path, shown)
        get_config = getattr(module, "get_config", None)
        if not callable(get_config):
            raise ConfigFileError(f"{shown}: {path} defines no get_config(arg) function")
        try:
            config = get_config() if arg is None else get_config(arg)
        except UserError as e:
            raise ConfigFileError(f"{shown}: {e}") from None
        except Exception as e:  # the user's code: say where it failed, in one line
            raise ConfigFileError(
                f"{shown}: get_config({arg!r}) raised {_describe(e, path)}"
            ) from None
    finally:
        sys.path.remove(directory)
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigFileError(
            f"{shown}: get_config({arg!r}) returned {type(config).__name__}; it must return an "
            "ml_collections.ConfigDict (start from lorax_ft.run.config.default_config())"
        )
    return config


def _run_module(path: str, shown: str):
    name = "_lorax_ft_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigFileError(f"{shown}: {path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as an import would: dataclasses and pickling look it up
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigFileError(f"{shown}: syntax error at {path}:{e.lineno}: {e.msg}") from None
    except Exception as e:
        raise ConfigFileError(f"{shown}: importing {path} raised {_describe(e, path)}") from None
    return module


def _describe(error: Exception, path: str) -> str:
    """`NameError: name 'x' is not defined (at config.py:12)`: the innermost frame of `path`."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename == path]
    where = f" (at {path}:{frames[-1].lineno})" if frames else ""
    message = " ".join(str(error).split())
    return f"{type(error).__name__}: {message}{where}"
