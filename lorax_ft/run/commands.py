"""What `lorax-ft eval`, `generate` and `export` do with a trained workdir or adapter directories."""

from __future__ import annotations

import dataclasses
import json
import os

import jax

from lorax_ft import quant
from lorax_ft.errors import UserError
from lorax_ft.quant import is_quantized
from lorax_ft.run.checkpointing import Checkpointer
from lorax_ft.run.completions import generate_texts, merged_params
from lorax_ft.run.export_target import check_target, replace_directory
from lorax_ft.run.quantized_base import statement
from lorax_ft.run.resume import resume_config
from lorax_ft.transform import paths
from lorax_ft.transform.partition import split, variable_labels

USER_ERRORS = (UserError, FileNotFoundError, ValueError)


def restore(config, workdir):
    """The experiment, on this run's mesh, with the newest checkpoint of `workdir` restored.

    The checkpoint may come from another mesh or number of processes: it is read into the
    shardings of this one. A damaged newest checkpoint is skipped with a warning (the next
    intact one is used, and no checkpoint is moved); no lock is taken.
    """
    from lorax_ft.run import config as config_lib
    from lorax_ft.run.experiment import build

    config_lib.validate(config, jax.device_count(), jax.process_count())  # a bad key first
    checkpoints = Checkpointer(os.path.join(workdir, "checkpoints"), use_async=False)
    try:
        if checkpoints.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints: train first")
        experiment = build(config)
        state, _ = checkpoints.restore(
            experiment.state,
            base=experiment.base_fingerprint,
            config=resume_config(experiment.config),
        )
    finally:
        checkpoints.close()
    return dataclasses.replace(experiment, state=state)


def evaluate_checkpoint(config, workdir) -> dict:
    from lorax_ft.run.trainer import evaluate

    experiment = restore(config, workdir)
    state = experiment.state
    return {"step": int(state.step), **evaluate(experiment, state)}


def evaluate_adapters(config, directories, combination=None) -> dict:
    """Eval metrics of the base model with each PEFT adapter directory (`none`: no adapter),
    or (`combination`, see `combined_state`) with their weighted combination."""
    from lorax_ft.run.trainer import evaluate

    experiment = _check_adapters_then_build(config, directories, combination)
    return {
        "adapters": {
            name: {**evaluate(experiment, state), **extra}
            for name, state, extra in _states(experiment, directories, combination)
        }
    }


def _states(experiment, directories, combination):
    """`(name, state, extra report)` of each adapter, or of their one combination."""
    if combination is None:
        for name, state in adapter_states(experiment, directories):
            yield name, state, {}
        return
    yield combined_state(experiment, directories, *combination)


def combined_state(experiment, directories, method: str, weights, rank=None):
    """`(name, state, report)`: the base with PEFT's `add_weighted_adapter` of the adapters of
    `directories` (`lorax_ft.transform.combine`) merged into its kernels.

    The report holds the combination's largest relative error against the exact weighted sum
    of the deltas (0 for `cat`; `svd` truncates to `rank`; `linear` adds cross terms). The
    adapters must agree on every leaf they train fully (a classifier head, say): only their
    LoRA factors are combined.
    """
    from lorax_ft.transform import lora
    from lorax_ft.transform.combine import combine_adapters

    if len(weights) != len(directories) or "none" in directories:
        raise UserError(
            f"--combine needs one weight per adapter directory (--weights), and no 'none': "
            f"got {len(directories)} directories and {len(weights)} weights"
        )
    states = [state for _, state in adapter_states(experiment, directories)]
    first = paths.flatten(jax.device_get(states[0].trainable["params"]))
    for directory, state in zip(directories[1:], states[1:], strict=True):
        other = paths.flatten(jax.device_get(state.trainable["params"]))
        differ = [p for p, x in first.items() if not (x == other[p]).all()]
        if differ:
            raise UserError(
                f"--combine: {directory} trains {differ[0]} to other values than "
                f"{directories[0]}; only adapters that share their fully trained leaves combine"
            )
    try:
        combined, report = combine_adapters(
            [s.variables["lora"] for s in states], weights, method, rank=rank
        )
    except ValueError as e:
        raise UserError(f"--combine={method}: {e}") from None
    variables = states[0].variables
    merged = lora.merge(variables["params"], combined)
    fresh = experiment.state.variables["lora"]  # B = 0: nothing added on top of the merge
    labels = _labels(experiment, fresh)
    frozen, trainable = split({"params": merged, "lora": fresh}, labels)
    state = states[0].replace(frozen=frozen, trainable=trainable)
    parts = (f"{w:g}*{d}" for d, w in zip(directories, weights, strict=True))
    name = f"{method}({', '.join(parts)})"
    error = max((float(e.max()) for e in report.values()), default=0.0)
    return name, jax.device_put(state, experiment.shardings), {"combination_error": error}


def adapter_states(experiment, directories):
    """`(directory, state)` for each PEFT adapter directory, its values in the experiment's
    step-0 state (each must fit the config, see `init_from`); `none` is the fresh state, whose
    adapters change nothing (B = 0, or DoRA's magnitude ‖W‖)."""
    from lorax_ft.run.init_from import initial_values

    fresh = experiment.state
    variables = fresh.variables
    labels = _labels(experiment, variables["lora"])
    for directory in directories:
        if directory == "none":
            yield directory, fresh
            continue
        start = initial_values(
            directory, experiment.task.module, variables["params"], variables["lora"],
            experiment.spec, where=f"--adapters: {directory}",
        )  # fmt: skip
        params, adapters = start(variables["params"], variables["lora"])
        frozen, trainable = split({"params": params, "lora": adapters}, labels)
        state = fresh.replace(frozen=frozen, trainable=trainable)
        yield directory, jax.device_put(state, experiment.shardings)


def _labels(experiment, adapters):
    return variable_labels(experiment.task.params, adapters, experiment.spec)


def _check_adapters_then_build(config, directories, combination=None):
    from lorax_ft.run.experiment import build

    if combination is not None and config.model.quantize != "none":
        # Before the model is loaded: nothing else could be done with it.
        raise UserError(
            f"--combine merges the combined adapter into the base kernels, which "
            f"model.quantize={config.model.quantize!r} keeps quantized; combine on the float "
            "base (--config.model.quantize=none), or evaluate each adapter on its own"
        )
    for directory in directories:  # before the model is loaded
        if directory != "none" and not os.path.isfile(
            os.path.join(directory, "adapter_config.json")
        ):
            raise UserError(
                f"--adapters: {directory} is not a PEFT adapter directory (no "
                "adapter_config.json); give adapter directories or none (the base)"
            )
    return build(config)


def generate(config, workdir, prompts, adapters=(), combination=None) -> dict:
    """Greedy completions of `prompts` by the newest checkpoint of `workdir`, or (`adapters`)
    by the base model with each PEFT adapter directory, or with their `combination`."""
    from lorax_ft.run.trainer import generation_prompt

    if config.model.task != "causal_lm":
        raise ValueError(f"generate needs model.task='causal_lm', not {config.model.task!r}")
    if any(not p.strip() for p in prompts):  # checked before the model is loaded
        raise UserError(f"--prompt={next(p for p in prompts if not p.strip())!r} has no text")
    prompts = prompts or ["Hello"]
    rendered = [generation_prompt(config.data, p) for p in prompts]  # the chat template, if any

    def complete(task, state):
        texts = generate_texts(task, merged_params(state.variables), rendered,
                               config.train.max_new_tokens)  # fmt: skip
        return dict(zip(prompts, texts, strict=True))

    if adapters:
        experiment = _check_adapters_then_build(config, adapters, combination)
        states = _states(experiment, adapters, combination)
        return {"adapters": {name: complete(experiment.task, s) for name, s, _ in states}}
    experiment = restore(config, workdir)
    return {
        "step": int(experiment.state.step),
        "samples": complete(experiment.task, experiment.state),
    }


def export(config, workdir, export_dir, merged: bool = False, overwrite: bool = False) -> dict:
    """The trained adapters as a PEFT adapter directory, or the merged model as a Hugging Face
    directory (`merged`, and always for full fine-tuning), written atomically.

    The adapter directory is what `peft.PeftModel.from_pretrained(base, export_dir)` loads
    (`adapter_config.json`, `adapter_model.safetensors`, leaves trained fully as
    `modules_to_save`; a mean- or CLS-pooled classifier's head beside them, see
    `lorax_ft.models.export`), and what `peft.init_from` and `--adapters` start from. `export_dir` is checked
    first (see `export_target.check_target`): a refused target costs no restore or merge, and
    nothing that is not an earlier export is ever replaced.

    A run on a quantized base (`model.quantize`) says so, never silently: the merged model is
    the dequantized base plus the adapters, in the run's param dtype; an adapter directory
    applies to the float base, which differs from the one it was trained on by the
    quantization error. Both exports hold `quantization.json` (the method and the relative
    errors of the quantized kernels, `quantized_base.report`), and the summary returned holds
    it under "quantization".
    """
    from lorax_ft.models.export import save_pretrained
    from lorax_ft.models.peft_format import save_peft

    check_target(export_dir, workdir, overwrite)
    experiment = restore(config, workdir)
    task, state = experiment.task, experiment.state
    quantization = experiment.quantization
    if merged or config.peft.mode == "full":
        params = jax.device_get(merged_params(state.variables))  # a quantized base dequantized

        def write_files(directory):
            save_pretrained(directory, task.module, params, tokenizer=task.tokenizer)

        written = "merged model" if config.peft.mode == "lora" else "model"
        if quantization is not None:
            written += f" (the {config.model.quantize} base dequantized)"
    else:
        variables = jax.device_get(state.variables)
        trained = paths.flatten(jax.device_get(state.trainable["params"]))
        base, adapters = on_original_base(experiment, variables["params"], variables["lora"])
        base = _dequantized_on_host(base)  # shapes and frozen leaves of modules saved whole

        def write_files(directory):
            save_peft(
                directory, task.module, base, adapters, trained,
                base_model_name_or_path=base_model_name(config.model),
            )  # fmt: skip

        written = "peft adapters"
    summary = {"step": int(state.step), "wrote": written}

    def write(directory):
        write_files(directory)
        if quantization is not None:
            with open(os.path.join(directory, QUANTIZATION_FILE), "w") as f:
                json.dump({**quantization, "statement": statement(quantization)}, f, indent=2)

    replace_directory(export_dir, write, record=summary)
    if quantization is not None:
        summary["quantization"] = quantization
    return {**summary, "export_dir": export_dir}


QUANTIZATION_FILE = "quantization.json"
"""What an export of a run on a quantized base writes beside the weights: `quantized_base.report`
and its one-line statement."""


def _dequantized_on_host(params):
    """Host params with each quantized kernel dequantized on the CPU (no accelerator memory)."""
    if not any(is_quantized(x) for x in paths.flatten(params).values()):
        return params
    with jax.default_device(jax.devices("cpu")[0]):
        return jax.device_get(quant.dequantize(params))


def on_original_base(experiment, params, adapters):
    """`(base, adapters)` for the base model as its source holds it.

    A run with PiSSA/OLoRA inits trains on residual kernels W − s·A0·B0; its adapters are
    converted to rank-2r LoRA adapters on W (PEFT's conversion, `inits.residual_to_lora`), from
    A0, B0 recomputed from the reloaded base as the run computed them. Other runs are returned
    as they are.
    """
    from lorax_ft.run import experiment as experiment_lib
    from lorax_ft.run import tasks
    from lorax_ft.transform import inits, lora
    from lorax_ft.transform.factored import infer_layouts

    config, spec, task = experiment.config, experiment.spec, experiment.task
    changed = [p for p, a in spec.lora_targets(params).items() if a.changes_base]
    if not changed:
        return params, adapters
    num_labels = experiment_lib.num_labels_of(config)
    original = jax.device_get(tasks.build(config, num_labels).params)
    layouts = infer_layouts(task.module, original, *task.example_inputs)
    _, initial = lora.initialize(experiment_lib.adapter_key(config), original, spec, layouts)
    first, converted = lora.factors_by_path(initial), lora.factors_by_path(adapters)
    for path in changed:
        a, b = inits.residual_to_lora(first[path].a, first[path].b, converted[path].a,
                                      converted[path].b)  # fmt: skip
        converted[path] = converted[path].replace(a=a, b=b)
    return original, paths.unflatten(converted)


def base_model_name(model_config) -> str:
    """The base model as an adapter's `base_model_name_or_path`: a preset's Hugging Face name,
    or the absolute path of `model.path`."""
    from lorax_ft.models.presets import PRESETS

    if model_config.preset:
        return PRESETS[model_config.preset].hub_id
    return os.path.abspath(model_config.path)
