"""Checksum manifests: a checkpoint damaged after it was written is detected, never used.

Orbax commits a checkpoint by renaming its temporary directory, so a step directory appears
complete or not at all. What happens to it afterwards (a file deleted or truncated, a disk or a
copy that flips bytes) orbax does not check: a missing file can surface as a cryptic error, and
overwritten bytes inside an array restore without any error, as wrong numbers.

`write_manifest` records the size and sha256 of every file of a checkpoint's items (the files in
the step directory's subdirectories) in `MANIFEST`. The `Checkpointer` calls it from orbax's
post-finalization hook: every process has finished writing, and the temporary directory has not
been renamed yet, so the manifest becomes visible in the same rename as the data it describes
(there is no moment at which a committed checkpoint lacks its manifest). Orbax's own step-level
bookkeeping (`_CHECKPOINT_METADATA`, `commit_success.txt`) is rewritten by orbax after that hook
and is not needed to restore, so it is not covered. `verify` recomputes everything; hashing runs
at disk speed (a 180 MB full fine-tuning checkpoint takes a fraction of a second).

A step without a manifest was written by an earlier lorax-ft (or had its manifest removed):
`verify` says so with `NO_MANIFEST`, and the caller decides (the `Checkpointer` restores it
unverified, with a warning).

>>> write_manifest("/run/checkpoints/4.orbax-checkpoint-tmp")   # doctest: +SKIP
>>> verify("/run/checkpoints/4")                                # doctest: +SKIP
'state/d/78ab5a3d has other contents than when it was written (sha256 differs)'
"""

from __future__ import annotations

import hashlib
import json
import os

MANIFEST = "lorax_ft_manifest.json"
NO_MANIFEST = f"no checksum manifest ({MANIFEST})"
_CHUNK = 1 << 22  # 4 MiB reads: hashlib releases the GIL for each, training threads keep going


def write_manifest(step_dir: str | os.PathLike) -> None:
    """Records size and sha256 of every file under the subdirectories of `step_dir`."""
    files = {path: _digest(os.path.join(step_dir, path)) for path in _item_files(step_dir)}
    tmp = os.path.join(step_dir, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"version": 1, "files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(step_dir, MANIFEST))


def verify(step_dir: str | os.PathLike) -> str | None:
    """None when every file the manifest lists is there, whole and unchanged; else what is wrong.

    Returns `NO_MANIFEST` when `step_dir` has no manifest, and a short reason naming the first
    damaged file otherwise.
    """
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.exists(path):
        return NO_MANIFEST
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its checksum manifest {MANIFEST} is unreadable ({e})"
    for name, expected in sorted(files.items()):
        file = os.path.join(step_dir, name)
        if not os.path.isfile(file):
            return f"{name} is missing"
        size = os.path.getsize(file)
        if size != expected["bytes"]:
            return f"{name} has {size} bytes, the manifest says {expected['bytes']}"
        if _digest(file)["sha256"] != expected["sha256"]:
            return f"{name} has other contents than when it was written (sha256 differs)"
    return None


def _item_files(step_dir) -> list[str]:
    """Paths, relative to `step_dir`, of the files in its subdirectories."""
    top, found = os.fspath(step_dir), []
    for root, _, names in os.walk(top):
        if root != top:  # not orbax's step-level files, nor the manifest itself
            found += [os.path.relpath(os.path.join(root, n), top) for n in names]
    return sorted(found)


def _digest(path) -> dict:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": digest.hexdigest()}
