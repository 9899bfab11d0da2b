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

from lorax_ft.run.metrics import read_metrics
from lorax_ft.run.trainer import TIMING_KEYS
from tests.cli import forked
from tests.tolerance import assert_close

ROOT = Path(__file__).resolve().parents[1]
TINY = "configs/bbc_minilm.py:lora,tiny"


def lorax_ft(*args, check=True, **kwargs):
    """Runs `lorax-ft` as a user would, from the repository root."""
    cmd = [sys.executable, "-m", "lorax_ft.run.main", *args]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{result.stderr[-4000:]}")
    return result


def _comparable(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def _final_state(workdir, step=4):
    """The saved state, read onto one device whatever mesh and processes wrote it."""
    import jax
    import orbax.checkpoint as ocp

    path = workdir / "checkpoints" / str(step) / "state"
    checkpointer = ocp.StandardCheckpointer()
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
        checkpointer.metadata(path).item_metadata.tree,
    )
    return checkpointer.restore(path, target)


def _assert_same_state(a, b, steps_scale=None):
    """Bitwise equal saved states, or equal up to float noise.

    Adam turns float noise into differences on the scale of its steps (tests/tolerance.py):
    the trained variables are compared on `steps_scale` (lr × steps), the optimizer's moments
    leaf by leaf.
    """
    import jax

    x, y = _final_state(a), _final_state(b)
    if steps_scale is None:
        jax.tree.map(np.testing.assert_array_equal, x, y)
        return
    assert_close(x["trainable"], y["trainable"], tol=3e-3, scale=steps_scale)
    assert_close(x["opt_state"], y["opt_state"], tol=1e-4)
    assert int(x["step"]) == int(y["step"])


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tiny")
    lorax_ft("train", f"--config={TINY}", f"--workdir={workdir}")
    return workdir


def _plain_eval(module, params, batches) -> dict:
    """Eval loss and accuracy by a plain `module.apply` and numpy: no lorax_ft step, no LoRA."""
    import jax

    apply = jax.jit(module.apply)
    losses, hits, weights = [], [], []
    for batch in batches:
        args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        logits = np.asarray(apply({"params": params}, *args), np.float64)
        shifted = logits - logits.max(-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        losses.append(-np.take_along_axis(log_probs, batch["label"][:, None], -1)[:, 0])
        hits.append(logits.argmax(-1) == batch["label"])
        weights.append(batch["weights"])
    losses, hits, weights = map(np.concatenate, (losses, hits, weights))
    return {
        "eval_loss": float((losses * weights).sum() / weights.sum()),
        "eval_accuracy": float((hits * weights).sum() / weights.sum()),
    }


def _merged_by_hand(params, saved_lora, scale):
    """Base params + scale·A@B for every adapter of a saved state (kernels are inputs-first)."""
    from lorax_ft.transform import paths

    flat, factors = paths.flatten(params), paths.flatten(saved_lora)
    for path in {name.rsplit("/", 1)[0] for name in factors}:
        delta = np.asarray(factors[f"{path}/a"], np.float64) @ factors[f"{path}/b"]
        flat[path] = flat[path] + scale * delta.reshape(flat[path].shape)
    return paths.unflatten(flat)


def test_tiny_config_trains_end_to_end(tiny_run):
    """The logged numbers against an independent computation from the initial model.

    Step 0's eval is the pretrained encoder with the fresh head (B = 0); step 4's is the same
    untouched encoder with the saved adapters merged by hand and the saved head: it fails if
    training changed a frozen weight, lost an update, or saved something else than it used.
    """
    import jax

    from configs import bbc_minilm
    from lorax_ft import data
    from lorax_ft.run.experiment import build
    from lorax_ft.transform import paths

    records = read_metrics(tiny_run / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and "lr" in r and "grad_norm" in r for r in steps)
    evals = {r["step"]: r for r in records if "eval_accuracy" in r}
    assert sorted(evals) == [0, 4]

    config = bbc_minilm.get_config("lora,tiny")
    experiment = build(config)
    initial = jax.device_get(experiment.state.variables["params"])
    batches = data.make_pipeline(
        config.data, experiment.task.tokenizer, split="eval", seed=config.train.seed,
        batch_size=config.train.eval_batch_size, num_epochs=1, **experiment.task.data_kwargs,
    )  # fmt: skip
    batches = [next(batches) for _ in range(config.train.eval_steps)]
    module = experiment.task.module
    before = _plain_eval(module, initial, batches)
    assert_close(evals[0]["eval_loss"], before["eval_loss"], tol=1e-5)
    assert evals[0]["eval_accuracy"] == before["eval_accuracy"]

    saved = jax.device_get(_final_state(tiny_run)["trainable"])
    trained_fully = {name.split("/")[0] for name in paths.flatten(saved["params"])}
    assert trained_fully == {"classifier"}  # the head; the encoder's leaves are frozen (None)
    assert np.any(saved["params"]["classifier"]["kernel"] != initial["classifier"]["kernel"])
    factors = paths.flatten(saved["lora"])
    assert all(np.any(b != 0) for name, b in factors.items() if name.endswith("/b"))  # from 0
    trained = _merged_by_hand(initial, saved["lora"], config.peft.alpha / config.peft.rank)
    trained["classifier"] = saved["params"]["classifier"]
    after = _plain_eval(module, trained, batches)
    assert_close(evals[4]["eval_loss"], after["eval_loss"], tol=1e-5)
    assert evals[4]["eval_accuracy"] == after["eval_accuracy"]
    assert evals[4]["eval_loss"] != evals[0]["eval_loss"]
    assert json.loads((tiny_run / "config.json").read_text())["peft"]["mode"] == "lora"
    assert (tiny_run / "summary.md").read_text().startswith("# Run summary")
    assert (tiny_run / "plots" / "loss.png").stat().st_size > 0
    assert list((tiny_run / "tensorboard").iterdir())
    assert (tiny_run / "checkpoints" / "4").is_dir()


# Where each shipped config's tiny variant runs through the CLI (README: "the tests run every
# config's tiny variant"). Full fine-tuning runs FSDP: one copy of Adam's state instead of 8
# halves the time (bbc_minilm: 30-40 s instead of 70-80 s on 2 shared CPU cores). SmolLM2
# (135M parameters) still takes 50-140 s and 5.4 GB per run, so those two run only with
# LORAX_FT_SLOW_TESTS=1.
TINY_RUNS = {
    ("bbc_minilm", "lora"): "tiny_run",
    ("bbc_minilm", "qlora"): "test_quant_trainer.py",
    ("bbc_minilm", "full"): "test_readme.py (its FSDP commands, shrunk as the tiny variant)",
    ("smollm2_chatterbot", "lora"): "test_readme.py",
    ("smollm2_shakespeare", "lora"): "test_trainer_lm.py",
    ("smollm2_chatterbot", "full"): "test_full_finetuning_tiny_variants (slow)",
    ("smollm2_shakespeare", "full"): "test_full_finetuning_tiny_variants (slow)",
    # The same GGUF path on a tiny file: test_quant_trainer.py (not slow).
    ("smollm2_shakespeare", "qlora"): "test_trainer_lm.py (slow)",
}
_SLOW = pytest.mark.skipif(
    not os.environ.get("LORAX_FT_SLOW_TESTS"), reason="50-140 s each; LORAX_FT_SLOW_TESTS=1"
)
_FSDP = ("--config.mesh.data=1", "--config.mesh.fsdp=8")


def test_every_config_has_a_tiny_run():
    import importlib

    shipped = [p.stem for p in (ROOT / "configs").glob("*.py") if "def get_config" in p.read_text()]
    modes = {name: getattr(importlib.import_module(f"configs.{name}"), "MODES", ("lora", "full"))
             for name in shipped}  # fmt: skip
    assert set(TINY_RUNS) == {(name, mode) for name in shipped for mode in modes[name]}


@pytest.mark.parametrize(
    ("config", "overrides"),
    [
        pytest.param("smollm2_chatterbot", _FSDP, marks=_SLOW),
        pytest.param("smollm2_shakespeare", _FSDP, marks=_SLOW),
    ],
)
def test_full_finetuning_tiny_variants(tmp_path, config, overrides):
    result = lorax_ft(
        "train", f"--config=configs/{config}.py:full,tiny", f"--workdir={tmp_path}", *overrides
    )
    summary = _last_json(result.stdout)
    assert summary["mode"] == "full" and summary["trainable_params"] == summary["total_params"]
    losses = [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert len(losses) == summary["steps"] and np.all(np.isfinite(losses))
    assert (tmp_path / "checkpoints" / str(summary["steps"])).is_dir()


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    """`tiny_run` exported as a PEFT adapter directory."""
    out = tmp_path_factory.mktemp("export") / "adapter"
    lorax_ft("export", f"--config={TINY}", f"--workdir={tiny_run}", f"--export_dir={out}")
    return out


def _forked_ok(*args) -> dict:
    """`lorax-ft *args` from a preloaded fork (no interpreter start): its summary line."""
    result = forked(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    return _last_json(result.stdout)


def test_eval_and_export_from_the_workdir(tiny_run, exported):
    result = lorax_ft("eval", f"--config={TINY}", f"--workdir={tiny_run}")
    evaluated = json.loads(result.stdout.strip().splitlines()[-1])
    final = [r for r in read_metrics(tiny_run / "metrics.jsonl") if "eval_accuracy" in r][-1]
    assert evaluated["step"] == 4
    assert evaluated["eval_accuracy"] == pytest.approx(final["eval_accuracy"])

    out = exported
    meta = json.loads((out / "adapter_config.json").read_text())
    assert meta["peft_type"] == "LORA" and meta["r"] == 8 and meta["lora_alpha"] == 16
    # Mean pooling has no transformers classifier: the encoder's adapters (a BertModel's) and
    # the head beside them, with how to apply it.
    assert meta["task_type"] == "FEATURE_EXTRACTION" and meta["modules_to_save"] is None
    assert json.loads((out / "classifier.json").read_text())["pooling"] == "mean"
    assert meta["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    _peft_computes_the_run(tiny_run, out)


def _peft_computes_the_run(workdir, adapter):
    """The exported adapter, loaded by PEFT onto transformers' MiniLM from its pip package, with
    the head applied as classifier.json says: the logits of the trained run (1e-5)."""
    import jax
    import jax.numpy as jnp

    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from configs import bbc_minilm
    from lorax_ft.models.presets import preset_path
    from lorax_ft.run import commands
    from lorax_ft.transform import lora
    from tests.test_models_export import head_logits

    run = commands.restore(bbc_minilm.get_config("lora,tiny"), str(workdir))
    variables = jax.device_get(run.state.variables)
    ids = np.random.default_rng(0).integers(1000, 5000, size=(2, 12))
    mask = np.ones_like(ids)
    mask[1, 8:] = 0
    merged = lora.merge(variables["params"], variables["lora"])
    ours = np.asarray(
        run.task.module.apply({"params": merged}, jnp.asarray(ids), jnp.asarray(mask))
    )
    base = transformers.BertModel.from_pretrained(preset_path("all-minilm-l6-v2")).eval()
    model = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    theirs = head_logits(hidden.last_hidden_state.numpy().astype(np.float64), mask, adapter)
    assert_close(theirs, ours, tol=1e-5)


def test_a_peft_export_evaluates_and_starts_a_run_as_the_checkpoint_it_came_from(
    tiny_run, exported, tmp_path
):
    """export (PEFT format) -> `eval --adapters`, `--combine` and `train --config.peft.init_from`:
    the metrics of the run it came from; an adapter that does not fit the config is one line."""
    adapter = exported
    evals = [r for r in read_metrics(tiny_run / "metrics.jsonl") if "eval_accuracy" in r]
    first, final = evals[0], evals[-1]  # before training and at its end (step 4)
    evaluated = _forked_ok("eval", f"--config={TINY}", f"--adapters={adapter},none")["adapters"]
    assert evaluated[str(adapter)]["eval_loss"] == pytest.approx(final["eval_loss"], 1e-6)
    assert evaluated["none"]["eval_loss"] == pytest.approx(first["eval_loss"], 1e-6)
    assert abs(first["eval_loss"] - final["eval_loss"]) > 1e-4  # it trained

    # PEFT's add_weighted_adapter: half of it twice, concatenated, is the adapter itself.
    both = f"--adapters={adapter},{adapter}"
    combined = _forked_ok("eval", f"--config={TINY}", both, "--combine=cat", "--weights=0.5,0.5")
    [(name, cat)] = combined["adapters"].items()
    assert name == f"cat(0.5*{adapter}, 0.5*{adapter})" and cat["combination_error"] == 0.0
    assert cat["eval_loss"] == pytest.approx(final["eval_loss"], 1e-6)

    started = _forked_ok("train", f"--config={TINY}", f"--workdir={tmp_path / 'again'}",
                         f"--config.peft.init_from={adapter}", "--config.train.steps=1")  # fmt: skip
    assert started["eval_before"]["eval_loss"] == pytest.approx(final["eval_loss"], 1e-6)

    refused = forked("eval", f"--config={TINY}", f"--adapters={adapter}", "--config.peft.rank=4")
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr
    assert f"--adapters: {adapter}: the adapter of bert/" in lines[0]
    assert "has rank 8" in lines[0] and "the config rank 4" in lines[0]


def test_a_pissa_run_exports_a_lora_on_the_original_base(tmp_path):
    """PiSSA trains on residual kernels; its export is PEFT's rank-2r LoRA on the base as loaded:
    merged into that base, the same kernels as the run's own merge."""
    import jax

    from configs import bbc_minilm
    from lorax_ft.models import load_peft
    from lorax_ft.run import commands, tasks
    from lorax_ft.run.experiment import num_labels_of
    from lorax_ft.transform import lora, paths

    overrides = ("--config.peft.init=pissa_niter_2", "--config.peft.targets=attention-qv")
    workdir, adapter = tmp_path / "run", tmp_path / "adapter"
    _forked_ok("train", f"--config={TINY}", f"--workdir={workdir}", *overrides)
    _forked_ok("export", f"--config={TINY}", f"--workdir={workdir}", f"--export_dir={adapter}",
               *overrides)  # fmt: skip
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 16  # 2 × 8

    config = bbc_minilm.get_config("lora,tiny")
    config.peft.init, config.peft.targets = "pissa_niter_2", "attention-qv"
    run = commands.restore(config, str(workdir))
    trained = jax.device_get(run.state.variables)
    original = jax.device_get(tasks.build(config, num_labels_of(config)).params)
    loaded = load_peft(str(adapter), run.task.module, original)
    ours = paths.flatten(lora.merge(trained["params"], trained["lora"]))
    theirs = paths.flatten(lora.merge(original, loaded.adapters))
    query = "bert/encoder/layer_0/attention/self/query/kernel"
    assert float(np.abs(ours[query] - paths.flatten(original)[query]).max()) > 1e-3  # trained
    for path in lora.factors_by_path(trained["lora"]):
        assert_close(theirs[path], ours[path], tol=1e-5)


def test_killed_run_resumes_bitwise(tiny_run, tmp_path):
    """SIGKILL between checkpoints, re-run the same command: same metrics and state as `tiny_run`."""
    killed = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "lorax_ft.run.main",
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
    _assert_same_state(killed, tiny_run)


def test_sigterm_saves_exits_0_and_the_same_command_resumes(tiny_run, tmp_path):
    """A preemption notice: the run reaches the sync point, checkpoints there and exits 0."""
    workdir = tmp_path / "preempted"
    command = ["train", f"--config={TINY}", f"--workdir={workdir}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorax_ft.run.main", *command],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    metrics, deadline = workdir / "metrics.jsonl", time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any("loss" in r for r in read_metrics(metrics)):
            break  # step 1 is done; steps 2-4 are still ahead
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before the signal"
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    summary = _last_json(stdout)
    stopped = summary["steps"]
    assert summary["preempted"] and 1 <= stopped < 4, summary
    assert (workdir / "checkpoints" / str(stopped)).is_dir()
    assert [r["step"] for r in read_metrics(metrics) if "loss" in r] == list(range(1, stopped + 1))

    resumed = lorax_ft(*command)  # the same command continues from the preemption checkpoint
    assert not _last_json(resumed.stdout)["preempted"]
    assert _comparable(read_metrics(metrics)) == _comparable(
        read_metrics(tiny_run / "metrics.jsonl")
    )
    _assert_same_state(workdir, tiny_run)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one_and_restore_on_another_mesh(tiny_run, tmp_path):
    """2 processes × 4 CPU devices (FSDP 4 × data 2) == 1 process × 8 devices (data 8)."""
    from configs import bbc_minilm

    workdir, port = tmp_path / "two_hosts", _free_port()
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "4"}  # overrides conftest's 8

    def start(index):
        command = [
            "train", f"--config={TINY}", f"--workdir={workdir}", "--config.mesh.data=2",
            "--config.mesh.fsdp=4", f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2", f"--process_id={index}",
        ]  # fmt: skip
        return subprocess.Popen(
            [sys.executable, "-m", "lorax_ft.run.main", *command],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    procs = [start(index) for index in range(2)]
    outputs = [proc.communicate(timeout=900) for proc in procs]
    for proc, (_, stderr) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, stderr[-3000:]
    summary = _last_json(outputs[0][0])
    assert summary["processes"] == 2 and summary["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}

    two, one = read_metrics(workdir / "metrics.jsonl"), read_metrics(tiny_run / "metrics.jsonl")
    assert [sorted(r) for r in two] == [sorted(r) for r in one]
    for a, b in zip(_comparable(two), _comparable(one), strict=True):
        assert_close(a, b, tol=1e-5)  # each metric on its own scale (loss ~1.6, lr ~1e-3)
    config = bbc_minilm.get_config("lora,tiny")
    _assert_same_state(workdir, tiny_run, steps_scale=config.schedule.lr * config.train.steps)

    # Restored in one process onto data 4 × tensor 2, it evaluates as the two processes did.
    result = lorax_ft("eval", f"--config={TINY}", f"--workdir={workdir}",
                      "--config.mesh.data=4", "--config.mesh.tensor=2")  # fmt: skip
    evaluated = _last_json(result.stdout)
    final = [r for r in two if "eval_loss" in r][-1]
    assert evaluated["step"] == 4
    assert evaluated["eval_accuracy"] == final["eval_accuracy"]
    assert_close(evaluated["eval_loss"], final["eval_loss"], tol=1e-5)


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
        ("--num_processes=2", "multi-host flags need all three; missing --coordinator_address"),
    ],
)
def test_bad_config_is_one_line_and_touches_no_checkpoint(tiny_run, override, message):
    before = sorted(p.name for p in (tiny_run / "checkpoints").iterdir())
    result = lorax_ft("train", f"--config={TINY}", override, f"--workdir={tiny_run}", check=False)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in (tiny_run / "checkpoints").iterdir()) == before
