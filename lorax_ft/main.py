"""The `lorax-ft` command: train, eval, generate and export from one experiment config.

lorax-ft train --config=configs/bbc_minilm.py:lora --workdir=/tmp/bbc --config.peft.rank=16
lorax-ft eval --config=configs/bbc_minilm.py:lora --workdir=/tmp/bbc
lorax-ft generate --config=configs/smollm2_chat.py --workdir=/tmp/chat --prompt="Hi!"
lorax-ft export --config=configs/bbc_minilm.py:lora --workdir=/tmp/bbc --export_dir=/tmp/hf
lorax-ft plan --config=configs/bbc_minilm.py:lora --simulate_devices=16 --config.mesh.fsdp=-1 ...

Multi-host: every host runs the same `train` (or `eval`) command, adding
`--coordinator_address=HOST0:PORT --num_processes=N --process_id=I` unless the cluster
environment says so already (Cloud TPU, SLURM, Open MPI, Kubernetes).
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:arg].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and reports.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "generate: a prompt (repeat for a batch).")
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "export: the directory to write.")
_ADAPTERS_ONLY = flags.DEFINE_bool(
    "adapters_only", False, "export: write the LoRA adapters alone (safetensors), not the model."
)
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
        raise app.UsageError(f"usage: lorax-ft {{{','.join(COMMANDS)}}} --config=... --workdir=...")
    command = argv[1]
    if _WORKDIR.value is None and command != "plan":
        raise app.UsageError("--workdir is required")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    multi_host = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if command not in MULTI_HOST_COMMANDS and any(v is not None for v in multi_host):
        raise app.UsageError(f"{command} runs in one process; multi-host flags are for train/eval")
    if _SIMULATE_DEVICES.value is not None:
        if command != "plan" or _SIMULATE_DEVICES.value < 1:
            raise app.UsageError("--simulate_devices=N (N >= 1) is for plan")
        # Before JAX initialises its backends: N CPU devices stand in for the accelerators.
        import jax

        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", _SIMULATE_DEVICES.value)
    from lorax_ft import commands  # heavy imports only after the flags are known to be fine

    config, workdir = _CONFIG.value, _WORKDIR.value
    try:
        if command in MULTI_HOST_COMMANDS:
            from lorax_ft import distributed

            distributed.initialize(*multi_host)
        if command == "plan":
            from lorax_ft.plan import format_plan, plan

            summary = plan(config)
            print(format_plan(summary))
        elif command == "train":
            from lorax_ft.trainer import train_and_evaluate

            summary = train_and_evaluate(config, workdir)
        elif command == "eval":
            summary = commands.evaluate_checkpoint(config, workdir)
        elif command == "generate":
            summary = commands.generate(config, workdir, _PROMPT.value)
        else:
            if not _EXPORT_DIR.value:
                raise app.UsageError("export needs --export_dir")
            summary = commands.export(config, workdir, _EXPORT_DIR.value, _ADAPTERS_ONLY.value)
    except commands.USER_ERRORS as e:
        # Bad input is one clear line, not a traceback.
        print(f"lorax-ft {command}: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(summary, default=str))


def _parse_flags(argv):
    """absl's flag parsing, with every bad flag or override reported as one line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        message = str(e)
    except AttributeError as e:  # ml_collections: an override names a key the config lacks
        detail = str(e).replace("\\n", " ").replace("\\'", "").strip("'\"")
        message = f"unknown config key in an override: {detail}"
    print(f"lorax-ft: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(2)


def run() -> None:
    """Console-script entry point."""
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
