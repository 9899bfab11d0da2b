"""One `lorax-ft train` per workdir: an exclusive `flock` on `WORKDIR/train.lock`.

Two runs training in one workdir would write over each other's checkpoints and metrics, so the
second one refuses at once, naming the workdir and the pid of the run that holds it. The kernel
releases a flock when its process ends, however it ends (SIGKILL and power loss included): a
killed run never leaves the workdir locked, and the lock file, which stays, needs no cleaning.

All processes of a multi-host run share one workdir, so only process 0 takes the lock, and it
tells the others whether it got it: they all refuse together, none is left waiting on a
collective. `eval`, `generate` and `export` only read the newest committed checkpoint (orbax
commits by a rename) and take no lock: they may run while a train writes.

flock works on local filesystems and on NFS (where Linux maps it to a POSIX lock); on a
filesystem without locks (some FUSE mounts) taking it fails with an error naming the file.

>>> with exclusive("/tmp/run"):                                  # doctest: +SKIP
...     train(...)
"""

from __future__ import annotations

import contextlib
import fcntl
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from lorax_ft.errors import UserError

LOCK_FILE = "train.lock"


class WorkdirLockedError(UserError):
    """Another `lorax-ft train` holds the workdir."""


@contextlib.contextmanager
def exclusive(workdir: str | os.PathLike):
    """Holds the workdir's lock for the `with` block (creating the workdir if needed).

    Raises:
      WorkdirLockedError: another process holds it.
    """
    with contextlib.ExitStack() as stack:
        error = None
        if jax.process_index() == 0:
            try:
                stack.enter_context(_flock(workdir))
            except WorkdirLockedError as e:
                error = e
        if jax.process_count() > 1:
            busy = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
            if busy and error is None:
                error = WorkdirLockedError(
                    f"--workdir={workdir} is in use by another `lorax-ft train` (process 0 "
                    f"could not lock {os.path.join(workdir, LOCK_FILE)})"
                )
        if error is not None:
            raise error
        yield


@contextlib.contextmanager
def _flock(workdir: str | os.PathLike):
    created = not os.path.exists(workdir)
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    try:
        with _locked(workdir, path):
            yield
    finally:
        # A run refused before it wrote anything (a config that fails to build) leaves no
        # workdir behind that it created itself.
        if created and os.listdir(workdir) == [LOCK_FILE]:
            os.remove(path)
            os.rmdir(workdir)


@contextlib.contextmanager
def _locked(workdir: str | os.PathLike, path: str):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            raise WorkdirLockedError(
                f"--workdir={workdir} is in use by another `lorax-ft train` "
                f"({'pid ' + holder if holder.isdigit() else 'pid unknown'}; lock file {path}): "
                "wait for it to end, or use another --workdir"
            ) from None
        except OSError as e:
            raise UserError(
                f"cannot lock {path} ({e.strerror}): the filesystem of --workdir="
                f"{workdir} does not support flock; use a local or NFS directory"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # no stale pid for the next holder's rivals to report
    finally:
        os.close(fd)  # releases the lock
