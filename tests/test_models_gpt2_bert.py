"""GPT-2 and BERT parity with Hugging Face transformers (PyTorch, CPU) on tiny random models."""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lorax_ft.models import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    abstract_params,
    load_pretrained,
)
from tests.tolerance import assert_close  # noqa: E402

torch.set_num_threads(1)


def _perturb(model):
    # Random, nonzero biases and LayerNorm parameters so those code paths are compared too.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln" in name or "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _save(model, tmp_path):
    model.save_pretrained(tmp_path, safe_serialization=True)
    return str(tmp_path)


def test_gpt2_logits_match_transformers(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4, initializer_range=0.1
    )
    hf = _perturb(transformers.GPT2LMHeadModel(config).eval())
    module, params, _, _ = load_pretrained(_save(hf, tmp_path))
    assert "wte" in params["transformer"] and "lm_head" not in params
    ids = np.random.default_rng(0).integers(0, 96, size=(2, 7))
    ours = np.asarray(jax.jit(module.apply)({"params": params}, ids))
    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).logits.numpy()
    assert_close(ours, theirs, tol=1e-4)


def _bert_batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 96, size=(2, 7))
    mask = np.ones_like(ids)
    mask[1, 4:] = 0  # BERT pads on the right
    ids[mask == 0] = 0
    token_types = np.zeros_like(ids)
    token_types[:, 3:] = 1
    return ids, mask, token_types


def _bert_config():
    return transformers.BertConfig(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        initializer_range=0.1,
        num_labels=3,
    )


def test_bert_hidden_states_and_pooling_match_transformers(tmp_path):
    torch.manual_seed(0)
    hf = _perturb(transformers.BertModel(_bert_config()).eval())
    module, params, _, _ = load_pretrained(_save(hf, tmp_path), scan_layers=True)
    assert isinstance(module, BertModel)
    ids, mask, types = _bert_batch()
    out = jax.jit(module.apply)({"params": params}, ids, attention_mask=mask, token_type_ids=types)
    with torch.no_grad():
        theirs = hf(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            token_type_ids=torch.tensor(types),
        )
    hidden = theirs.last_hidden_state.numpy()
    real = mask.astype(bool)
    assert_close(np.asarray(out.last_hidden_state)[real], hidden[real], tol=1e-4)
    assert_close(out.pooler_output, theirs.pooler_output.numpy(), tol=1e-4)
    assert_close(out.cls_embedding, hidden[:, 0], tol=1e-4)
    # Independent mean pooling: average over each row's real tokens only.
    expected_mean = np.stack([hidden[i][real[i]].mean(0) for i in range(len(ids))])
    assert_close(out.mean_embedding, expected_mean, tol=1e-4)


def test_bert_sequence_classification_matches_transformers(tmp_path):
    torch.manual_seed(0)
    hf = _perturb(transformers.BertForSequenceClassification(_bert_config()).eval())
    module, params, cfg, _ = load_pretrained(_save(hf, tmp_path))
    assert isinstance(module, BertForSequenceClassification) and cfg.num_labels == 3
    ids, mask, types = _bert_batch()
    ours = jax.jit(module.apply)({"params": params}, ids, attention_mask=mask, token_type_ids=types)
    with torch.no_grad():
        theirs = hf(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            token_type_ids=torch.tensor(types),
        ).logits.numpy()
    assert_close(ours, theirs, tol=1e-4)


def test_bert_dropout_is_active_only_when_not_deterministic():
    cfg = BertConfig(
        vocab_size=32,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=8,
    )
    module = BertForSequenceClassification(cfg)
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: rng.standard_normal(s.shape, np.float32), abstract_params(module)
    )
    ids = rng.integers(0, 32, size=(2, 8))

    @jax.jit
    def run(key):
        return module.apply({"params": params}, ids, deterministic=False, rngs={"dropout": key})

    # rbg keys: XLA on CPU compiles threefry's dropout masks several times slower.
    key0, key1 = jax.random.key(0, impl="rbg"), jax.random.key(1, impl="rbg")
    a, b = run(key0), run(key1)
    plain = jax.jit(module.apply)({"params": params}, ids)
    assert not np.allclose(a, b) and not np.allclose(a, plain)
    np.testing.assert_array_equal(run(key0), a)


def test_bert_without_pooler_loads(tmp_path):
    torch.manual_seed(0)
    hf = transformers.BertModel(_bert_config(), add_pooling_layer=False).eval()
    _, params, cfg, _ = load_pretrained(_save(hf, tmp_path))
    assert not cfg.add_pooling_layer and "pooler" not in params
