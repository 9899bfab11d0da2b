"""What `lorax-ft eval`, `generate` and `export` do with a trained workdir."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
from safetensors.numpy import save_file

from lorax_ft.errors import UserError
from lorax_ft.run.checkpointing import Checkpointer
from lorax_ft.run.completions import generate_texts, merged_params
from lorax_ft.run.export_target import check_target, replace_directory
from lorax_ft.run.resume import resume_config
from lorax_ft.transform import lora

USER_ERRORS = (UserError, FileNotFoundError, ValueError)


def restore(config, workdir):
    """The experiment, on this run's mesh, with the newest checkpoint of `workdir` restored.

    The checkpoint may come from another mesh or number of processes: it is read into the
    shardings of this one. A damaged newest checkpoint is skipped with a warning (the next
    intact one is used, and no checkpoint is moved); no lock is taken.
    """
    from lorax_ft.run.experiment import build

    experiment = build(config)
    checkpoints = Checkpointer(os.path.join(workdir, "checkpoints"), use_async=False)
    if checkpoints.latest_step() is None:
        raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints: train first")
    state, _ = checkpoints.restore(
        experiment.state,
        base=experiment.base_fingerprint,
        config=resume_config(experiment.config),
    )
    checkpoints.close()
    return dataclasses.replace(experiment, state=state)


def evaluate_checkpoint(config, workdir) -> dict:
    from lorax_ft.run.trainer import evaluate

    experiment = restore(config, workdir)
    state = experiment.state
    return {"step": int(state.step), **evaluate(experiment, state)}


def generate(config, workdir, prompts) -> dict:
    from lorax_ft.run.trainer import generation_prompt

    if config.model.task != "causal_lm":
        raise ValueError(f"generate needs model.task='causal_lm', not {config.model.task!r}")
    if any(not p.strip() for p in prompts):  # checked before the model is loaded
        raise UserError(f"--prompt={next(p for p in prompts if not p.strip())!r} has no text")
    experiment = restore(config, workdir)
    task, state = experiment.task, experiment.state
    params = merged_params(state.variables)
    prompts = prompts or ["Hello"]
    rendered = [generation_prompt(config.data, p) for p in prompts]  # the chat template, if any
    texts = generate_texts(task, params, rendered, config.train.max_new_tokens)
    return {"step": int(state.step), "samples": dict(zip(prompts, texts, strict=True))}


def export(config, workdir, export_dir, adapters_only: bool, overwrite: bool = False) -> dict:
    """The merged model as a Hugging Face directory, or the adapters alone, written atomically.

    `export_dir` is checked first (see `export_target.check_target`): a refused target costs no
    restore or merge, and nothing that is not an earlier export is ever replaced.
    """
    from lorax_ft.models.export import save_pretrained

    check_target(export_dir, workdir, overwrite)
    experiment = restore(config, workdir)
    task, state = experiment.task, experiment.state
    if adapters_only:
        factors = lora.factors_by_path(jax.device_get(state.variables["lora"]))

        def write(directory):
            tensors = {}
            for path, f in factors.items():
                tensors[f"{path}/lora_a"] = np.asarray(f.a)
                tensors[f"{path}/lora_b"] = np.asarray(f.b)
            trained = {
                p: np.asarray(x) for p, x in lora.paths.flatten(state.trainable["params"]).items()
            }
            save_file({**tensors, **trained}, os.path.join(directory, "adapters.safetensors"))
            meta = {p: {"scale": f.scale, "rank": f.rank} for p, f in factors.items()}
            with open(os.path.join(directory, "adapter_config.json"), "w") as fh:
                json.dump({"adapters": meta, "trained_fully": sorted(trained)}, fh, indent=2)

    else:
        merged = jax.device_get(merged_params(state.variables))

        def write(directory):
            save_pretrained(directory, task.module, merged, tokenizer=task.tokenizer)

    summary = {"step": int(state.step), "adapters_only": adapters_only}
    replace_directory(export_dir, write, record=summary)
    return {**summary, "export_dir": export_dir}
