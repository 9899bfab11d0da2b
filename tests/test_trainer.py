"""The trainer end to end through the CLI: tiny configs, kill-and-resume, bad configs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lorax_ft.metrics import read_metrics
from lorax_ft.trainer import TIMING_KEYS

ROOT = Path(__file__).resolve().parents[1]
TINY = "configs/bbc_minilm.py:lora,tiny"


def lorax_ft(*args, check=True, **kwargs):
    """Runs `lorax-ft` as a user would, from the repository root."""
    cmd = [sys.executable, "-m", "lorax_ft.main", *args]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{result.stderr[-4000:]}")
    return result


def _comparable(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tiny")
    lorax_ft("train", f"--config={TINY}", f"--workdir={workdir}")
    return workdir


def test_tiny_config_trains_end_to_end(tiny_run):
    records = read_metrics(tiny_run / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and "lr" in r and "grad_norm" in r for r in steps)
    evals = [r for r in records if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 4] and 0 <= evals[-1]["eval_accuracy"] <= 1
    assert json.loads((tiny_run / "config.json").read_text())["peft"]["mode"] == "lora"
    assert (tiny_run / "summary.md").read_text().startswith("# Run summary")
    assert (tiny_run / "plots" / "loss.png").stat().st_size > 0
    assert list((tiny_run / "tensorboard").iterdir())
    assert (tiny_run / "checkpoints" / "4").is_dir()


def test_eval_and_export_from_the_workdir(tiny_run, tmp_path):
    result = lorax_ft("eval", f"--config={TINY}", f"--workdir={tiny_run}")
    evaluated = json.loads(result.stdout.strip().splitlines()[-1])
    final = [r for r in read_metrics(tiny_run / "metrics.jsonl") if "eval_accuracy" in r][-1]
    assert evaluated["step"] == 4
    assert evaluated["eval_accuracy"] == pytest.approx(final["eval_accuracy"])

    out = tmp_path / "adapters"
    lorax_ft("export", f"--config={TINY}", f"--workdir={tiny_run}", f"--export_dir={out}",
             "--adapters_only")  # fmt: skip
    meta = json.loads((out / "adapter_config.json").read_text())
    assert meta["adapters"] and "classifier/kernel" in meta["trained_fully"]


def test_killed_run_resumes_bitwise(tiny_run, tmp_path):
    """SIGKILL between checkpoints, re-run the same command: same metrics and state as `tiny_run`."""
    killed = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "lorax_ft.main",
        "train",
        f"--config={TINY}",
        f"--workdir={killed}",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    # Kill as soon as the step-2 checkpoint is committed (orbax renames it into place), while
    # steps 3 and 4 are still to run or being logged: the resume must start from step 2.
    committed = killed / "checkpoints" / "2"
    while time.time() < deadline and proc.poll() is None and not committed.is_dir():
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "checkpoints" / "4").exists()
    lorax_ft("train", f"--config={TINY}", f"--workdir={killed}")  # the same command resumes

    assert _comparable(read_metrics(killed / "metrics.jsonl")) == _comparable(
        read_metrics(tiny_run / "metrics.jsonl")
    )
    import jax
    import orbax.checkpoint as ocp

    def final_state(workdir):
        return ocp.StandardCheckpointer().restore(workdir / "checkpoints" / "4" / "state")

    a, b = final_state(tiny_run), final_state(killed)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "--config.data.path=/no/such/file.jsonl",
            "data.path='/no/such/file.jsonl' does not exist",
        ),
        ("--config.train.batch_size=12", "does not divide over the 8 devices"),
        ("--config.peft.mode=half", "peft.mode='half' is not one of"),
        ("--config.train.batchsize=8", "batchsize"),
        ("--config.train.steps=many", "steps"),
    ],
)
def test_bad_config_is_one_line_and_touches_no_checkpoint(tiny_run, override, message):
    before = sorted(p.name for p in (tiny_run / "checkpoints").iterdir())
    result = lorax_ft("train", f"--config={TINY}", override, f"--workdir={tiny_run}", check=False)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in (tiny_run / "checkpoints").iterdir()) == before


@pytest.mark.parametrize("config", ["smollm2_chatterbot", "smollm2_shakespeare"])
def test_smollm2_tiny_configs_train_and_sample(config, tmp_path):
    lorax_ft("train", f"--config=configs/{config}.py:lora,tiny", f"--workdir={tmp_path}")
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert all(r["tokens"] > 0 for r in records if "loss" in r)  # answer/text tokens were trained
    perplexity = [r["eval_perplexity"] for r in records if "eval_perplexity" in r]
    assert len(perplexity) == 2 and all(np.isfinite(perplexity))
    samples = json.loads((tmp_path / "samples.json").read_text())
    assert set(samples) == {"before", "after"} and all(samples["after"].values())
    if config == "smollm2_chatterbot":  # the generate command answers through the chat template
        result = lorax_ft("generate", f"--config=configs/{config}.py:lora,tiny",
                          f"--workdir={tmp_path}", "--prompt=Hi")  # fmt: skip
        generated = json.loads(result.stdout.strip().splitlines()[-1])
        assert generated["step"] == 2 and generated["samples"]["Hi"] == samples["after"]["Hi"]
