"""Llama-architecture GGUF files (llama.cpp) -> `LlamaForCausalLM` parameters and a tokenizer.

Quantized tensors are dequantized with the `gguf` package, GGUF names are mapped to Hugging Face
ones, and llama.cpp's rotary row permutation of q/k (its `convert_hf_to_gguf.py` interleaves
each head's two rotary halves) is undone, so the HF-layout loader does the rest. Without an
`output.weight` the LM head is tied to the embedding. The tokenizer is rebuilt from the embedded
byte-level BPE vocabulary and merges.

With `gguf_blocks=True` the linear kernels stored as Q4_0, Q4_1 or Q8_0 are not dequantized:
they load as `lorax_ft.quant.QuantizedKernel`s holding the file's blocks byte for byte
(`lorax_ft.quant.gguf`), a QLoRA base exactly as llama.cpp quantized it.

Example:
    >>> module, params, cfg, tokenizer = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
"""

import re
from typing import Any

import jax
import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from lorax_ft.models.abstract import abstract_params
from lorax_ft.models.checkpoint import (
    ModelFileError,
    hf_leaf_names,
    hf_module_name,
    is_stacked,
    load_params,
    read_params,
)
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
    """HF-named, dequantized float32 tensors of a GGUF file (the `read_params` store contract).

    `block_format` and `blocks` give a Q4_0/Q4_1/Q8_0 tensor as its blocks instead.
    """

    def __init__(self, reader: Any, path: str, heads: int, kv_heads: int):
        self.name = path
        self._tensors = {_hf_name(t.name, path): t for t in reader.tensors}
        self.file_of = dict.fromkeys(self._tensors, path)
        self._heads = {"q_proj": heads, "k_proj": kv_heads}

    def block_format(self, key: str) -> str | None:
        """The `QuantizedKernel` format `key` is stored in, or None (absent, or not blocks)."""
        from lorax_ft.quant.gguf import block_format

        tensor = self._tensors.get(key)
        return None if tensor is None else block_format(tensor.tensor_type)

    def blocks(self, key: str, dtype: Any) -> Any:
        """The tensor `key` as a (in, out) `QuantizedKernel` of NumPy arrays, bytes as stored."""
        from lorax_ft.quant.gguf import kernel_from_gguf

        tensor = self._tensors[key]
        proj = key.split(".")[-2]
        rows = None
        if proj in self._heads:  # the same unpermutation as `get`'s, as indices of whole rows
            rows = _unpermute(np.arange(int(tensor.shape[-1])), self._heads[proj])
        return kernel_from_gguf(tensor.data, tensor.tensor_type, dtype=dtype, rows=rows)

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


def load_gguf(
    path: str,
    shardings: Any = None,
    read_weights: bool = True,
    gguf_blocks: bool = False,
    **overrides: Any,
):
    """Loads a llama-architecture GGUF file.

    Args:
      path: the .gguf file.
      shardings: as in `load_pretrained`.
      read_weights: as in `load_pretrained`.
      gguf_blocks: keep every linear kernel (q/k/v/o, gate/up/down, an untied `output.weight`)
        stored as Q4_0, Q4_1 or Q8_0 as a `QuantizedKernel` of the file's blocks (see
        `lorax_ft.quant.gguf`); kernels in other types (F32, F16, K-quants, ...) and the
        token embedding table (also the tied LM head) are dequantized to float as without it.
        A scanned stack (`scan_layers=True`) is kept as blocks only if all its layers share
        one of these types. With `read_weights=False` such a kernel is a `QuantizedKernel` of
        `jax.ShapeDtypeStruct`s.
      **overrides: runtime config fields (dtype, param_dtype, scan_layers, remat).

    Returns:
      `(module, params, config, tokenizer)` as `load_pretrained` does.

    >>> _, params, _, _ = load_gguf("model.Q4_1.gguf", gguf_blocks=True)  # doctest: +SKIP
    >>> params["model"]["layers_0"]["mlp"]["up_proj"]["kernel"].format  # doctest: +SKIP
    'q4_1'
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
    if gguf_blocks:
        params = _load_with_blocks(store, module, cfg, shardings, read_weights)
    else:
        params = load_params(store, module, LLAMA, cfg, shardings, read_weights)
    return module, params, cfg, _tokenizer(reader)


def _load_with_blocks(
    store: GgufTensors, module: Any, cfg: Any, shardings: Any, read_weights: bool
) -> Any:
    """`load_params`, with the kernels stored as GGUF blocks loaded as `QuantizedKernel`s."""
    from lorax_ft.quant.gguf import kernel_shapes

    abstract = abstract_params(module)
    if callable(shardings):
        shardings = shardings(module)
    flat = {_keys(p): x for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    flat_shardings = {}
    if shardings is not None:
        given = jax.tree.structure(abstract).flatten_up_to(shardings)
        flat_shardings = dict(zip(flat, given, strict=True))
    kept = _block_kernels(store, flat, cfg)  # path -> (format, one tensor name per layer)

    def sharding_for(path: tuple[str, ...]) -> Any:
        return flat_shardings.get(path)

    if read_weights:
        blocks = {
            p: _read_blocks(store, p, keys, flat[p], sharding_for(p))
            for p, (_, keys) in kept.items()
        }

        # The rest reads as `load_params` does, the kept kernels left out of it (None where
        # they stood) and their tensors out of the store, so that none is reported unused.
        def without_kept(tree: Any) -> Any:
            return jax.tree_util.tree_map_with_path(
                lambda p, x: None if _keys(p) in kept else x, tree
            )

        rest_store = _Without(store, {k for _, keys in kept.values() for k in keys})
        rest_shardings = None if shardings is None else without_kept(shardings)
        rest = read_params(rest_store, without_kept(abstract), LLAMA, cfg, rest_shardings)
    else:
        blocks = {
            p: _placed(kernel_shapes(flat[p].shape, fmt, flat[p].dtype), sharding_for(p))
            for p, (fmt, _) in kept.items()
        }
        rest = load_params(store, module, LLAMA, cfg, shardings, read_weights=False)
    rest = {_keys(p): x for p, x in jax.tree_util.tree_flatten_with_path(rest)[0]}
    return jax.tree_util.tree_map_with_path(
        lambda p, _: blocks.get(_keys(p), rest.get(_keys(p))), abstract
    )


def _keys(path: Any) -> tuple[str, ...]:
    return tuple(k.key for k in path)


def _block_kernels(store: GgufTensors, flat: dict, cfg: Any) -> dict:
    """`{path: (format, tensor names)}` of the kernels whose tensors are all blocks of one type.

    A scanned stack holds one array per field for all its layers, hence one format.
    """
    kept = {}
    weight = hf_leaf_names("kernel")[0]
    for path, spec in flat.items():
        if path[-1] != "kernel":
            continue
        layers = range(spec.shape[0]) if is_stacked(path, LLAMA, cfg) else [None]
        keys = [f"{hf_module_name(path, LLAMA, i)}.{weight}" for i in layers]
        formats = {store.block_format(k) for k in keys}
        if len(formats) == 1 and None not in formats:
            kept[path] = (formats.pop(), keys)
    return kept


def _read_blocks(
    store: GgufTensors, path: tuple[str, ...], keys: list[str], spec: Any, sharding: Any
) -> Any:
    """One kernel's `QuantizedKernel` (layers stacked in front if `keys` has several), placed."""
    layers = [store.blocks(key, spec.dtype) for key in keys]
    layer_shape = tuple(spec.shape[-2:])
    for key, q in zip(keys, layers, strict=True):
        if q.shape != layer_shape:  # reported as stored, (out, in), as `read_params` does
            raise ModelFileError(
                f"{store.file_of[key]}: tensor {key} has shape {q.shape[::-1]} but the config "
                f"implies {layer_shape[::-1]} (for {'/'.join(path)})"
            )
    if len(spec.shape) > 2:  # a scanned stack: layers in front of every array
        stacked = jax.tree.map(lambda *arrays: np.stack(arrays), *layers)
    else:
        (stacked,) = layers
    return jax.device_put(stacked, _quantized_sharding(stacked, sharding))


def _quantized_sharding(kernel: Any, sharding: Any) -> Any:
    """A sharding per array of `kernel`, placed as its float kernel's `sharding` would be."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        from lorax_ft.parallel.sharding import quantized_sharding

        return quantized_sharding(kernel, sharding)
    return jax.tree.map(lambda _: sharding, kernel)


def _placed(shapes: Any, sharding: Any) -> Any:
    """`kernel_shapes`' structs with the shardings `_quantized_sharding` gives them."""
    placed = _quantized_sharding(shapes, sharding)
    return jax.tree.map(
        lambda s, where: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=where), shapes, placed
    )


class _Without:
    """A store with some of its tensors hidden (the ones loaded as blocks)."""

    def __init__(self, store: Any, hidden: set[str]):
        self._store = store
        self.name = store.name
        self.file_of = {k: v for k, v in store.file_of.items() if k not in hidden}

    def get(self, key: str) -> np.ndarray:
        return self._store.get(key)
