"""Bad input, the way a hostile user types it: every case exits 2 with one line, changing nothing.

Each case runs `lorax-ft` (forked from a preloaded server, see tests/cli.py) against a workdir
that holds a finished tiny run, and asserts: exit code 2; stderr is exactly one line, starting
`lorax-ft`, naming the key, file or path (the `expect` fragments) and no traceback; and every
file of the workdir (and of an export target) is byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from tests.cli import ROOT, forked

TINY = "configs/bbc_minilm.py:lora,tiny"
CHAT = "configs/smollm2_chatterbot.py:lora,tiny"


def tree_digest(path: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `path` (or of `path` itself)."""
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    if not path.exists():
        return {}
    return {
        str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.rglob("*"))
        if f.is_file()
    }


def assert_refused(result, *expect: str) -> None:
    lines = result.stderr.strip().splitlines()
    shown = result.stderr[-1500:]
    assert result.returncode == 2, (result.returncode, shown)
    assert "Traceback" not in result.stderr, shown
    assert len(lines) == 1 and lines[0].startswith("lorax-ft"), shown[:1500]
    for fragment in expect:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A finished tiny run: its checkpoints, metrics and reports must survive every bad input."""
    path = tmp_path_factory.mktemp("run") / "w"
    result = forked("train", f"--config={TINY}", f"--workdir={path}")
    assert result.returncode == 0, result.stderr[-3000:]
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad files a user might point the config at."""
    d = tmp_path_factory.mktemp("files")
    (d / "syntax.py").write_text("def get_config(arg=None)\n    return 1\n")
    (d / "no_get_config.py").write_text("CONFIG = {}\n")
    (d / "returns_none.py").write_text("def get_config(arg=None):\n    pass\n")
    (d / "returns_dict.py").write_text("def get_config(arg=None):\n    return {'train': {}}\n")
    (d / "raises.py").write_text("def get_config(arg=None):\n    return undefined_name\n")
    (d / "bad_import.py").write_text("import no_such_module_anywhere\n")
    (d / "a_dir.py").mkdir()
    (d / "unterminated.csv").write_text(
        "text,label\n"
        + "".join(f"row {i},a\n" for i in range(20))
        + '"open quote,b\n'
        + "".join(f"row {i},b\n" for i in range(20))
    )
    mixed = [f'{{"text": "t{i}", "label": "sport"}}' for i in range(10)] + [
        '{"text": "t", "label": 3}'
    ]
    (d / "mixed_labels.jsonl").write_text("\n".join(mixed) + "\n")
    (d / "not_json.jsonl").write_text('{"text": "a", "label": "x"}\n{not json\n')
    (d / "no_label.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b"}\n')
    (d / "empty.jsonl").write_text("")
    (d / "bad_adapter").mkdir()  # a PEFT directory of another method
    (d / "bad_adapter" / "adapter_config.json").write_text('{"peft_type": "PREFIX_TUNING"}')
    (d / "bad_adapter" / "adapter_model.safetensors").write_bytes(b"")
    (d / "gaps.jsonl").write_text(
        "".join(f'{{"text": "t{i}", "label": {5 * (i % 2)}}}\n' for i in range(40))
    )
    (d / "a_file").write_text("not a directory\n")
    # MiniLM's own config.json beside damaged weights: truncated, garbage, empty.
    from lorax_ft.models.presets import preset_path

    model = Path(preset_path("all-minilm-l6-v2"))
    weights = (model / "model.safetensors").read_bytes()
    for name, data in [
        ("truncated", weights[: len(weights) // 2]),
        ("garbage", b"\x13\x37" * 4096),
        ("empty", b""),
    ]:
        (d / f"model_{name}").mkdir()
        shutil.copy(model / "config.json", d / f"model_{name}" / "config.json")
        (d / f"model_{name}" / "model.safetensors").write_bytes(data)
    return d


def override(key_value: str) -> tuple[str, ...]:
    return ("train", f"--config={TINY}", f"--config.{key_value}")


def data_file(name: str) -> tuple[str, ...]:
    return (
        "--config.data.name=",
        "--config.data.kind=classification",
        f"--config.data.path=__FILES__/{name}",
    )


# (id, arguments after the command, fragments the one line must contain). `__WORKDIR__` and
# `__FILES__` are replaced by the fixtures' paths; `--workdir=__WORKDIR__` is added unless given.
# fmt: off
CASES = [
    # --- the command line itself
    ("no_command", ("--config=" + TINY,), ["usage: lorax-ft"]),
    ("unknown_command", ("fit", f"--config={TINY}"), ["usage: lorax-ft"]),
    ("two_commands", ("train", "eval", f"--config={TINY}"), ["usage: lorax-ft"]),
    ("no_config", ("train",), ["--config=FILE"]),
    ("no_workdir", ("train", f"--config={TINY}", "--workdir="), ["--workdir"]),
    ("unknown_flag", ("train", f"--config={TINY}", "--epochs=3"), ["epochs"]),
    ("simulate_devices_on_train", ("train", f"--config={TINY}", "--simulate_devices=4"),
     ["--simulate_devices"]),
    ("simulate_zero_devices", ("plan", f"--config={TINY}", "--simulate_devices=0"),
     ["--simulate_devices"]),
    ("multi_host_generate", ("generate", f"--config={CHAT}", "--num_processes=2"),
     ["multi-host flags are for train/eval"]),
    ("num_processes_alone", ("train", f"--config={TINY}", "--num_processes=2"),
     ["missing --coordinator_address"]),
    ("process_id_out_of_range", ("train", f"--config={TINY}", "--num_processes=2",
     "--process_id=2", "--coordinator_address=127.0.0.1:1"), ["--process_id=2"]),
    ("export_without_export_dir", ("export", f"--config={TINY}"), ["--export_dir"]),
    ("integer_flag_not_integer", ("train", f"--config={TINY}", "--num_processes=two"),
     ["num_processes"]),
    # --- the config file
    ("config_missing", ("train", "--config=configs/nope.py"), ["configs/nope.py", "does not exist"]),
    ("config_empty_path", ("train", "--config="), ["--config"]),
    ("config_is_a_directory", ("train", "--config=__FILES__/a_dir.py"), ["is a directory"]),
    ("config_syntax_error", ("train", "--config=__FILES__/syntax.py"), ["syntax error", ":1"]),
    ("config_without_get_config", ("train", "--config=__FILES__/no_get_config.py"),
     ["no get_config"]),
    ("get_config_returns_none", ("train", "--config=__FILES__/returns_none.py"),
     ["returned NoneType", "ConfigDict"]),
    ("get_config_returns_dict", ("train", "--config=__FILES__/returns_dict.py"),
     ["returned dict"]),
    ("get_config_raises", ("train", "--config=__FILES__/raises.py"),
     ["NameError", "raises.py:2"]),
    ("config_import_fails", ("train", "--config=__FILES__/bad_import.py"),
     ["ModuleNotFoundError", "no_such_module_anywhere"]),
    ("config_bad_variant", ("train", "--config=configs/bbc_minilm.py:huge"), ["lora|full|qlora[,tiny]"]),
    ("config_two_modes", ("train", "--config=configs/bbc_minilm.py:lora,full"),
     ["lora|full|qlora[,tiny]"]),
    # --- overrides: names and types
    ("unknown_key", override("train.batchsize=8"), ["batchsize"]),
    ("unknown_section", override("trainer.steps=8"), ["trainer"]),
    ("int_key_given_word", override("train.steps=many"), ["train.steps"]),
    ("int_key_given_float", override("train.steps=2.5"), ["train.steps"]),
    ("int_key_given_none", override("train.steps=None"), ["train.steps"]),
    ("float_key_given_word", override("schedule.lr=fast"), ["schedule.lr"]),
    ("bool_key_given_word", override("peft.rslora=maybe"), ["peft.rslora"]),
    ("section_overridden", override("train=3"), ["train"]),
    # --- choices
    ("task", override("model.task=regression"), ["model.task='regression'"]),
    ("dtype", override("model.dtype=float8"), ["model.dtype"]),
    ("param_dtype", override("model.param_dtype=int4"), ["model.param_dtype"]),
    ("pooling", override("model.classifier_pooling=max"), ["model.classifier_pooling='max'"]),
    ("remat", override("model.remat=some"), ["model.remat='some'"]),
    ("peft_mode", override("peft.mode=half"), ["peft.mode='half'"]),
    ("peft_init", override("peft.init=zeros"), ["peft.init='zeros'"]),
    ("optimizer", override("optim.name=adamax"), ["optim.name='adamax'"]),
    ("schedule", override("schedule.name=cyclic"), ["schedule.name='cyclic'"]),
    ("on_nonfinite", override("train.on_nonfinite=ignore"), ["train.on_nonfinite"]),
    ("chat_format", override("data.chat_format=llama2"), ["data.chat_format='llama2'"]),
    # --- ranges
    ("batch_size_0", override("train.batch_size=0"), ["train.batch_size=0", ">= 1"]),
    ("batch_size_negative", override("train.batch_size=-8"), ["train.batch_size=-8"]),
    ("eval_batch_size_0", override("train.eval_batch_size=0"), ["train.eval_batch_size=0"]),
    ("steps_0", override("train.steps=0"), ["train.steps=0"]),
    ("steps_negative", override("train.steps=-5"), ["train.steps=-5"]),
    ("grad_accum_0", override("train.grad_accum=0"), ["train.grad_accum=0"]),
    ("grad_accum_not_dividing", override("train.grad_accum=3"), ["train.grad_accum=3"]),
    ("log_every_0", override("train.log_every=0"), ["train.log_every=0"]),
    ("checkpoint_every_0", override("train.checkpoint_every=0"), ["train.checkpoint_every=0"]),
    ("eval_every_negative", override("train.eval_every=-2"), ["train.eval_every=-2"]),
    ("eval_steps_negative", override("train.eval_steps=-1"), ["train.eval_steps=-1"]),
    ("max_new_tokens_0", override("train.max_new_tokens=0"), ["train.max_new_tokens=0"]),
    ("keep_0", override("checkpoint.keep=0"), ["checkpoint.keep=0"]),
    ("max_length_0", override("data.max_length=0"), ["data.max_length=0"]),
    ("max_length_1", override("data.max_length=1"), ["data.max_length=1"]),
    ("max_length_over_positions", override("data.max_length=600"),
     ["data.max_length=600", "512"]),
    ("max_length_huge", override("data.max_length=100000"), ["data.max_length=100000"]),
    ("eval_fraction_0", override("data.eval_fraction=0.0"), ["data.eval_fraction=0.0"]),
    ("eval_fraction_1", override("data.eval_fraction=1.0"), ["data.eval_fraction=1.0"]),
    ("read_threads_0", override("data.read_threads=0"), ["data.read_threads=0"]),
    ("prefetch_negative", override("data.prefetch_batches=-1"), ["data.prefetch_batches=-1"]),
    ("rank_0", override("peft.rank=0"), ["peft.rank=0"]),
    ("rank_negative", override("peft.rank=-4"), ["peft.rank=-4"]),
    ("rank_too_large", override("peft.rank=100000"), ["100000"]),
    ("alpha_0", override("peft.alpha=0"), ["peft.alpha=0"]),
    ("alpha_negative", override("peft.alpha=-16"), ["peft.alpha=-16"]),
    ("dropout_1", override("peft.dropout=1.0"), ["peft.dropout=1.0"]),
    ("dropout_negative", override("peft.dropout=-0.1"), ["peft.dropout=-0.1"]),
    ("classifier_dropout_1", override("model.classifier_dropout=1.0"),
     ["model.classifier_dropout=1.0"]),
    ("b1_1", override("optim.b1=1.0"), ["optim.b1=1.0"]),
    ("b2_negative", override("optim.b2=-0.5"), ["optim.b2=-0.5"]),
    ("eps_negative", override("optim.eps=-1e-8"), ["optim.eps"]),
    ("weight_decay_negative", override("optim.weight_decay=-0.1"), ["optim.weight_decay=-0.1"]),
    ("momentum_over_1", override("optim.momentum=1.5"), ["optim.momentum=1.5"]),
    ("clip_norm_negative", override("optim.clip_norm=-1"), ["optim.clip_norm=-1"]),
    ("loraplus_0", override("optim.loraplus_lr_ratio=0"), ["optim.loraplus_lr_ratio=0"]),
    ("lr_mults_negative", override("optim.lr_mults=(('.*', -1.0),)"), ["optim.lr_mults[0]"]),
    ("wd_mults_not_pairs", override("optim.wd_mults=('.*',)"), ["optim.wd_mults[0]"]),
    ("lr_mults_match_nothing", override("optim.lr_mults=(('params/no_such/.*', 2.0),)"),
     ["optim.lr_mults", "'params/no_such/.*' matches no parameter"]),
    ("lr_0", override("schedule.lr=0"), ["schedule.lr=0"]),
    ("lr_negative", override("schedule.lr=-0.001"), ["schedule.lr=-0.001"]),
    ("lr_nan", override("schedule.lr=nan"), ["schedule.lr=nan"]),
    ("warmup_negative", override("schedule.warmup_steps=-1"), ["schedule.warmup_steps=-1"]),
    ("warmup_longer_than_run", override("schedule.warmup_steps=50"),
     ["schedule.warmup_steps=50", "4 steps"]),
    ("warmup_with_constant", ("train", f"--config={TINY}", "--config.schedule.name=constant"),
     ["schedule.warmup_steps=1", "constant"]),
    ("total_steps_negative", override("schedule.total_steps=-1"), ["schedule.total_steps=-1"]),
    ("end_lr_factor_2", override("schedule.end_lr_factor=2.0"), ["schedule.end_lr_factor=2.0"]),
    # --- model and data sources
    ("preset_and_path", override("model.path=configs"), ["exactly one of model.preset"]),
    ("neither_preset_nor_path", override("model.preset="), ["exactly one of model.preset"]),
    ("unknown_preset", override("model.preset=gpt-5"), ["gpt-5"]),
    ("safetensors_truncated", ("train", f"--config={TINY}", "--config.model.preset=",
     "--config.model.path=__FILES__/model_truncated"), ["model.safetensors"]),
    ("safetensors_garbage", ("train", f"--config={TINY}", "--config.model.preset=",
     "--config.model.path=__FILES__/model_garbage"), ["model.safetensors"]),
    ("safetensors_empty", ("train", f"--config={TINY}", "--config.model.preset=",
     "--config.model.path=__FILES__/model_empty"), ["model.safetensors"]),
    ("model_path_missing", ("train", f"--config={TINY}", "--config.model.preset=",
     "--config.model.path=/no/model"), ["model.path='/no/model' does not exist"]),
    ("data_path_missing", ("train", f"--config={TINY}", "--config.data.name=",
     "--config.data.path=/no/file.jsonl"), ["data.path='/no/file.jsonl'"]),
    ("train_path_missing", ("train", f"--config={TINY}", "--config.data.name=",
     "--config.data.train_path=/no/t.csv"), ["data.train_path='/no/t.csv'"]),
    ("unknown_dataset", override("data.name=imagenet"), ["imagenet"]),
    ("unknown_data_kind", ("train", f"--config={TINY}", "--config.data.name=",
     "--config.data.kind=audio", "--config.data.path=configs"), ["audio"]),
    ("named_dataset_and_path", override("data.path=configs/bbc_minilm.py"), ["data"]),
    ("csv_unterminated_quote", ("train", f"--config={TINY}", *data_file("unterminated.csv")),
     ["unterminated.csv"]),
    ("int_label_among_strings", ("train", f"--config={TINY}", *data_file("mixed_labels.jsonl")),
     ["mixed_labels.jsonl"]),
    ("labels_with_gaps", ("train", f"--config={TINY}", *data_file("gaps.jsonl")),
     ["gaps.jsonl"]),
    ("jsonl_not_json", ("train", f"--config={TINY}", *data_file("not_json.jsonl")),
     ["not_json.jsonl", "2"]),
    ("record_without_label", ("train", f"--config={TINY}", *data_file("no_label.jsonl")),
     ["no_label.jsonl"]),
    ("empty_data_file", ("train", f"--config={TINY}", *data_file("empty.jsonl")),
     ["empty.jsonl"]),
    # --- meshes and placement
    ("batch_not_dividing_devices", override("train.batch_size=12"),
     ["does not divide over the 8 devices"]),
    ("mesh_not_fitting", override("mesh.fsdp=3"), ["mesh"]),
    ("mesh_two_rest_axes", ("train", f"--config={TINY}", "--config.mesh.data=-1",
     "--config.mesh.fsdp=-1"), ["-1"]),
    ("mesh_axis_zero", override("mesh.tensor=0"), ["mesh"]),
    ("targets_match_nothing", override("peft.targets=.*/no_such_layer/kernel"),
     ["no_such_layer"]),
    ("targets_bad_regex", override("peft.targets=(q"), ["(q"]),
    ("train_regex_matches_nothing", override("peft.train=head/.*"), ["head/.*"]),
    ("lora_on_a_bias", override("peft.targets=.*/query/bias"), ["bias"]),
    ("rules_match_nothing", override("peft.rules=(('.*/no_such/kernel', {'rank': 4}),)"),
     ["no_such"]),
    ("rules_bad_rank", override("peft.rules=(('attention-qv', {'rank': 0}),)"),
     ["peft.rules[0]", "rank"]),
    ("rules_unknown_setting", override("peft.rules=(('attention-qv', {'rnk': 4}),)"),
     ["peft.rules[0]", "rnk"]),
    ("rules_bad_action", override("peft.rules=(('attention-qv', 'adapt'),)"), ["peft.rules[0]"]),
    ("init_typo", override("peft.init=pisa"), ["peft.init='pisa'", "pissa_niter_<N>"]),
    ("dora_with_dropout", ("train", f"--config={TINY}", "--config.peft.dora=True",
     "--config.peft.dropout=0.1"), ["dora", "dropout"]),
    ("init_from_not_an_adapter", override("peft.init_from=__FILES__"), ["peft.init_from"]),
    ("init_from_another_method", override("peft.init_from=__FILES__/bad_adapter"),
     ["bad_adapter"]),
    # --- a quantized base (QLoRA)
    ("quantize_unknown", override("model.quantize=q4"), ["model.quantize='q4'", "'nf4'"]),
    ("quantize_full_fine_tuning", ("train", "--config=configs/bbc_minilm.py:full,tiny",
     "--config.model.quantize=nf4"), ["model.quantize='nf4'", "peft.mode='lora'"]),
    ("double_quant_without_quantize", override("model.double_quant=True"),
     ["model.double_quant=True", "'nf4'"]),
    ("double_quant_with_int8", ("train", f"--config={TINY}", "--config.model.quantize=int8",
     "--config.model.double_quant=True"), ["model.double_quant=True", "'int8'"]),
    ("gguf_on_a_safetensors_model", override("model.quantize=gguf"),
     ["model.quantize='gguf'", ".gguf model.path", "smollm2-135m-instruct"]),
    ("gguf_with_pissa", ("train", "--config=configs/smollm2_shakespeare.py:qlora,tiny",
     "--config.peft.init=pissa"), ["peft.init='pissa'", "model.quantize='gguf'"]),
    ("resume_with_another_quantize", override("model.quantize=nf4"),
     ["model.quantize='none' (now 'nf4')"]),
    ("eval_with_another_quantize", ("eval", f"--config={TINY}", "--config.model.quantize=int8",
     "--config.model.quantize_embeddings=True"),
     ["model.quantize='none' (now 'int8')", "model.quantize_embeddings=False (now True)"]),
    ("combine_on_a_quantized_base", ("eval", f"--config={TINY}", "--config.model.quantize=nf4",
     "--adapters=__FILES__/bad_adapter,__FILES__/bad_adapter", "--combine=cat",
     "--weights=0.5,0.5"), ["--combine", "model.quantize='nf4'"]),
    # --- workdirs and the other commands
    ("adapters_on_train", ("train", f"--config={TINY}", "--adapters=__FILES__"), ["--adapters"]),
    ("eval_adapters_not_an_adapter", ("eval", f"--config={TINY}", "--adapters=__FILES__/a_dir.py"),
     ["--adapters", "a_dir.py"]),
    ("eval_adapters_another_method", ("eval", f"--config={TINY}",
     "--adapters=__FILES__/bad_adapter"), ["bad_adapter"]),
    ("export_adapters_only_is_gone", ("export", f"--config={TINY}", "--export_dir=__FILES__/x",
     "--adapters_only"), ["adapters_only"]),
    ("workdir_is_a_file", ("train", f"--config={TINY}", "--workdir=__FILES__/a_file"),
     ["a_file", "not a directory"]),
    ("eval_without_workdir", ("eval", f"--config={TINY}", "--workdir=__FILES__/none"),
     ["none", "does not exist"]),
    ("eval_without_checkpoint", ("eval", f"--config={TINY}", "--workdir=__FILES__"),
     ["no checkpoint"]),
    ("eval_with_another_rank", ("eval", f"--config={TINY}", "--config.peft.rank=4"),
     ["peft.rank"]),
    ("eval_with_another_mode", ("eval", "--config=configs/bbc_minilm.py:full,tiny"),
     ["peft.mode"]),
    ("generate_max_new_tokens_0", ("generate", f"--config={CHAT}",
     "--config.train.max_new_tokens=0"), ["max_new_tokens=0"]),
    ("generate_max_new_tokens_negative", ("generate", f"--config={CHAT}",
     "--config.train.max_new_tokens=-5"), ["max_new_tokens=-5"]),
    ("generate_max_new_tokens_huge", ("generate", f"--config={CHAT}",
     "--config.train.max_new_tokens=100000"), ["max_new_tokens=100000"]),
    ("generate_on_a_classifier", ("generate", f"--config={TINY}"), ["causal_lm"]),
    ("export_into_workdir", ("export", f"--config={TINY}", "--export_dir=__WORKDIR__"),
     ["--export_dir"]),
    ("export_onto_a_file", ("export", f"--config={TINY}", "--export_dir=__FILES__/a_file"),
     ["a_file"]),
    ("export_into_a_full_folder", ("export", f"--config={TINY}", "--export_dir=__FILES__"),
     ["--export_dir"]),
]
# fmt: on


@pytest.mark.parametrize(("args", "expect"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(args, expect, workdir, files):
    args = [a.replace("__WORKDIR__", str(workdir)).replace("__FILES__", str(files)) for a in args]
    if not any(a.startswith("--workdir") for a in args):
        args.append(f"--workdir={workdir}")
    before = {"workdir": tree_digest(workdir), "files": tree_digest(files)}
    result = forked(*args)
    assert_refused(result, *expect)
    assert {"workdir": tree_digest(workdir), "files": tree_digest(files)} == before


def test_a_refused_train_leaves_no_workdir_behind_that_it_created(tmp_path):
    """A config that fails while the run is built (a rule matching nothing) is refused after
    the workdir lock was taken: the new workdir, holding only the lock file, goes again."""
    target = tmp_path / "new_run"
    rule = "--config.peft.rules=(('.*/no_such/kernel', {'rank': 4}),)"
    assert_refused(forked("train", f"--config={TINY}", f"--workdir={target}", rule), "no_such")
    assert not target.exists() and os.listdir(tmp_path) == []


def test_read_only_workdir_is_refused(workdir, tmp_path):
    if os.geteuid() == 0:  # root writes anywhere: test the check with a parent that is a file
        target = tmp_path / "file"
        target.write_text("x")
        result = forked("train", f"--config={TINY}", f"--workdir={target}/run")
        assert_refused(result, "not a writable directory")
        return
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    result = forked("train", f"--config={TINY}", f"--workdir={locked}/run")
    assert_refused(result, "not a writable directory")


def test_a_config_imports_helpers_next_to_it_from_any_directory(tmp_path):
    """A user's own config file elsewhere, importing a module beside it, run from elsewhere."""
    project = tmp_path / "my_project"
    project.mkdir()
    (project / "my_helpers.py").write_text("STEPS = 3\n")
    (project / "my_config.py").write_text(
        f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n"
        "from my_helpers import STEPS\n"
        "from configs.bbc_minilm import get_config as base\n\n"
        "def get_config(arg=None):\n"
        "    config = base('lora,tiny')\n"
        "    config.train.steps = STEPS\n"
        "    return config\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = forked(
        "plan", f"--config={project / 'my_config.py'}", "--config.train.steps=2", cwd=elsewhere
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert '"lora"' in result.stdout.strip().splitlines()[-1]


def test_divergence_stops_with_one_line_and_skipping_is_reported(tmp_path):
    """lr=1e9: `stop` exits 2 naming the step and the last good checkpoint; `skip` says so."""
    diverging = (
        "train",
        f"--config={TINY}",
        "--config.schedule.lr=1e9",
        "--config.logging.progress=false",
    )
    stopped = forked(*diverging, f"--workdir={tmp_path / 'stop'}")
    assert_refused(stopped, "non-finite loss", "the last good checkpoint is step")

    skipped = forked(
        *diverging, "--config.train.on_nonfinite=skip", f"--workdir={tmp_path / 'skip'}"
    )
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    summary = json.loads(skipped.stdout.strip().splitlines()[-1])
    assert 1 <= summary["skipped_steps"] <= 4
    assert f"{summary['skipped_steps']} of the 4 steps trained now were skipped" in skipped.stderr
