"""Faults a run must survive: damaged checkpoints, a busy workdir, a full disk, SIGKILL, and a
resume with a config that no longer fits its checkpoints.

The checkpoint-level tests use a small state in this process (a second each); the CLI tests
share one tiny run (`run`) and damage copies of its workdir.
"""

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lorax_ft.errors import UserError
from lorax_ft.run import config as config_lib
from lorax_ft.run import integrity
from lorax_ft.run.checkpointing import Checkpointer, CheckpointMismatchError
from lorax_ft.run.metrics import read_metrics
from lorax_ft.training.train_step import TrainState
from tests.test_trainer import ROOT, TINY, _assert_same_state, _comparable, lorax_ft

# keep=2 keeps steps 2 and 4; eval_every=2 logs the eval of step 2, the fallback's.
RUN = ("train", f"--config={TINY}", "--config.checkpoint.keep=2", "--config.train.eval_every=2",
       "--config.logging.progress=false", "--config.logging.plots=false")  # fmt: skip


# ---------------------------------------------------------------- damage, on any checkpoint


def _largest_data_file(step_dir):
    files = [
        os.path.join(r, n) for r, _, ns in os.walk(os.path.join(step_dir, "state")) for n in ns
    ]
    return max((f for f in files if f"{os.sep}d{os.sep}" in f), key=os.path.getsize)


def _flip_8_bytes(step_dir):
    path = _largest_data_file(step_dir)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        original = f.read(8)
        f.seek(-8, os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in original))


DAMAGE = {
    "data file deleted": lambda d: os.remove(_largest_data_file(d)),
    "data file truncated": lambda d: os.truncate(_largest_data_file(d), 100),
    "orbax _METADATA deleted": lambda d: os.remove(os.path.join(d, "state", "_METADATA")),
    "JSON truncated": lambda d: os.truncate(os.path.join(d, "meta", "metadata"), 10),
    "8 bytes overwritten": _flip_8_bytes,
    "manifest truncated": lambda d: os.truncate(os.path.join(d, integrity.MANIFEST), 10),
}
EXPECTED = {  # what the warning says is wrong
    "data file deleted": "is missing",
    "data file truncated": "has 100 bytes",
    "orbax _METADATA deleted": "state/_METADATA is missing",
    "JSON truncated": "meta/metadata has 10 bytes",
    "8 bytes overwritten": "sha256 differs",
    "manifest truncated": "manifest lorax_ft_manifest.json is unreadable",
}


# ---------------------------------------------------------------- a small state, in process


def _state(step, rows=64):
    trainable = {"w": jnp.full((rows, 32), float(step)), "b": jnp.arange(32.0) + step}
    return TrainState(
        step=jnp.asarray(step, jnp.int32),
        frozen={},
        trainable=trainable,
        opt_state=optax.adam(1e-3).init(trainable),
        rng=jax.random.key(step),
    )


RUN_CONFIG = {"peft.alpha": 16.0, "peft.rank": 8, "train.seed": 0}


def _saved_steps(directory, steps=(1, 2), keep=2):
    checkpoints = Checkpointer(directory, keep=keep)
    for step in steps:
        checkpoints.save(_state(step), data_state={"step": step}, base="base", config=RUN_CONFIG)
    checkpoints.close()


def _warnings(caplog, word="damaged"):
    return [r.getMessage() for r in caplog.records if word in r.getMessage()]


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_checkpoint_is_skipped_with_one_warning(tmp_path, caplog, kind):
    _saved_steps(tmp_path)
    DAMAGE[kind](tmp_path / "2")
    checkpoints = Checkpointer(tmp_path, use_async=False)
    state, data_state = checkpoints.restore(_state(0), base="base", config=RUN_CONFIG)
    checkpoints.close()
    assert int(state.step) == 1 and data_state == {"step": 1}
    np.testing.assert_array_equal(state.trainable["w"], np.full((64, 32), 1.0))
    [warning] = _warnings(caplog)
    assert f"{tmp_path}/2 is damaged" in warning and "using step 1" in warning
    assert EXPECTED[kind] in warning and "\n" not in warning
    assert (tmp_path / "2").is_dir()  # without set_aside, nothing is moved


def test_train_sets_damaged_checkpoints_aside_and_none_intact_is_an_error(tmp_path, caplog):
    _saved_steps(tmp_path)
    _flip_8_bytes(tmp_path / "2")
    checkpoints = Checkpointer(tmp_path / "ckpt")  # empty: the error says so
    with pytest.raises(UserError, match=r"no intact checkpoint in .*ckpt \(it is empty\)"):
        checkpoints.restore(_state(0), base="base")
    checkpoints.close()

    checkpoints = Checkpointer(tmp_path, keep=2)
    state, _ = checkpoints.restore(_state(0), base="base", set_aside=str(tmp_path / "aside"))
    assert int(state.step) == 1 and checkpoints.steps() == [1]
    assert f"moved it to {tmp_path}/aside/2" in _warnings(caplog)[0]
    checkpoints.save(_state(2), data_state={}, base="base")  # the step is free to be written
    checkpoints.close()
    assert integrity.verify(tmp_path / "2") is None

    _flip_8_bytes(tmp_path / "1")
    _flip_8_bytes(tmp_path / "2")
    checkpoints = Checkpointer(tmp_path)
    with pytest.raises(UserError, match=f"no intact checkpoint in {tmp_path} .step 2: .*step 1:"):
        checkpoints.restore(_state(0), base="base")


def test_a_checkpoint_without_manifest_is_restored_unverified(tmp_path, caplog):
    """Checkpoints written before manifests existed stay usable, with a warning."""
    _saved_steps(tmp_path, steps=(1,))
    os.remove(tmp_path / "1" / integrity.MANIFEST)
    checkpoints = Checkpointer(tmp_path)
    state, _ = checkpoints.restore(_state(0), base="base")
    assert int(state.step) == 1
    [warning] = _warnings(caplog, "unverified")
    assert f"{tmp_path}/1 has no checksum manifest" in warning


def test_a_changed_config_is_named_before_the_base_and_the_layout(tmp_path):
    _saved_steps(tmp_path, steps=(1,))
    checkpoints = Checkpointer(tmp_path)
    changed = {**RUN_CONFIG, "peft.alpha": 32.0, "train.seed": 1}
    with pytest.raises(CheckpointMismatchError) as error:  # the base differs too: named later
        checkpoints.restore(_state(0, rows=8), base="other", config=changed)
    message = str(error.value)
    assert "peft.alpha=16.0 (now 32.0), train.seed=0 (now 1)" in message
    assert "fingerprint" not in message and "rank" not in message and "\n" not in message

    with pytest.raises(CheckpointMismatchError, match="fingerprint base, but this run loaded"):
        checkpoints.restore(_state(0, rows=8), base="other", config=RUN_CONFIG)
    with pytest.raises(CheckpointMismatchError) as error:
        checkpoints.restore(_state(0, rows=8), base="base", config=RUN_CONFIG)
    assert "trainable/w: float32[64, 32] in the checkpoint, float32[8, 32] now" in str(error.value)
    assert "\n" not in str(error.value)


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _assert_disk_full_is_reported_and_cleaned(directory, save, caplog):
    """`save()` runs out of space: one clear error, no partial files, step 1 restorable."""
    with pytest.raises(UserError) as error:
        save()
    assert not [r for r in caplog.records if r.levelname == "ERROR"]  # orbax's, with tracebacks
    message = str(error.value)
    assert f"no space left on the device while saving checkpoint 2 to {directory}" in message
    assert "step 1 is the newest checkpoint" in message and "\n" not in message
    assert sorted(os.listdir(directory)) == ["1"]  # no temporary directory left behind
    checkpoints = Checkpointer(directory)
    state, _ = checkpoints.restore(_state(0), base="base")
    assert int(state.step) == 1
    checkpoints.close()


def test_a_full_disk_is_one_error_and_leaves_the_previous_checkpoint(tmp_path, monkeypatch, caplog):
    _saved_steps(tmp_path, steps=(1,), keep=1)
    checkpoints = Checkpointer(tmp_path, keep=1)
    monkeypatch.setattr(integrity, "write_manifest", _no_space)  # runs in orbax's writer thread

    def save():
        checkpoints.save(_state(2), data_state={}, base="base")
        checkpoints.wait()

    _assert_disk_full_is_reported_and_cleaned(tmp_path, save, caplog)
    checkpoints.close()


# orbax's writer threads may still call into the event loop of the failed save as it closes.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_full_tmpfs_is_one_error_and_leaves_the_previous_checkpoint(tmp_path, caplog):
    """The same on a real full filesystem, where tensorstore reports ENOSPC in its own words."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                          capture_output=True)  # fmt: skip
    if done.returncode:
        pytest.skip(
            f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); see the test above"
        )
    try:
        _saved_steps(mount / "ckpt", steps=(1,), keep=1)
        used = shutil.disk_usage(mount).used  # room for one more checkpoint's half
        subprocess.run(["mount", "-o", f"remount,size={used * 3 // 2}", str(mount)], check=True)
        checkpoints = Checkpointer(mount / "ckpt", keep=1)

        def save():
            checkpoints.save(_state(2), data_state={}, base="base")
            checkpoints.wait()

        _assert_disk_full_is_reported_and_cleaned(str(mount / "ckpt"), save, caplog)
        checkpoints.close()
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_checkpoint_keep_0_is_refused():
    config = config_lib.default_config()
    config.model.preset = "all-minilm-l6-v2"
    config.checkpoint.keep = 0
    with pytest.raises(config_lib.ConfigError, match=r"checkpoint.keep=0 must be >= 1"):
        config_lib.validate(config)


# ---------------------------------------------------------------- the CLI, on one tiny run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("faults") / "run"
    lorax_ft(*RUN, f"--workdir={workdir}")
    return workdir


def _copy(run, tmp_path, name="copy"):
    shutil.copytree(run, tmp_path / name)
    return tmp_path / name


def _one_warning(stderr, word="damaged"):
    assert "Traceback" not in stderr, stderr[-3000:]
    [line] = [line for line in stderr.splitlines() if word in line]
    return line


def test_train_resumes_from_the_intact_checkpoint_bitwise(run, tmp_path):
    """8 bytes flipped in step 4: the rerun warns, trains 3-4 again from step 2, and ends where
    the uninterrupted run ended, its state and metrics equal bit for bit."""
    workdir = _copy(run, tmp_path)
    _flip_8_bytes(workdir / "checkpoints" / "4")
    result = lorax_ft(*RUN, f"--workdir={workdir}")
    line = _one_warning(result.stderr)
    assert f"{workdir}/checkpoints/4 is damaged" in line and "sha256 differs" in line
    assert f"moved it to {workdir}/damaged_checkpoints/4; using step 2" in line
    assert integrity.verify(workdir / "checkpoints" / "4") is None
    records = read_metrics(workdir / "metrics.jsonl")
    assert _comparable(records) == _comparable(read_metrics(run / "metrics.jsonl"))
    _assert_same_state(workdir, run)


def test_eval_of_a_damaged_workdir_evaluates_the_intact_checkpoint(run, tmp_path):
    workdir = _copy(run, tmp_path)
    DAMAGE["orbax _METADATA deleted"](workdir / "checkpoints" / "4")
    result = lorax_ft("eval", f"--config={TINY}", f"--workdir={workdir}")
    line = _one_warning(result.stderr)
    assert "checkpoints/4 is damaged (state/_METADATA is missing); using step 2" in line
    evaluated = json.loads(result.stdout.strip().splitlines()[-1])
    [logged] = [
        r for r in read_metrics(run / "metrics.jsonl") if r["step"] == 2 and "eval_loss" in r
    ]
    assert evaluated["step"] == 2
    assert {k: evaluated[k] for k in logged if k != "step"} == {
        k: v for k, v in logged.items() if k != "step"
    }
    assert (workdir / "checkpoints" / "4").is_dir()  # eval moves nothing


def test_a_resume_that_changes_what_was_trained_is_one_line(run, tmp_path):
    workdir = _copy(run, tmp_path)
    before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    changes = {"peft.alpha": 32.0, "train.seed": 1, "peft.rank": 4, "peft.mode": "full",
               "peft.targets": "attention-qv"}  # fmt: skip
    overrides = [f"--config.{key}={value}" for key, value in changes.items()]
    result = lorax_ft(*RUN, *overrides, f"--workdir={workdir}", check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"lorax-ft train: checkpoint {workdir}/checkpoints/4 was trained with")
    for key, value in changes.items():
        assert f"{key}=" in line and f"(now {value!r})" in line, key
    assert "--workdir" in line
    after = {
        p: p.read_bytes() for p in workdir.rglob("*") if p.is_file() and p.name != "train.lock"
    }
    assert after == {p: b for p, b in before.items() if p.name != "train.lock"}


def _tensorboard_scalars(workdir) -> dict:
    """step -> {tag: value} of every complete event in the run's event files (TFRecords)."""
    from tensorboardX.proto.event_pb2 import Event

    scalars = {}
    for path in sorted((workdir / "tensorboard").iterdir()):
        data, pos = path.read_bytes(), 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            if pos + 16 + length > len(data):
                break  # a record cut by the kill
            event = Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 16 + length
            for value in event.summary.value:
                scalars.setdefault(event.step, {})[value.tag] = value.simple_value
    return scalars


def test_a_second_train_refuses_and_a_killed_run_keeps_its_tensorboard_events(tmp_path):
    workdir = tmp_path / "busy"
    command = [*RUN, f"--workdir={workdir}", "--config.train.steps=200"]
    first = subprocess.Popen([sys.executable, "-m", "lorax_ft.run.main", *command], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        metrics, deadline = workdir / "metrics.jsonl", time.time() + 600

        def logged_steps():
            return [r for r in read_metrics(metrics) if "loss" in r] if metrics.exists() else []

        lock = workdir / "train.lock"  # holds the pid once the lock is taken, before the build
        while (
            time.time() < deadline
            and first.poll() is None
            and not (lock.exists() and lock.read_text().strip() == str(first.pid))
        ):
            time.sleep(0.05)
        second = lorax_ft(*command, check=False)  # returns while the first run holds the lock
        assert first.poll() is None, "the first run ended before the second started"
        assert second.returncode == 2, second.stderr[-3000:]
        [line] = second.stderr.strip().splitlines()
        assert (
            f"--workdir={workdir} is in use by another `lorax-ft train` (pid {first.pid};" in line
        )

        while time.time() < deadline and first.poll() is None and len(logged_steps()) < 3:
            time.sleep(0.05)
        assert first.poll() is None, "the run ended before it could be killed"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()

    records = read_metrics(metrics)
    assert len([r for r in records if "loss" in r]) >= 3
    events = _tensorboard_scalars(workdir)
    for record in records:  # each line of metrics.jsonl was in the event file before it
        for key, value in record.items():
            if key != "step" and isinstance(value, float | int):
                assert events[record["step"]][key] == np.float32(value), (record["step"], key)
