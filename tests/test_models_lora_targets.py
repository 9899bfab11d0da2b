"""LoRA target presets select exactly the intended kernels, looped or scanned."""

import dataclasses

import jax
import pytest

from lorax_ft.models import (
    BertConfig,
    BertForSequenceClassification,
    Gpt2Config,
    Gpt2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    abstract_params,
)
from lorax_ft.models.lora_targets import is_target, lora_targets

MODULES = {
    "llama": LlamaForCausalLM(
        LlamaConfig(
            vocab_size=16,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            qkv_bias=True,
        )
    ),
    "gpt2": Gpt2LMHeadModel(
        Gpt2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=2, n_head=2)
    ),
    "bert": BertForSequenceClassification(
        BertConfig(
            vocab_size=16,
            hidden_size=8,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=16,
            max_position_embeddings=8,
        )
    ),
}

# The modules each preset adapts in every layer, by the last two path components before "kernel".
EXPECTED = {
    "llama": {
        "attention-qv": {"self_attn/q_proj", "self_attn/v_proj"},
        "attention-all": {f"self_attn/{p}_proj" for p in "qkvo"},
        "all-linear": {f"self_attn/{p}_proj" for p in "qkvo"}
        | {f"mlp/{p}_proj" for p in ("gate", "up", "down")},
    },
    "gpt2": {
        "attention-qv": {"attn/c_attn"},
        "attention-all": {"attn/c_attn", "attn/c_proj"},
        "all-linear": {"attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj"},
    },
    "bert": {
        "attention-qv": {"self/query", "self/value"},
        "attention-all": {"self/query", "self/key", "self/value", "attention/output/dense"},
        "all-linear": {
            "self/query",
            "self/key",
            "self/value",
            "attention/output/dense",
            "intermediate/dense",
            "layer/output/dense",
        },
    },
}


def _paths(module):
    flat = jax.tree_util.tree_flatten_with_path(abstract_params(module))[0]
    return ["/".join(k.key for k in path) for path, _ in flat]


def _short(path):
    parts = path.split("/")[:-1]
    tail = "/".join(parts[-2:])
    if tail == "output/dense" and parts[-3] != "attention":
        return "layer/output/dense"
    return "attention/output/dense" if tail == "output/dense" else tail


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("family", sorted(MODULES))
def test_presets_select_expected_kernels(family, scan):
    module = MODULES[family]
    module = type(module)(dataclasses.replace(module.config, scan_layers=scan))
    paths = _paths(module)
    for preset, expected in EXPECTED[family].items():
        chosen = [p for p in paths if is_target(p, lora_targets(family, preset))]
        assert all(p.endswith("/kernel") for p in chosen)
        per_layer = 1 if scan else 2
        assert len(chosen) == per_layer * len(expected), (preset, chosen)
        assert {_short(p) for p in chosen} == expected


def test_model_type_and_config_lookup():
    assert lora_targets("qwen2", "all-linear") == lora_targets("llama", "all-linear")
    assert lora_targets(MODULES["bert"].config, "attention-qv") == lora_targets(
        "bert", "attention-qv"
    )
    with pytest.raises(ValueError, match="unknown LoRA preset 'mlp'"):
        lora_targets("llama", "mlp")
