"""The `lorax-ft` command: train, eval, generate and export from one experiment config.

lorax-ft train --config=configs/bbc_minilm.py:lora --workdir=/tmp/bbc --config.peft.rank=16
lorax-ft train --config=configs/bbc_minilm.py:lora --workdir=/tmp/bbc_q --config.model.quantize=nf4
lorax-ft eval --config=configs/bbc_minilm.py:lora --workdir=/tmp/bbc
lorax-ft eval --config=configs/bbc_minilm.py:lora --adapters=/tmp/adapter,none
lorax-ft generate --config=configs/smollm2_shakespeare.py --adapters=/tmp/a,/tmp/b --combine=cat \
    --weights=0.5,0.5 --prompt="To be"
lorax-ft generate --config=configs/smollm2_chatterbot.py --workdir=/tmp/chat --prompt="Hi!"
lorax-ft export --config=configs/bbc_minilm.py:lora --workdir=/tmp/bbc --export_dir=/tmp/adapter
lorax-ft export --config=configs/bbc_minilm.py:lora --workdir=/tmp/bbc --export_dir=/tmp/hf --merged
lorax-ft plan --config=configs/bbc_minilm.py:lora --simulate_devices=16 --config.mesh.fsdp=-1 ...

`--config=FILE[:arg]` is any Python file with `get_config(arg)`, relative to the current
directory; it may import helpers that sit next to it. `--config.KEY=VALUE` overrides a key.

Multi-host: every host runs the same `train` (or `eval`) command, adding
`--coordinator_address=HOST0:PORT --num_processes=N --process_id=I` unless the cluster
environment says so already (Cloud TPU, SLURM, Open MPI, Kubernetes).
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from lorax_ft.errors import UserError
from lorax_ft.run.config_file import load_config_file
from lorax_ft.run.export_target import check_creatable

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and reports.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "generate: a prompt (repeat for a batch).")
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "export: the directory to write.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "export: replace an earlier export of lorax-ft at --export_dir."
)
_MERGED = flags.DEFINE_bool(
    "merged",
    False,
    "export: write the merged Hugging Face model, not the PEFT adapter directory (full "
    "fine-tuning always writes the model).",
)
_ADAPTERS = flags.DEFINE_list(
    "adapters",
    [],
    "eval/generate: PEFT adapter directories (none: the base model) to use instead of the "
    "workdir's checkpoint, each reported on its own.",
)
_COMBINE = flags.DEFINE_enum(
    "combine",
    None,
    ["linear", "cat", "svd"],
    "eval/generate: one adapter from the --adapters, weighted by --weights (PEFT's "
    "add_weighted_adapter: cat exact, svd truncated to --combine_rank, linear approximate).",
)
_WEIGHTS = flags.DEFINE_list("weights", [], "--combine: one weight per adapter directory.")
_COMBINE_RANK = flags.DEFINE_integer("combine_rank", None, "--combine=svd: the rank kept.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "train/eval on several hosts: HOST:PORT of process 0."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "train/eval: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "train/eval: this process, in [0, N).")
_SIMULATE_DEVICES = flags.DEFINE_integer(
    "simulate_devices", None, "plan: plan for this many simulated CPU devices."
)
COMMANDS = ("train", "eval", "generate", "export", "plan")
MULTI_HOST_COMMANDS = ("train", "eval")


def main(argv) -> None:
    if len(argv) != 2 or argv[1] not in COMMANDS:
        _usage_error(f"usage: lorax-ft {{{','.join(COMMANDS)}}} --config=FILE[:arg] --workdir=DIR")
    command = argv[1]
    if "config" not in flags.FLAGS:
        _usage_error("--config=FILE[:arg] is required, e.g. --config=configs/bbc_minilm.py:lora")
    if _ADAPTERS.value and command not in ("eval", "generate"):
        _usage_error("--adapters=DIR[,DIR...] is for eval and generate")
    combination = _combination()
    if not _WORKDIR.value and command != "plan" and not _ADAPTERS.value:
        _usage_error("--workdir=DIR is required")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    multi_host = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if command not in MULTI_HOST_COMMANDS and any(v is not None for v in multi_host):
        _usage_error(f"{command} runs in one process; multi-host flags are for train/eval")
    if _SIMULATE_DEVICES.value is not None:
        if command != "plan" or _SIMULATE_DEVICES.value < 1:
            _usage_error("--simulate_devices=N (N >= 1) is for plan")
        # Before JAX initialises its backends: N CPU devices stand in for the accelerators.
        import jax

        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", _SIMULATE_DEVICES.value)
    from lorax_ft.run import commands  # heavy imports only after the flags are known to be fine

    config, workdir = flags.FLAGS.config, _WORKDIR.value
    try:
        if command != "plan" and not _ADAPTERS.value:
            check_workdir(workdir, writing=command == "train")
        if command in MULTI_HOST_COMMANDS:
            from lorax_ft.parallel import distributed

            distributed.initialize(*multi_host)
        if command == "plan":
            from lorax_ft.parallel.plan import format_plan, plan

            summary = plan(config)
            print(format_plan(summary))
        elif command == "train":
            from lorax_ft.run.trainer import train_and_evaluate

            summary = train_and_evaluate(config, workdir)
        elif command == "eval" and _ADAPTERS.value:
            summary = commands.evaluate_adapters(config, _ADAPTERS.value, combination)
        elif command == "eval":
            summary = commands.evaluate_checkpoint(config, workdir)
        elif command == "generate":
            summary = commands.generate(
                config, workdir, _PROMPT.value, _ADAPTERS.value, combination
            )
        else:
            if not _EXPORT_DIR.value:
                raise UserError("export needs --export_dir=DIR")
            summary = commands.export(
                config, workdir, _EXPORT_DIR.value, _MERGED.value, _OVERWRITE.value
            )
    except commands.USER_ERRORS as e:
        # Bad input is one clear line, not a traceback.
        print(f"lorax-ft {command}: {e}", file=sys.stderr)
        sys.exit(2)
    if command == "export" and "quantization" in summary:
        from lorax_ft.run.quantized_base import statement

        # Never silent: adapters trained on a quantized base carry its error.
        print(f"lorax-ft export: {statement(summary['quantization'])}")
    print(json.dumps(summary, default=str))


def _combination() -> tuple | None:
    """(method, weights, rank) of --combine, checked; None without it."""
    if _COMBINE.value is None:
        if _WEIGHTS.value or _COMBINE_RANK.value is not None:
            _usage_error("--weights and --combine_rank go with --combine=linear|cat|svd")
        return None
    if not _ADAPTERS.value:
        _usage_error("--combine combines the adapter directories of --adapters=DIR,DIR,...")
    try:
        weights = [float(w) for w in _WEIGHTS.value]
    except ValueError:
        _usage_error(f"--weights={','.join(_WEIGHTS.value)}: give one number per adapter")
    if _COMBINE_RANK.value is not None and _COMBINE.value != "svd":
        _usage_error("--combine_rank is the rank --combine=svd keeps")
    return _COMBINE.value, weights, _COMBINE_RANK.value


def check_workdir(workdir: str, *, writing: bool) -> None:
    """A workdir `train` can write to, or (`writing=False`) one that a run has written."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"--workdir={workdir} is a file, not a directory; give a directory")
    if not writing:
        if not os.path.isdir(workdir):
            raise UserError(f"--workdir={workdir} does not exist: train there first")
        return
    check_creatable(workdir, f"--workdir={workdir}")


def _usage_error(message: str):
    print(f"lorax-ft: {message}", file=sys.stderr)
    sys.exit(2)


def _config_flag_value(argv: list[str]) -> tuple[str | None, list[str]]:
    """The value of `--config` (`--config=X` or `--config X`) and argv without it."""
    for index, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1], argv[:index] + argv[index + 1 :]
        if arg == "--config" and index + 1 < len(argv):
            return argv[index + 1], argv[:index] + argv[index + 2 :]
    return None, argv


def _parse_flags(argv):
    """absl's flag parsing, with every bad flag, config file or override reported as one line.

    The config file is loaded here (`lorax_ft.run.config_file`), so that it may import helpers next
    to it from any directory; ml_collections then applies the `--config.KEY=VALUE` overrides.
    """
    value, argv = _config_flag_value(list(argv))
    try:
        if value is not None:
            config = load_config_file(value)
            # sys_argv: the overrides to define are read from the arguments, not sys.argv.
            config_flags.DEFINE_config_dict("config", config, sys_argv=argv)
        return flags.FLAGS(argv)
    except UserError as e:
        message = str(e)
    except flags.Error as e:
        message = str(e)
    except (AttributeError, KeyError) as e:  # ml_collections: an override names a missing key
        detail = str(e).replace("\\n", " ").replace("\\'", "").strip("'\"")
        message = f"unknown config key in an override: {detail}"
    print(f"lorax-ft: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(2)


def run() -> None:
    """Console-script entry point."""
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
