"""GGUF loading on a tiny file written here: llama.cpp's q/k permutation, names and tokenizer."""

import jax
import numpy as np
import pytest

from lorax_ft.models.gguf_llama import load_gguf

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


def test_tiny_gguf_matches_transformers(tmp_path):
    vocab = ["<s>", *[chr(c) for c in range(ord("a"), ord("z") + 1)], "he", "ll"]
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(vocab),
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
    _write_gguf(tmp_path / "tiny.gguf", hf, vocab)

    module, params, cfg, tokenizer = load_gguf(str(tmp_path / "tiny.gguf"))
    assert cfg.tie_word_embeddings and cfg.kv_heads == KV_HEADS and cfg.rope.theta == 5000.0
    ids = tokenizer.encode("<s>hello").ids
    assert ids == [0, vocab.index("he"), vocab.index("ll"), vocab.index("o")]
    ours = jax.jit(module.apply)({"params": params}, np.array([ids]))
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
