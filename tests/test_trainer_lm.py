"""The causal-LM configs end to end through the CLI: tiny SmolLM2 runs, samples, generate."""

import json

import numpy as np
import pytest

from lorax_ft.metrics import read_metrics
from tests.test_trainer import lorax_ft


@pytest.mark.parametrize("config", ["smollm2_chatterbot", "smollm2_shakespeare"])
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
