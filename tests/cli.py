"""Running `lorax-ft` in tests: as a user types it, or cheaply in a forked process.

`installed(*args, cwd=...)` runs the console script that `pip install` put next to the test's
Python (`.venv/bin/lorax-ft`), from any directory: what a user runs.

`forked(*args, cwd=...)` runs the same `lorax_ft.run.main.run()` in a child of a fork server that has
imported JAX and lorax_ft once, so the many bad-input runs of the suite each cost the work they
do, not a 3-second interpreter start. The child is a fresh process for absl's flags (nothing was
parsed in the server), sees the same environment, and its exit code and stderr/stdout are
returned exactly as a subprocess's would be: a traceback printed by an uncaught exception is in
stderr, and its exit code is 1.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
LORAX_FT = Path(sys.executable).with_name("lorax-ft")


class Result(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def installed(*args: str, cwd: str | os.PathLike, timeout: float = 900, env=None) -> Result:
    """The installed `lorax-ft` command, run from `cwd`."""
    done = subprocess.run(
        [str(LORAX_FT), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )
    return Result(done.returncode, done.stdout, done.stderr)


_context = None


def _fork_context():
    global _context  # one fork server per test process, started on first use
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(["jax", "lorax_ft.run.main", "lorax_ft.run.commands"])
    return _context


def _child(args, cwd, out_path, err_path):
    os.chdir(cwd)
    out = os.open(out_path, os.O_WRONLY)
    err = os.open(err_path, os.O_WRONLY)
    os.dup2(out, 1)
    os.dup2(err, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    sys.argv = ["lorax-ft", *args]
    code = 0
    try:
        from lorax_ft.run.main import run

        run()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # what Python itself does with an uncaught exception
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def forked(*args: str, cwd: str | os.PathLike = ROOT, timeout: float = 600) -> Result:
    """`lorax-ft *args` run from `cwd` in a freshly forked process."""
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "out"), os.path.join(tmp, "err")
        Path(out).touch()
        Path(err).touch()
        process = _fork_context().Process(target=_child, args=(args, str(cwd), out, err))
        process.start()
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            raise TimeoutError(f"lorax-ft {' '.join(args)} ran past {timeout} s")
        return Result(process.exitcode, Path(out).read_text(), Path(err).read_text())
