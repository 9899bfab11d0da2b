"""Export to a Hugging Face directory: transformers reloads it with matching logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer, models

from lorax_ft.models import (
    BertConfig,
    BertForSequenceClassification,
    Gpt2Config,
    Gpt2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    RopeConfig,
    abstract_params,
    load_pretrained,
)
from lorax_ft.models.export import save_pretrained
from tests.tolerance import assert_close

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)

IDS = np.random.default_rng(0).integers(0, 64, size=(2, 6))


def _random_params(module):
    # numpy draws instead of module.init: XLA compiles the threefry init slowly on 2 CPU cores.
    rng = np.random.default_rng(2)
    return jax.tree.map(
        lambda s: jnp.asarray(0.5 * rng.standard_normal(s.shape, np.float32)),
        abstract_params(module),
    )


def _tokenizer():
    return Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))


def test_llama_export_loads_in_transformers(tmp_path):
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        scan_layers=True,
        eos_token_ids=(1, 2),
        # Non-default rope, so a config.json field transformers failed to read would show.
        rope=RopeConfig(
            theta=300.0, rope_type="llama3", factor=4.0, original_max_position_embeddings=4
        ),
    )
    module = LlamaForCausalLM(cfg)
    params = _random_params(module)
    save_pretrained(str(tmp_path), module, params, tokenizer=_tokenizer())
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(IDS)).logits.numpy()
    ours = np.asarray(jax.jit(module.apply)({"params": params}, IDS))
    assert_close(ours, theirs, tol=1e-4)
    # And back: an unscanned reload gives the same logits and keeps the tokenizer.
    module2, params2, cfg2, tok = load_pretrained(str(tmp_path))
    assert not cfg2.scan_layers and cfg2.eos_token_ids == (1, 2)
    assert tok.token_to_id("world") == 2
    assert_close(jax.jit(module2.apply)({"params": params2}, IDS), ours, tol=1e-6)


def test_gpt2_export_loads_in_transformers(tmp_path):
    cfg = Gpt2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4)
    module = Gpt2LMHeadModel(cfg)
    params = _random_params(module)
    save_pretrained(str(tmp_path), module, params)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(IDS)).logits.numpy()
    assert_close(jax.jit(module.apply)({"params": params}, IDS), theirs, tol=1e-4)


def test_bert_classifier_export_loads_in_transformers(tmp_path):
    cfg = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=16,
        num_labels=3,
    )
    module = BertForSequenceClassification(cfg)
    params = _random_params(module)
    save_pretrained(str(tmp_path), module, params)
    hf = transformers.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(IDS)).logits.numpy()
    assert_close(jax.jit(module.apply)({"params": params}, IDS), theirs, tol=1e-4)


def test_lora_merged_export_round_trip(tmp_path):
    """load → LoRA fine-tune state → merge → export → transformers logits == factored logits."""
    import lorax_ft as lf
    from lorax_ft.transform import lora

    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    base_dir, merged_dir = tmp_path / "base", tmp_path / "merged"
    save_pretrained(str(base_dir), LlamaForCausalLM(cfg), _random_params(LlamaForCausalLM(cfg)))
    module, params, _, _ = load_pretrained(str(base_dir))
    spec = lf.Spec([(r".*_proj/kernel", lf.LoRA(rank=4, alpha=8))])
    adapters = lora.init(jax.random.key(0), params, spec, lf.infer_layouts(module, params, IDS))
    # Stand-in for training: B away from zero, so the adapters change the logits.
    adapters = jax.tree.map(lambda x: x + 0.3 * jnp.sign(jnp.sin(jnp.arange(x.size))).reshape(
        x.shape), adapters)  # fmt: skip
    adapted = np.asarray(jax.jit(lf.factored(module))(params, adapters, IDS))
    assert np.abs(adapted - np.asarray(module.apply({"params": params}, IDS))).max() > 1e-2

    save_pretrained(str(merged_dir), module, lora.merge(params, adapters))
    hf = transformers.AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(IDS)).logits.numpy()
    assert_close(theirs, adapted, tol=1e-4)
