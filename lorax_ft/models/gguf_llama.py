"""Llama-architecture GGUF files (llama.cpp) -> `LlamaForCausalLM` parameters and a tokenizer.

Quantized tensors are dequantized with the `gguf` package, GGUF names are mapped to Hugging Face
ones, and llama.cpp's rotary row permutation of q/k (its `convert_hf_to_gguf.py` interleaves
each head's two rotary halves) is undone, so the HF-layout loader does the rest. Without an
`output.weight` the LM head is tied to the embedding. The tokenizer is rebuilt from the embedded
byte-level BPE vocabulary and merges.

Example:
    >>> module, params, cfg, tokenizer = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
"""

import re
from typing import Any

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from lorax_ft.models.checkpoint import ModelFileError, load_params
from lorax_ft.models.families import LLAMA
from lorax_ft.models.hf_config import llama_from_hf

GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file

_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# llama.cpp's `tokenizer.ggml.pre` names -> the HF pre-tokenizers they stand for.
_PRE_TOKENIZERS = {
    "gpt2": lambda: [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)],
    # SmolLM: every digit alone, then GPT-2's byte-level split.
    "smollm": lambda: [
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ],
}
# llama.cpp token types: 3 = control, 4 = user defined; both are special (never split).
_SPECIAL_TYPES = (3, 4)


def _hf_name(gguf_name: str, path: str) -> str:
    match = re.fullmatch(r"(?:blk\.(\d+)\.)?(\w+)\.(weight|bias)", gguf_name)
    if not match or match.group(2) not in _NAMES:
        raise ValueError(f"{path}: unsupported GGUF tensor {gguf_name}")
    layer, part, leaf = match.groups()
    prefix = "" if layer is None else f"model.layers.{layer}."
    return f"{prefix}{_NAMES[part]}.{leaf}"


def _unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute(w, n_head)`: back to HF's half-split rotary rows."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


class GgufTensors:
    """HF-named, dequantized float32 tensors of a GGUF file (the `read_params` store contract)."""

    def __init__(self, reader: Any, path: str, heads: int, kv_heads: int):
        self.name = path
        self._tensors = {_hf_name(t.name, path): t for t in reader.tensors}
        self.file_of = dict.fromkeys(self._tensors, path)
        self._heads = {"q_proj": heads, "k_proj": kv_heads}

    def get(self, key: str) -> np.ndarray:
        import gguf  # deferred: only GGUF users pay for the import

        tensor = self._tensors[key]
        # A plain copy first: dequantizing straight from the memmap view is several times slower.
        data = np.array(tensor.data)
        array = gguf.quants.dequantize(data, tensor.tensor_type).astype(np.float32)
        array = array.reshape(tuple(reversed([int(d) for d in tensor.shape])))
        proj = key.split(".")[-2]
        if proj in self._heads:
            array = _unpermute(array, self._heads[proj])
        return array


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _tokenizer(reader: Any) -> Tokenizer:
    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise ValueError("only byte-level BPE ('gpt2') GGUF tokenizers are supported")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tokenizer = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    pre = _field(reader, "tokenizer.ggml.pre", "gpt2")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(
            f"GGUF pre-tokenizer {pre!r} is not supported; valid: {sorted(_PRE_TOKENIZERS)}"
        )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(_PRE_TOKENIZERS[pre]())
    tokenizer.decoder = decoders.ByteLevel()
    special = [t for t, kind in zip(tokens, types, strict=True) if kind in _SPECIAL_TYPES]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return tokenizer


def load_gguf(path: str, shardings: Any = None, read_weights: bool = True, **overrides: Any):
    """Loads a llama-architecture GGUF file.

    Args:
      path: the .gguf file.
      shardings: as in `load_pretrained`.
      read_weights: as in `load_pretrained`.
      **overrides: runtime config fields (dtype, param_dtype, scan_layers, remat).

    Returns:
      `(module, params, config, tokenizer)` as `load_pretrained` does.
    """
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError) as e:  # what a damaged file raises
        raise ModelFileError(
            f"{path} is not a readable GGUF file ({e}); re-download or re-convert it"
        ) from e
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; valid: llama")
    names = {t.name for t in reader.tensors}

    def meta(key, default=None):
        return _field(reader, f"llama.{key}", default)

    heads = int(meta("attention.head_count"))
    kv_heads = int(meta("attention.head_count_kv", heads))
    hidden = int(meta("embedding_length"))
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    hf = {
        "model_type": "llama",
        "vocab_size": int(meta("vocab_size", int(embed.shape[1]))),
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": int(meta("rope.dimension_count", hidden // heads)),
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(meta("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
    }
    cfg = llama_from_hf(hf, **overrides)
    module = LLAMA.build(cfg, hf)
    store = GgufTensors(reader, path, heads, kv_heads)
    params = load_params(store, module, LLAMA, cfg, shardings, read_weights)
    return module, params, cfg, _tokenizer(reader)
