"""The training loop: `train_and_evaluate(config, workdir)`, for LoRA and full fine-tuning alike.

Re-running the same command resumes from the newest checkpoint in `workdir/checkpoints`; a run
killed at any point and resumed ends with the same parameters and the same logged metrics
(timing metrics aside) as one that was never interrupted, because the step's randomness comes
from `fold_in(rng, step)`, the data iterator's state is checkpointed with the model, and the
metrics logged after the restored step are dropped before training continues.

Files in the workdir: `config.json` (the resolved config), `metrics.jsonl`, `tensorboard/`,
`checkpoints/`, `plots/*.png` and `summary.md`.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from lorax_ft import data
from lorax_ft.errors import UserError
from lorax_ft.run import config as config_lib
from lorax_ft.run import workdir_lock
from lorax_ft.run.checkpointing import Checkpointer
from lorax_ft.run.completions import generate_texts, merged_params
from lorax_ft.run.experiment import Experiment, build
from lorax_ft.run.metrics import MetricsWriter, plot_curves, read_metrics
from lorax_ft.run.resume import resume_config
from lorax_ft.training.train_step import TrainState
from lorax_ft.transform import lora

TIMING_KEYS = ("step_time_s", "tokens_per_s", "examples_per_s")
"""Logged metrics that measure the machine, not the run: they differ between identical runs."""


def evaluate(experiment: Experiment, state: TrainState) -> dict:
    """Eval metrics over the eval split (or its first `train.eval_steps` batches)."""
    config, task = experiment.config, experiment.task
    batches = data.make_pipeline(
        config.data, task.tokenizer, split="eval", batch_size=config.train.eval_batch_size,
        seed=config.train.seed, num_epochs=1, process_index=jax.process_index(),
        process_count=jax.process_count(), **task.data_kwargs,
    )  # fmt: skip
    totals = None
    for index, batch in enumerate(batches):
        if config.train.eval_steps and index >= config.train.eval_steps:
            break
        stats = experiment.eval_step(state, experiment.global_batch(batch))
        stats = jax.device_get(stats)
        totals = stats if totals is None else jax.tree.map(np.add, totals, stats)
    return task.summarize(totals)


def train_and_evaluate(config, workdir: str | os.PathLike) -> dict:
    """Trains as the config says, evaluating and checkpointing; returns the run summary.

    On a preemption notice (SIGTERM, once `jax.distributed` is initialised, as `lorax-ft` does)
    every process reaches the same step, a checkpoint is saved there and the summary comes back
    with `"preempted": True`; the same command resumes from that checkpoint.

    A second train on the same workdir refuses at once (`workdir_lock`). Resuming takes the
    newest intact checkpoint; damaged newer ones are moved to `workdir/damaged_checkpoints`.
    """
    # A bad config is refused before the lock creates the workdir; build() checks it again.
    config_lib.validate(config, jax.device_count(), jax.process_count())
    with workdir_lock.exclusive(workdir):  # before anything is written to the workdir
        return _train_and_evaluate(config, Path(workdir))


def _train_and_evaluate(config, workdir: Path) -> dict:
    start_time = time.perf_counter()
    experiment = build(config)
    task, state = experiment.task, experiment.state
    is_writer = jax.process_index() == 0  # one process writes logs, reports and samples
    # Created after the build: a config refused there leaves no checkpoints folder.
    checkpoints = _checkpointer(config, workdir)
    base, run_config = experiment.base_fingerprint, resume_config(experiment.config)
    train_data = data.make_pipeline(
        config.data, task.tokenizer, split="train", batch_size=config.train.batch_size,
        seed=config.train.seed, process_index=jax.process_index(),
        process_count=jax.process_count(), **task.data_kwargs,
    )  # fmt: skip

    resumed = checkpoints.latest_step() is not None
    if resumed:
        state, data_state = checkpoints.restore(
            state, base=base, config=run_config, set_aside=str(workdir / "damaged_checkpoints")
        )
        train_data.set_state(data_state)
    # Only a resume that fits this config may touch the run's config.json and metrics.
    if is_writer:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(experiment.config.to_json_best_effort(indent=2) + "\n")
    writer = MetricsWriter(workdir, enabled=is_writer, tensorboard=config.logging.tensorboard)
    writer.truncate_after(int(state.step) if resumed else -1)
    step = int(state.step)
    if step == 0:
        writer.write(0, evaluate(experiment, state))
        _write_samples(experiment, workdir, state, "before")

    total_steps, times, preempted, skipped = config.train.steps, [], False, 0
    progress = _progress(config, step, total_steps)
    while step < total_steps and not preempted:
        batch = experiment.global_batch(next(train_data))
        tick = time.perf_counter()
        state, metrics = experiment.train_step(state, batch)
        metrics = jax.device_get(metrics)
        times.append(time.perf_counter() - tick)
        step += 1
        _check_finite(config, metrics, step, checkpoints)
        skipped += int(metrics.get("skipped", 0))
        if step % config.train.log_every == 0 or step == total_steps:
            examples = config.train.batch_size
            timing = {"step_time_s": times[-1], "examples_per_s": examples / times[-1]}
            if "tokens" in metrics:
                timing["tokens_per_s"] = float(metrics["tokens"]) / times[-1]
            record = writer.write(step, {**metrics, **timing})
            progress.set_postfix(loss=f"{record['loss']:.4f}")
        every = config.train.eval_every
        if (every and step % every == 0) or step == total_steps:
            writer.write(step, evaluate(experiment, state))
        # Every process asks at every step; all of them see the notice at the same step.
        preempted = multihost_utils.reached_preemption_sync_point(step)
        if preempted or step % config.train.checkpoint_every == 0 or step == total_steps:
            checkpoints.save(state, data_state=train_data.get_state(), base=base, config=run_config)
        progress.update(1)
    progress.close()
    if preempted:
        logging.warning("preempted: saved the checkpoint of step %d; rerun to resume", step)
    else:
        _write_samples(experiment, workdir, state, "after")
    checkpoints.wait()
    writer.close()
    summary = _summarize(experiment, workdir, state, times, time.perf_counter() - start_time)
    summary["preempted"] = preempted
    summary["skipped_steps"] = skipped  # of this invocation's steps
    if skipped:
        logging.warning(
            "%d of the %d steps trained now were skipped (non-finite loss or gradient norm, "
            "train.on_nonfinite='skip'): their updates were not applied; a lower schedule.lr "
            "or optim.clip_norm may help",
            skipped, len(times),
        )  # fmt: skip
    if is_writer and not preempted:
        _write_reports(config, workdir, summary)
    checkpoints.close()
    return summary


def _checkpointer(config, workdir: Path) -> Checkpointer:
    return Checkpointer(
        workdir / "checkpoints", keep=config.checkpoint.keep, use_async=config.checkpoint.use_async
    )


def _write_samples(experiment: Experiment, workdir: Path, state, when: str) -> None:
    """Greedy completions of `train.sample_prompts` into `samples.json` (causal LMs only)."""
    config, task = experiment.config, experiment.task
    prompts = list(config.train.sample_prompts)
    if task.kind != "causal_lm" or not prompts:
        return
    if jax.process_count() > 1:
        # Decoding reads the prompts as host arrays, which a mesh across processes cannot take.
        logging.warning("samples are not generated in multi-process runs; use `lorax-ft generate`")
        return
    params = merged_params(state.variables)
    texts = [generation_prompt(config.data, p) for p in prompts]
    completions = generate_texts(task, params, texts, config.train.max_new_tokens)
    path = workdir / "samples.json"
    samples = json.loads(path.read_text()) if path.exists() else {}
    samples[when] = dict(zip(prompts, completions, strict=True))
    path.write_text(json.dumps(samples, indent=2) + "\n")


def generation_prompt(data_config, text: str) -> str:
    """A sample prompt as the model saw its training data: a user turn for chat data."""
    kind = data_config.kind or data.named.named_dataset(data_config.name).kind
    if kind != "chat":
        return text
    rendered = data.CHAT_FORMATS[data_config.chat_format]([{"role": "user", "content": text}])
    return rendered + ("<|im_start|>assistant\n" if data_config.chat_format == "chatml" else "")


class NonFiniteError(UserError, FloatingPointError):
    """Training diverged: a non-finite loss or gradient norm with `train.on_nonfinite='stop'`."""


def _check_finite(config, metrics, step, checkpoints) -> None:
    if config.train.on_nonfinite == "stop" and not (
        np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])
    ):
        checkpoints.wait()
        raise NonFiniteError(
            f"non-finite loss ({metrics['loss']}) or gradient norm ({metrics['grad_norm']}) at "
            f"step {step}; the last good checkpoint is step {checkpoints.latest_step()} "
            "(set train.on_nonfinite='skip' to skip such steps instead)"
        )


def _progress(config, start, total):
    from tqdm import tqdm

    disable = not config.logging.progress or jax.process_index() != 0
    return tqdm(total=total, initial=start, disable=disable, unit="step", dynamic_ncols=True)


def _summarize(experiment: Experiment, workdir, state, times, wall_s) -> dict:
    config, task = experiment.config, experiment.task
    records = (
        read_metrics(workdir / "metrics.jsonl") if (workdir / "metrics.jsonl").exists() else []
    )
    evals = [r for r in records if any(k.startswith("eval_") for k in r)]
    trainable = lora.count(state.trainable)
    total = lora.count(task.params)
    checkpoint_dir = workdir / "checkpoints" / str(int(state.step))
    return {
        "mode": config.peft.mode,
        "mesh": dict(experiment.mesh.shape),
        "processes": jax.process_count(),
        "steps": int(state.step),
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100.0 * trainable / total,
        "optimizer_state_bytes": lora.nbytes(state.opt_state),
        "checkpoint_bytes": _dir_bytes(checkpoint_dir),
        "median_step_s": statistics.median(times[1:] or times) if times else None,
        "eval_before": {k: v for k, v in evals[0].items() if k != "step"} if evals else {},
        "eval_after": {k: v for k, v in evals[-1].items() if k != "step"} if evals else {},
        "wall_s": wall_s,
        # A quantized base (model.quantize): method, kernels, their relative errors, storage.
        "quantization": experiment.quantization,
    }


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def _write_reports(config, workdir: Path, summary: dict) -> None:
    records = read_metrics(workdir / "metrics.jsonl")
    plots = []
    if config.logging.plots:
        plot_dir = workdir / "plots"
        shutil.rmtree(plot_dir, ignore_errors=True)
        plot_dir.mkdir()
        keys_to_plot = [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]
        plots = plot_curves(keys_to_plot, plot_dir)
    lines = [
        f"# Run summary: {config.model.preset or config.model.path}, {summary['mode']}",
        "",
        "| | |",
        "|---|---|",
        f"| steps | {summary['steps']} |",
        f"| trainable params | {summary['trainable_params']:,} of {summary['total_params']:,} "
        f"({summary['trainable_percent']:.2f}%) |",
        f"| optimizer state | {summary['optimizer_state_bytes']:,} bytes |",
        f"| checkpoint size | {summary['checkpoint_bytes']:,} bytes |",
        f"| median step time | {summary['median_step_s'] or 0:.4f} s |",
        f"| wall time | {summary['wall_s']:.1f} s |",
    ]
    quantized = summary.get("quantization")
    if quantized:
        lines.append(
            f"| quantized base | {quantized['method']}, {quantized['kernels']} kernels at "
            f"{quantized['bytes_per_param']:.4g} bytes/param, relative error max "
            f"{quantized['relative_error_max']:.4g}, mean {quantized['relative_error_mean']:.4g} |"
        )
    for key in summary["eval_after"]:
        before = summary["eval_before"].get(key, float("nan"))
        lines.append(
            f"| {key} (before → after) | {before:.4f} → {summary['eval_after'][key]:.4f} |"
        )
    samples_path = workdir / "samples.json"
    if samples_path.exists():
        lines += ["", "## Samples (greedy)", ""]
        for when, completions in json.loads(samples_path.read_text()).items():
            lines += [f"**{when}**", ""]
            lines += [f"- `{p!r}` → `{c!r}`" for p, c in completions.items()]
            lines.append("")
    lines += ["", *[f"![{Path(p).stem}](plots/{Path(p).name})" for p in plots], ""]
    (workdir / "summary.md").write_text("\n".join(lines))
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2, default=_jsonable) + "\n")


def _jsonable(value: Any):
    if isinstance(value, np.generic | jnp.ndarray):
        return value.item()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")
