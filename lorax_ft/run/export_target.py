"""Where `lorax-ft export` may write, and writing there without losing anything.

(`check_creatable` also serves `train`'s workdir: a directory that exists or can be created.)

An export replaces its target directory, so the target is checked before any work is done: it
must not be a file, the workdir, inside the workdir or above it, nor a directory holding
anything an earlier export of ours did not write. Each export records what it wrote in a marker
file, `.lorax_ft_export.json`; an earlier export is replaced only when the user asks
(`--overwrite`), and only once the new one is complete.

>>> check_target("/tmp/hf", workdir="/tmp/run", overwrite=False)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
import uuid

from lorax_ft.errors import UserError

MARKER = ".lorax_ft_export.json"


class ExportTargetError(UserError):
    """The export directory would overwrite or delete something that is not an earlier export."""


def check_target(target: str, workdir: str, overwrite: bool) -> None:
    """Raises `ExportTargetError` unless writing `target` loses nothing but an earlier export.

    Args:
      target: the directory `lorax-ft export` is to write (`--export_dir`).
      workdir: the run's workdir (checkpoints, metrics), which no export may touch.
      overwrite: replace an earlier export at `target` (`--overwrite`).
    """
    where = f"--export_dir={target}"
    if os.path.islink(target):
        raise ExportTargetError(f"{where} is a symbolic link; give the directory it points to")
    real, run = os.path.realpath(target), os.path.realpath(workdir)
    if real == run:
        raise ExportTargetError(f"{where} is the workdir; export to a directory outside it")
    if real.startswith(os.path.join(run, "")):
        raise ExportTargetError(f"{where} is inside the workdir {workdir}; export outside it")
    if run.startswith(os.path.join(real, "")):
        raise ExportTargetError(f"{where} contains the workdir {workdir}; export elsewhere")
    if os.path.exists(target) and not os.path.isdir(target):
        raise ExportTargetError(f"{where} is a file; give a new or empty directory")
    check_creatable(os.path.dirname(real), where, ExportTargetError)
    if not os.path.isdir(target) or not os.listdir(target):
        return
    written = _recorded_entries(target)
    if written is None:
        raise ExportTargetError(
            f"{where} is a non-empty directory and not an earlier export (it has no {MARKER}); "
            "give a new or empty directory"
        )
    foreign = sorted(set(_entries(target)) - written - {MARKER})
    if foreign:
        raise ExportTargetError(
            f"{where} holds {foreign[0]}, which the earlier export did not write; move it or "
            "give another directory"
        )
    if not overwrite:
        raise ExportTargetError(f"{where} holds an earlier export; pass --overwrite to replace it")


def check_creatable(path: str, where: str, error: type[UserError] = UserError) -> None:
    """Raises `error` unless `path` exists as a writable directory or could be created: the
    nearest existing folder on its way is where it would be created, and must be writable.

    Args:
      path: the directory a command will write into (or create).
      where: the flag naming it, for the message (e.g. `--workdir=runs/x`).
      error: the exception type to raise.
    """
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise error(f"{where}: {existing} is not a writable directory")


def replace_directory(target: str, write, record: dict | None = None) -> None:
    """Writes a directory atomically: `write(tmp)` fills a temporary sibling, then it is renamed.

    An existing `target` is kept until the new one is complete, so a failure leaves it intact.
    The marker lists the files written, with `record` (e.g. the step). Everything gets the
    modes the umask gives new files and folders (safetensors writes 0600 files).
    """
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".export-{uuid.uuid4().hex}")
    os.mkdir(tmp)
    try:
        write(tmp)
        written = sorted(_entries(tmp))
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump({**(record or {}), "written": written}, f, indent=2)
        _umask_modes(tmp)
        if os.path.exists(target):
            old = os.path.join(parent, f".old-{uuid.uuid4().hex}")
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except OSError:
                os.replace(old, target)  # put the earlier export back
                raise
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask_modes(directory: str) -> None:
    """Folders 0777 and files 0666, less the umask: what `mkdir` and `open` would have made."""
    umask = os.umask(0)  # reading the umask means setting it; put straight back
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for root, folders, files in os.walk(directory):
        for name in folders:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def _entries(directory: str) -> list[str]:
    """Every file and folder under `directory`, as paths relative to it."""
    return [
        os.path.relpath(os.path.join(root, name), directory)
        for root, folders, files in os.walk(directory)
        for name in folders + files
    ]


def _recorded_entries(directory: str) -> set[str] | None:
    """What the export in `directory` wrote, or None when it is not an export of ours."""
    try:
        with open(os.path.join(directory, MARKER)) as f:
            return set(json.load(f)["written"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
