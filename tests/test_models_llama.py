"""Llama-family parity with Hugging Face transformers (PyTorch, CPU) on tiny random models."""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lorax_ft.models import load_pretrained  # noqa: E402
from lorax_ft.models.generate import Sampling, generate, left_pad  # noqa: E402
from tests.tolerance import assert_close  # noqa: E402

torch.set_num_threads(1)

TINY = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    initializer_range=0.1,
)

VARIANTS = {
    # GQA, untied head, Llama-3 rope scaling with a small original context so all three bands occur.
    "llama": lambda: transformers.LlamaConfig(
        **TINY,
        tie_word_embeddings=False,
        rope_theta=500.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "qwen2": lambda: transformers.Qwen2Config(**TINY, tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(**TINY, sliding_window=4),
}


def _left_padded_batch(rng, vocab):
    ids = rng.integers(0, vocab, size=(3, 9))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    ids[mask == 0] = 0
    return ids, mask


def _hf_logits(model, ids, mask):
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions),
        )
    return out.logits.numpy()


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def hf_dir(request, tmp_path_factory):
    torch.manual_seed(0)
    hf_config = VARIANTS[request.param]()
    hf_config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    # Random, nonzero biases and norm scales so those code paths are compared too.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path, safe_serialization=True)
    return request.param, str(path), model


@pytest.mark.parametrize("scan_layers", [False, True])
def test_logits_match_transformers(hf_dir, scan_layers):
    name, path, hf_model = hf_dir
    if scan_layers and name != "llama":
        pytest.skip("scan is exercised once, on llama")
    module, params, cfg, tokenizer = load_pretrained(path, scan_layers=scan_layers)
    assert tokenizer is None
    ids, mask = _left_padded_batch(np.random.default_rng(0), cfg.vocab_size)
    ours = np.asarray(jax.jit(module.apply)({"params": params}, ids, attention_mask=mask))
    theirs = _hf_logits(hf_model, ids, mask)
    real = mask.astype(bool)
    assert_close(ours[real], theirs[real], tol=1e-4)
    if scan_layers:
        assert params["model"]["layers"]["self_attn"]["q_proj"]["kernel"].shape == (2, 32, 32)
    else:
        assert params["model"]["layers_0"]["self_attn"]["k_proj"]["kernel"].shape == (32, 16)


def test_greedy_generation_matches_transformers(hf_dir):
    name, path, hf_model = hf_dir
    if name != "llama":
        pytest.skip("checked once, on llama")
    module, params, _, _ = load_pretrained(path)
    prompts = [[3, 17, 42, 8, 9], [5, 6], [11, 12, 13, 14, 15, 16, 1]]
    ours = generate(module, params, prompts, Sampling(max_new_tokens=5))
    ids, mask = left_pad(prompts)
    with torch.no_grad():
        theirs = hf_model.generate(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            max_new_tokens=5,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
    np.testing.assert_array_equal(ours, theirs[:, ids.shape[1] :].numpy())
