"""Export to a Hugging Face directory: transformers reloads it with matching logits."""

import json

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
from lorax_ft.transform import paths
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


def _bert_classifier(pooling, add_pooling_layer=True):
    cfg = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=16, num_labels=3,
        classifier_pooling=pooling, add_pooling_layer=add_pooling_layer,
    )  # fmt: skip
    return BertForSequenceClassification(cfg)


MASK = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])  # right padding in the second row


def _bert_params(module):
    """Random params with LayerNorm scales near 1: with scales near 0 the final token states
    are nearly equal and mean- and cls-pooling would agree too closely to tell apart."""
    rng = np.random.default_rng(2)
    return paths.map_with_path(
        lambda p, s: jnp.asarray(
            (p.endswith("LayerNorm/scale")) + 0.2 * rng.standard_normal(s.shape, np.float32)
        ),
        abstract_params(module),
    )


def head_logits(hidden, mask, directory):
    """What classifier.json's note says to compute, with its classifier.safetensors."""
    from safetensors.numpy import load_file

    head = json.loads((directory / "classifier.json").read_text())
    tensors = load_file(str(directory / "classifier.safetensors"))
    if head["pooling"] == "mean":
        weights = mask[..., None].astype(np.float64)
        x = (hidden * weights).sum(1) / weights.sum(1)
    else:
        x = hidden[:, 0]
    return x @ tensors["weight"].T.astype(np.float64) + tensors["bias"]


@pytest.mark.parametrize("pooling,pooler", [("mean", True), ("cls", False)])
def test_bert_mean_or_cls_classifier_exports_encoder_and_head(tmp_path, pooling, pooler):
    module = _bert_classifier(pooling, add_pooling_layer=pooler)
    params = _bert_params(module)
    save_pretrained(str(tmp_path), module, params)
    config = json.loads((tmp_path / "config.json").read_text())
    head = json.loads((tmp_path / "classifier.json").read_text())
    assert config["architectures"] == ["BertModel"]
    assert head["pooling"] == pooling and head["num_labels"] == 3 and head["note"]
    ours = np.asarray(jax.jit(module.apply)({"params": params}, IDS, MASK))

    hf = transformers.BertModel.from_pretrained(tmp_path, add_pooling_layer=pooler).eval()
    with torch.no_grad():
        hidden = hf(torch.tensor(IDS), attention_mask=torch.tensor(MASK)).last_hidden_state
    theirs = head_logits(hidden.numpy().astype(np.float64), MASK, tmp_path)
    # The pooling matters: the other one's logits differ by far more than the tolerance.
    other = {"mean": "cls", "cls": "mean"}[pooling]
    alt = np.asarray(_bert_classifier(other, pooler).apply({"params": params}, IDS, MASK))
    assert np.abs(alt - ours).max() > 0.1
    assert_close(theirs, ours, tol=1e-5)

    # And back: lorax reads the directory as the same classifier, exactly.
    module2, params2, cfg2, _ = load_pretrained(str(tmp_path))
    assert isinstance(module2, BertForSequenceClassification)
    assert cfg2.classifier_pooling == pooling and cfg2.num_labels == 3
    assert cfg2.add_pooling_layer == pooler
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    np.testing.assert_array_equal(jax.jit(module2.apply)({"params": params2}, IDS, MASK), ours)


def test_bert_pooler_export_leaves_no_stale_head(tmp_path):
    save_pretrained(
        str(tmp_path), _bert_classifier("mean"), _random_params(_bert_classifier("mean"))
    )
    module = _bert_classifier("pooler")
    params = _random_params(module)
    save_pretrained(str(tmp_path), module, params)
    assert not (tmp_path / "classifier.json").exists()
    assert not (tmp_path / "classifier.safetensors").exists()
    module2, _, cfg2, _ = load_pretrained(str(tmp_path))
    assert isinstance(module2, BertForSequenceClassification)
    assert cfg2.classifier_pooling == "pooler"


def test_bert_to_hf_refuses_a_classifier_transformers_would_pool_otherwise():
    from lorax_ft.models.hf_config import bert_to_hf

    with pytest.raises(ValueError, match=r"classifier_pooling='mean'.*pooler output"):
        bert_to_hf(_bert_classifier("mean").config, classifier=True)
