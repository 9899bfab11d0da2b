"""README.md's `lorax-ft` commands, run through the installed command the way a user types them.

Every `lorax-ft` line of the README's ```sh blocks runs, in README order, through `.venv/bin/
lorax-ft` (the console script pip installed, not `python -m`) from a directory outside the
repository, with `configs/...` made absolute and `runs/...` inside that directory; the `plan`
command also runs literally from the repository root. Commands on a full-size config get the
overrides of the `tiny` variants appended (a few steps of short sequences), so that the suite
stays within CI's time; they are otherwise unchanged. `make` lines are the two commands
themselves and are not run here. ```console blocks (multi-host commands that need real hosts)
are not run; tests/test_trainer.py runs two processes on 127.0.0.1 instead.

Every ```python block runs too, in README order, in one namespace of a fresh interpreter started
outside the repository; a `# -> text` comment line is output the code before it must print.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

from lorax_ft.run.metrics import read_metrics
from tests.cli import ROOT, installed
from tests.tolerance import assert_close

SHRINK = (
    "--config.train.steps=2",
    "--config.schedule.warmup_steps=1",
    "--config.train.batch_size=8",
    "--config.train.eval_batch_size=8",
    "--config.train.eval_steps=1",
    "--config.data.max_length=16",
    "--config.train.checkpoint_every=2",
    "--config.train.max_new_tokens=2",
)


def readme_commands() -> list[list[str]]:
    """The `lorax-ft` command lines of README.md's sh blocks, continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("lorax-ft "):
                commands.append(shlex.split(line))
    return commands


def test_readme_names_real_commands():
    commands = readme_commands()
    assert len(commands) >= 10
    assert {c[1] for c in commands} == {"train", "eval", "export", "generate", "plan"}


def _as_run_from(command: list[str], directory) -> list[str]:
    """Arguments for running `command` from `directory`, as described in the module docstring."""
    args = []
    for arg in command[1:]:
        if arg.startswith("--config=configs/"):
            arg = f"--config={ROOT}/{arg.removeprefix('--config=')}"
        args.append(arg)
    config_arg = next(a for a in args if a.startswith("--config="))
    if args[0] != "plan" and "tiny" not in config_arg:
        args += SHRINK
    return args


def test_every_readme_command_runs_through_the_installed_command(tmp_path):
    """Also the end-to-end checks of the chat config (tests/test_trainer_lm.py has the text one):
    its answer-only loss, perplexity, samples, and `generate` answering as the samples did."""
    outside = tmp_path / "user"
    outside.mkdir()
    evals_before = []  # (config, eval_before) of each train command
    for command in readme_commands():
        if command[1] == "plan":
            continue  # run literally from the repository root below
        args = _as_run_from(command, outside)
        result = installed(*args, cwd=outside)
        assert result.returncode == 0, (shlex.join(command), result.stderr[-3000:])
        summary = json.loads(result.stdout.strip().splitlines()[-1])
        workdir = outside / next(a for a in args if a.startswith("--workdir=")).split("=", 1)[1]
        if command[1] == "train":
            assert summary["steps"] >= 2 and not summary["preempted"]
            evals_before.append((args[1], summary["eval_before"]))
            if "smollm2_chatterbot" in args[1]:
                _check_chat_run(workdir)
        elif command[1] == "eval":
            assert 0.0 <= summary["eval_accuracy"] <= 1.0 and summary["step"] == 2
        elif command[1] == "generate":
            samples = json.loads((workdir / "samples.json").read_text())
            assert summary["step"] == 2 and summary["samples"] == {"Hi": samples["after"]["Hi"]}
        elif command[1] == "export":
            exported = outside / summary["export_dir"]
            names = {p.name for p in exported.iterdir()}
            merged = "--merged" in command or ":full" in args[1]
            assert ("adapter_model.safetensors" in names) == (not merged)
            assert ("model.safetensors" in names) == merged

    # Full fine-tuning starts from the same model as LoRA (B = 0): the same step-0 eval, on
    # every mesh (the shrunk full runs read the same eval batch as the shrunk LoRA run).
    lora = next(e for c, e in evals_before if c.endswith("bbc_minilm.py:lora"))
    full = [e for c, e in evals_before if c.endswith("bbc_minilm.py:full")]
    assert len(full) == 2
    for before in full:
        assert before["eval_accuracy"] == lora["eval_accuracy"]
        assert_close(before["eval_loss"], lora["eval_loss"], tol=1e-5)


def _check_chat_run(workdir):
    records = read_metrics(workdir / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert all(r["tokens"] > 0 for r in records if "loss" in r)  # answer tokens were trained
    perplexity = [r["eval_perplexity"] for r in records if "eval_perplexity" in r]
    assert len(perplexity) == 2 and all(np.isfinite(perplexity))
    samples = json.loads((workdir / "samples.json").read_text())
    assert set(samples) == {"before", "after"} and all(samples["after"].values())


@pytest.mark.parametrize("command", [c for c in readme_commands() if c[1] == "plan"])
def test_plan_runs_literally_from_the_repository_root(command):
    result = installed(*command[1:], cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads(result.stdout.strip().splitlines()[-1])
    assert plan["lora"]["devices"] == 16 and plan["full"]["devices"] == 16


def readme_python_blocks() -> list[str]:
    """The ```python blocks of README.md, in order."""
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


# Each block is compiled under its own name, so that a traceback says which block failed.
_RUN_BLOCKS = """
import json, sys
namespace = {"__name__": "__main__"}
for i, block in enumerate(json.load(open(sys.argv[1]))):
    exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
"""


def test_every_readme_python_block_runs_in_order(tmp_path):
    blocks = readme_python_blocks()
    assert len(blocks) >= 3
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    (tmp_path / "run_blocks.py").write_text(_RUN_BLOCKS)
    # os.environ carries tests/conftest.py's XLA flags (8 CPU devices) and compilation cache.
    result = subprocess.run(
        [sys.executable, "run_blocks.py", "blocks.json"],
        cwd=tmp_path,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    expected = [
        line.removeprefix("# -> ")
        for block in blocks
        for line in block.splitlines()
        if line.startswith("# -> ")
    ]
    printed = iter(result.stdout.splitlines())
    assert expected and all(line in printed for line in expected), (expected, result.stdout)
