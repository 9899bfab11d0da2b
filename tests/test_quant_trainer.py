"""QLoRA through the CLI: a tiny NF4 run of the BBC config, against the float path on its
dequantized base, resumed from a mid-run checkpoint, evaluated and exported.

The independent computation: the float base loaded as the run loads it, quantized by
`lorax_ft.quant.quantize` (not the trainer's per-kernel sharded path), dequantized, the saved
adapters merged into it by hand, and evaluated by a plain `module.apply` (tests/test_trainer.py).
"""

import json
import os
import shutil

import numpy as np
import pytest

from lorax_ft.run.metrics import read_metrics
from tests.test_trainer import (
    _assert_same_state,
    _comparable,
    _final_state,
    _last_json,
    _merged_by_hand,
    _plain_eval,
    lorax_ft,
)
from tests.tolerance import assert_close

TINY = "configs/bbc_minilm.py:qlora,tiny"  # lora,tiny with model.quantize="nf4"


def _config():
    from configs import bbc_minilm

    config = bbc_minilm.get_config("qlora,tiny")
    assert config.model.quantize == "nf4"
    return config


def _ok(*args):
    """`lorax-ft *args` on one CPU device: (stdout lines, summary).

    Eight simulated devices on a 2-core machine each quantize and dequantize every replicated
    kernel (NF4's many small ops at XLA:CPU's lowest optimisation): one device makes each run
    3 times faster. Placement on a mesh is tested in test_quant_sharded.py.
    """
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "1"}
    result = lorax_ft(*args, "--config.logging.progress=false", env=env)
    return result.stdout.strip().splitlines(), _last_json(result.stdout)


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    """The tiny NF4 run, its step-2 checkpoint kept for the resume test."""
    workdir = tmp_path_factory.mktemp("qlora") / "run"
    _, summary = _ok("train", f"--config={TINY}", f"--workdir={workdir}",
                     "--config.checkpoint.keep=2")  # fmt: skip
    assert summary["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
    return workdir, summary


@pytest.fixture(scope="module")
def reference():
    """The float base (encoder and fresh head, as the run loads it), its NF4 quantization by
    `lorax_ft.quant.quantize` and the eval batches, all on the host."""
    import jax

    from lorax_ft import data, quant
    from lorax_ft.run import tasks
    from lorax_ft.run.experiment import num_labels_of
    from lorax_ft.transform import paths
    from lorax_ft.transform.factored import infer_layouts

    config = _config()
    task = tasks.build(config, num_labels_of(config))
    layouts = infer_layouts(task.module, task.params, *task.example_inputs)
    head = [p for p in paths.flatten(task.params) if p.startswith("classifier/")]  # trained
    quantized = quant.quantize(task.params, "nf4", layouts, skip=head)
    batches = data.make_pipeline(
        config.data, task.tokenizer, split="eval", seed=config.train.seed,
        batch_size=config.train.eval_batch_size, num_epochs=1, **task.data_kwargs,
    )  # fmt: skip
    return {
        "config": config,
        "module": task.module,
        "float": jax.device_get(task.params),
        "quantized": quantized,
        "dequantized": jax.device_get(quant.dequantize(quantized)),
        "batches": [next(batches) for _ in range(config.train.eval_steps)],
    }


def test_a_qlora_run_trains_on_nf4_codes_and_evaluates_as_the_float_path_on_them(
    qlora_run, reference
):
    """Step 0's eval is the dequantized base with the fresh head; step 4's the dequantized
    base with the saved adapters merged by hand and the saved head (1e-5). The reported
    errors are those of the reference quantization; the head was trained in float."""
    from lorax_ft import quant
    from lorax_ft.transform import paths

    workdir, summary = qlora_run
    config, module, batches = reference["config"], reference["module"], reference["batches"]
    quantized = quant.quantized_paths(reference["quantized"])
    assert not [p for p in quantized if p.startswith("classifier/")]
    assert all(p.startswith("bert/encoder/") or p.startswith("bert/pooler/") for p in quantized)
    report = summary["quantization"]
    assert (report["method"], report["kernels"]) == ("nf4", len(quantized)) and report["kernels"]
    assert report["formats"] == {"nf4": len(quantized)}
    assert report["bytes_per_param"] == pytest.approx(0.5 + 4 / 64)  # 4-bit codes, f32 per 64
    floats, dequantized = paths.flatten(reference["float"]), paths.flatten(reference["dequantized"])
    errors = [
        np.linalg.norm(np.asarray(dequantized[p], np.float64) - floats[p])
        / np.linalg.norm(np.asarray(floats[p], np.float64))
        for p in quantized
    ]
    assert 0.05 < max(errors) < 0.2  # NF4's error on Gaussian-like weights: about 0.1
    assert_close(report["relative_error_max"], max(errors), tol=1e-5)
    assert_close(report["relative_error_mean"], float(np.mean(errors)), tol=1e-5)

    records = read_metrics(workdir / "metrics.jsonl")
    evals = {r["step"]: r for r in records if "eval_loss" in r}
    assert sorted(evals) == [0, 4]
    assert evals[4]["eval_loss"] < evals[0]["eval_loss"]  # it trained
    before = _plain_eval(module, reference["dequantized"], batches)
    assert_close(evals[0]["eval_loss"], before["eval_loss"], tol=1e-5)
    assert evals[0]["eval_accuracy"] == before["eval_accuracy"]

    import jax

    saved = jax.device_get(_final_state(workdir)["trainable"])
    assert set(paths.flatten(saved["params"])) == {"classifier/bias", "classifier/kernel"}
    assert saved["params"]["classifier"]["kernel"].dtype == np.float32
    scale = config.peft.alpha / config.peft.rank
    trained = _merged_by_hand(reference["dequantized"], saved["lora"], scale)
    trained["classifier"] = saved["params"]["classifier"]
    after = _plain_eval(module, trained, batches)
    assert_close(evals[4]["eval_loss"], after["eval_loss"], tol=1e-5)
    assert evals[4]["eval_accuracy"] == after["eval_accuracy"]
    assert "| quantized base | nf4, " in (workdir / "summary.md").read_text()


def test_a_qlora_run_resumes_bitwise_from_a_mid_run_checkpoint(qlora_run, tmp_path):
    """The run's workdir with its last checkpoint gone: the same command re-quantizes the base
    (the fingerprint agrees), restores step 2 and ends with the same metrics and state."""
    workdir, _ = qlora_run
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "4")
    _, summary = _ok("train", f"--config={TINY}", f"--workdir={resumed}",
                     "--config.checkpoint.keep=2")  # fmt: skip
    assert summary["steps"] == 4 and summary["quantization"]["method"] == "nf4"
    assert _comparable(read_metrics(resumed / "metrics.jsonl")) == _comparable(
        read_metrics(workdir / "metrics.jsonl")
    )
    _assert_same_state(resumed, workdir)


def test_eval_rebuilds_the_quantized_base_and_repeats_the_runs_eval(qlora_run):
    workdir, _ = qlora_run
    _, evaluated = _ok("eval", f"--config={TINY}", f"--workdir={workdir}")
    final = [r for r in read_metrics(workdir / "metrics.jsonl") if "eval_loss" in r][-1]
    assert evaluated["step"] == 4
    for key in ("eval_loss", "eval_accuracy", "eval_macro_f1"):
        assert evaluated[key] == final[key]


def test_the_merged_export_is_the_dequantized_base_plus_the_adapters(
    qlora_run, reference, tmp_path
):
    """`export --merged` says what it wrote; loaded back, its kernels are dequantize(Wq) +
    s·A·B computed by hand (1e-6), everything else the base's or the trained head's."""
    import jax

    from lorax_ft.models import load_pretrained
    from lorax_ft.transform import paths

    workdir, _ = qlora_run
    out = tmp_path / "merged"
    lines, exported = _ok("export", f"--config={TINY}", f"--workdir={workdir}",
                          f"--export_dir={out}", "--merged")  # fmt: skip
    assert exported["wrote"] == "merged model (the nf4 base dequantized)"
    assert lines[-2].startswith("lorax-ft export: the adapters were trained on an nf4-quantized")
    assert json.loads((out / "quantization.json").read_text())["method"] == "nf4"

    _, loaded, _, _ = load_pretrained(str(out))
    loaded = paths.flatten(jax.device_get(loaded))
    saved = jax.device_get(_final_state(workdir)["trainable"])
    config = reference["config"]
    expected = _merged_by_hand(
        reference["dequantized"], saved["lora"], config.peft.alpha / config.peft.rank
    )
    expected["classifier"] = saved["params"]["classifier"]
    expected = paths.flatten(expected)
    assert set(loaded) == set(expected)
    adapted = {p.rsplit("/", 1)[0] for p in paths.flatten(saved["lora"])}
    for path, value in expected.items():
        assert loaded[path].dtype == np.float32, path  # the run's param dtype
        assert_close(loaded[path], value, tol=1e-6)
        if path in adapted:  # the merge changed it from the dequantized base
            assert np.abs(value - paths.flatten(reference["dequantized"])[path]).max() > 0


def test_the_adapter_export_states_the_quantization_error(qlora_run, tmp_path):
    """The PEFT adapter applies to the float base; the export says by how much the base it
    was trained on differs from it."""
    workdir, summary = qlora_run
    out = tmp_path / "adapter"
    lines, exported = _ok("export", f"--config={TINY}", f"--workdir={workdir}",
                          f"--export_dir={out}")  # fmt: skip
    report = summary["quantization"]
    assert exported["wrote"] == "peft adapters" and exported["quantization"] == report
    written = json.loads((out / "quantization.json").read_text())
    assert {k: written[k] for k in report} == report
    statement = (
        f"lorax-ft export: the adapters were trained on an nf4-quantized base: relative error "
        f"‖dequantize(Wq) − W‖/‖W‖ over its {report['kernels']} quantized kernels: max "
        f"{report['relative_error_max']:.4g}, mean {report['relative_error_mean']:.4g}"
    )
    assert lines[-2] == statement and written["statement"] == statement.split(": ", 1)[1]
    assert (out / "adapter_model.safetensors").is_file()


def _plain_lm_eval(module, params, batches) -> float:
    """A causal LM's eval loss by a plain `module.apply` and numpy (mean over loss tokens)."""
    import jax

    apply = jax.jit(module.apply)
    total, count = 0.0, 0.0
    for batch in batches:
        logits = np.asarray(
            apply({"params": params}, batch["input_ids"], batch["attention_mask"]), np.float64
        )
        shifted = logits - logits.max(-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        losses = -np.take_along_axis(log_probs, batch["labels"][..., None], -1)[..., 0]
        mask = batch["loss_mask"] * batch["weights"][:, None]
        total, count = total + (losses * mask).sum(), count + mask.sum()
    return total / count


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A tiny Llama GGUF file whose linear kernels are Q4_1 (one stack F16), a text to train
    on, and the smollm2_shakespeare `qlora,tiny` config pointed at both, with DoRA."""
    import random

    gguf = pytest.importorskip("gguf")
    from configs import smollm2_shakespeare
    from tests.test_quant_gguf import _write_file

    directory = tmp_path_factory.mktemp("tiny_llama")
    model_path, text = directory / "tiny.gguf", directory / "text.txt"
    _write_file(model_path, gguf.GGMLQuantizationType.Q4_1)
    letters = random.Random(0)
    text.write_text(
        "".join("".join(letters.choice("abcdefghij") for _ in range(40)) + "\n" for _ in range(200))
    )
    config = smollm2_shakespeare.get_config("qlora,tiny")
    config.model.update(preset="", path=str(model_path))
    config.data.update(name="", kind="text", path=str(text))
    config.peft.update(dora=True, rank=4, train="lm_head/kernel")
    config.train.sample_prompts = ("abc",)
    config.logging.progress = False
    return config


def _eval_batches(config, tokenizer):
    from lorax_ft import data

    batches = data.make_pipeline(
        config.data, tokenizer, split="eval", seed=0, batch_size=config.train.eval_batch_size,
        num_epochs=1, eos_id=0, pad_id=None,
    )  # fmt: skip
    return [next(batches) for _ in range(config.train.eval_steps)]


def test_a_qlora_run_on_gguf_blocks_trains_dora_and_a_float_head(tiny_llama, tmp_path):
    """`model.quantize='gguf'` (the smollm2_shakespeare `qlora` variant): the file's Q4_1
    blocks stay the base, except the LM head, which the run trains (dequantized to float), and
    the stack stored as F16. DoRA's magnitudes start at the dequantized kernels' norms, so
    step 0 is the plain model on the dequantized file (1e-5). Its PEFT export, evaluated on
    the same blocks, is the run's last eval."""
    import jax

    from lorax_ft import quant
    from lorax_ft.models import load_pretrained
    from lorax_ft.run import commands
    from lorax_ft.run.trainer import train_and_evaluate

    config = tiny_llama
    summary = train_and_evaluate(config, tmp_path / "run")
    report = summary["quantization"]
    # 7 stacks of linear kernels and the head; v_proj is F16 in the file, the head trained.
    assert report["formats"] == {"q4_1": 6} and report["relative_error_max"] == 0.0
    assert report["bytes_per_param"] == 0.5 + 4 / 32  # 4-bit codes, f16 d and m per 32
    assert "the base is the GGUF file's blocks" in report["relative_error"]
    saved = _final_state(tmp_path / "run", step=2)["trainable"]
    assert saved["params"]["lm_head"]["kernel"].dtype == np.float32
    assert json.loads((tmp_path / "run" / "samples.json").read_text())["after"]["abc"] is not None

    module, blocks, _, tokenizer = load_pretrained(
        config.model.path, gguf_blocks=True, scan_layers=True
    )
    assert len(quant.quantized_paths(blocks)) == 7  # the head in the file's blocks too
    float_model = jax.device_get(quant.dequantize(blocks))
    before = _plain_lm_eval(module, float_model, _eval_batches(config, tokenizer))
    evals = [r["eval_loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
             if "eval_loss" in r]  # fmt: skip
    assert_close(evals[0], before, tol=1e-5)
    assert evals[-1] != evals[0]

    # Its PEFT export, evaluated on the same blocks (`eval --adapters`), is the run's last eval.
    out = str(tmp_path / "adapter")
    exported = commands.export(config, str(tmp_path / "run"), out)
    assert exported["quantization"]["formats"] == {"q4_1": 6}
    evaluated = commands.evaluate_adapters(config, [out, "none"])["adapters"]
    assert evaluated[out]["eval_loss"] == pytest.approx(evals[-1], rel=1e-6)
    assert evaluated["none"]["eval_loss"] == pytest.approx(evals[0], rel=1e-6)


def test_pissa_residuals_are_quantized_and_dora_starts_on_the_dequantized_kernels(
    tiny_llama, tmp_path
):
    """int8 with PiSSA and DoRA: the residual W − s·A0·B0 is what gets quantized (as PEFT's
    QLoRA + PiSSA), and DoRA's magnitudes are ‖dequantize(Wq) + s·A0·B0‖, so step 0 is the
    dequantized codes plus s·A0·B0, A0 and B0 computed here from the float file (1e-5).

    The codes are compared with `quant.quantize` of the residual computed here: the SVD's
    float noise moves a few values across a rounding boundary (one code up or down)."""
    import jax

    from lorax_ft import quant
    from lorax_ft.models import load_pretrained
    from lorax_ft.run import commands
    from lorax_ft.run import config as config_lib
    from lorax_ft.run.experiment import adapter_key
    from lorax_ft.run.trainer import train_and_evaluate
    from lorax_ft.transform import lora, paths
    from lorax_ft.transform.factored import infer_layouts

    config = tiny_llama.copy_and_resolve_references()
    config.model.quantize = "int8"
    config.peft.init = "pissa_niter_2"
    summary = train_and_evaluate(config, tmp_path / "run")
    report = summary["quantization"]
    assert report["method"] == "int8" and report["formats"] == {"int8": 7}  # the head trained
    run = paths.flatten(
        jax.device_get(commands.restore(config, str(tmp_path / "run")).state.frozen)
    )

    module, params, model_config, tokenizer = load_pretrained(config.model.path, scan_layers=True)
    layouts = infer_layouts(module, params, np.zeros((1, 8), np.int32))
    spec = config_lib.peft_spec(config.peft, model_config)
    residual, adapters = lora.initialize(adapter_key(config), params, spec, layouts)
    ours = paths.flatten(quant.quantize(residual, "int8", layouts, skip=["lm_head/kernel"]))
    of_w = paths.flatten(quant.quantize(params, "int8", layouts, skip=["lm_head/kernel"]))
    start = {}
    for path, q in ours.items():
        if not quant.is_quantized(q):
            continue
        codes = np.asarray(run[f"params/{path}"].values, np.int32)
        moved = np.abs(codes - np.asarray(q.values, np.int32))
        assert moved.max() <= 1 and moved.mean() < 0.01, path
        assert np.mean(codes != np.asarray(of_w[path].values)) > 0.1, path  # not W's codes
        start[path] = run[f"params/{path}"].dequantize()
    flat_residual = paths.flatten(residual)
    errors = [
        float(np.linalg.norm(start[p] - flat_residual[p]) / np.linalg.norm(flat_residual[p]))
        for p in start
    ]
    assert_close(report["relative_error_max"], max(errors), tol=1e-4)
    for path, f in lora.factors_by_path(adapters).items():
        delta = f.scale * np.einsum("...ir,...ro->...io", f.a, f.b)
        start[path] = np.asarray(start[path]) + delta.reshape(start[path].shape)
    start = paths.unflatten({**paths.flatten(jax.device_get(residual)), **start})
    before = _plain_lm_eval(module, start, _eval_batches(config, tokenizer))
    evals = [r["eval_loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
             if "eval_loss" in r]  # fmt: skip
    assert_close(evals[0], before, tol=1e-5)
