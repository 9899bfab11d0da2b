"""GGUF Q4_0 / Q4_1 / Q8_0 tensors as `QuantizedKernel`s holding the file's bytes unchanged.

A GGUF linear weight is stored (out, in) row-major, each row cut into blocks of 32 inputs; a
block is a small header of float16 fields (`d`, and Q4_1's `m`) followed by its codes (16 bytes
of packed nibbles, or 32 int8). This module moves those bytes into a `QuantizedKernel` laid out
as the JAX kernel (in, out): codes and float16 fields are copied bit for bit, only their order
changes (headers split from codes, then transposed so blocks run along the input axis, -2).
The nibble packing inside a block is already the one `QuantizedKernel` uses, so codes bytes
are not touched. A row permutation of the weight (llama.cpp's rotary interleaving of q/k) acts
on output rows, whole blocks at a time, so it is applied to every array alike (`rows=`).

Why by hand: the `gguf` package knows the block sizes (`gguf.GGML_QUANT_SIZES`, used here)
and dequantizes, but in NumPy only, outside a jitted step; no JAX library reads GGUF blocks.
Only the byte rearrangement is written here; block and type sizes come from `gguf`.

>>> import gguf, numpy as np
>>> w = np.random.default_rng(0).standard_normal((8, 64), dtype=np.float32)  # (out, in)
>>> data = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_1)          # as a file holds it
>>> q = kernel_from_gguf(data, gguf.GGMLQuantizationType.Q4_1)
>>> q.shape, q.format, q.values.shape, q.scales.dtype
((64, 8), 'q4_1', (32, 8), dtype('float16'))
>>> expected = gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q4_1).T
>>> bool((np.asarray(q.dequantize()) == expected).all())
True
"""

from __future__ import annotations

from typing import Any

import gguf
import jax
import jax.numpy as jnp
import numpy as np

from lorax_ft.quant.kernel import BLOCK, FOUR_BIT, QuantizedKernel

_FORMATS = {
    gguf.GGMLQuantizationType.Q4_0: "q4_0",
    gguf.GGMLQuantizationType.Q4_1: "q4_1",
    gguf.GGMLQuantizationType.Q8_0: "q8_0",
}
# The float16 fields at the head of each block, in file order (ggml's block_q4_0, block_q4_1,
# block_q8_0 structs); the codes follow them.
_HEADER = {"q4_0": ("d",), "q4_1": ("d", "m"), "q8_0": ("d",)}
_F16 = np.dtype("<f2")  # GGUF's byte order (little-endian, as the `gguf` package reads it)


def block_format(tensor_type: Any) -> str | None:
    """The `QuantizedKernel` format of a GGUF tensor type, or None if it is not kept as blocks.

    >>> block_format(gguf.GGMLQuantizationType.Q8_0), block_format(gguf.GGMLQuantizationType.F16)
    ('q8_0', None)
    """
    return _FORMATS.get(gguf.GGMLQuantizationType(int(tensor_type)))


def kernel_from_gguf(
    data: np.ndarray, tensor_type: Any, *, dtype: Any = jnp.float32, rows: Any = None
) -> QuantizedKernel:
    """One GGUF linear weight's blocks as a (in, out) `QuantizedKernel`, bytes as stored.

    Args:
      data: the tensor's bytes as `gguf.GGUFReader` gives them (`tensor.data`, uint8 of shape
        (out, bytes per row)) or as `gguf.quants.quantize` returns them.
      tensor_type: its `gguf.GGMLQuantizationType`: Q4_0, Q4_1 or Q8_0.
      dtype: the float dtype the kernel dequantizes to.
      rows: optional index array of output rows: output j of the kernel is row `rows[j]` of
        the file (a permutation such as llama.cpp's q/k rotary interleaving undone).

    Returns:
      A `QuantizedKernel` of NumPy arrays, blocks along axis -2: `values` (in/2, out) uint8
      (Q4_*) or (in, out) int8 (Q8_0), `scales` (and Q4_1's `offsets`) (in/32, out) float16.

    Raises:
      ValueError: another tensor type, or data that is not one 2-D weight of whole blocks.

    >>> data = gguf.quants.quantize(np.ones((4, 32), np.float32), gguf.GGMLQuantizationType.Q8_0)
    >>> q = kernel_from_gguf(data, gguf.GGMLQuantizationType.Q8_0)
    >>> q.values.shape, q.values.dtype, int(q.values[0, 0]), q.scales.shape
    ((32, 4), dtype('int8'), 127, (1, 4))
    """
    fmt = block_format(tensor_type)
    qtype = gguf.GGMLQuantizationType(int(tensor_type))
    if fmt is None:
        raise ValueError(f"GGUF type {qtype.name} is not kept as blocks; valid: Q4_0, Q4_1, Q8_0")
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    header = 2 * len(_HEADER[fmt])
    code_bytes = block // 2 if fmt in FOUR_BIT else block
    # The layout below is ggml's block structs; gguf's sizes must agree with it.
    assert block == BLOCK[fmt] and header + code_bytes == type_size, (qtype.name, block, type_size)
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] % type_size:
        raise ValueError(
            f"GGUF {qtype.name} data of shape {data.shape} and dtype {data.dtype} is not one 2-D "
            f"weight of {type_size}-byte blocks (uint8, (out, blocks per row · {type_size}))"
        )
    out = data.shape[0]
    blocks = data.reshape(out, data.shape[1] // type_size, type_size)
    if rows is not None:
        blocks = blocks[np.asarray(rows)]  # whole rows, hence whole blocks, move
    fields = np.ascontiguousarray(blocks[..., :header]).view(_F16)  # (out, blocks, fields)
    codes = blocks[..., header:].reshape(out, -1)  # (out, in/2) nibbles or (out, in) bytes
    if fmt == "q8_0":
        codes = codes.view(np.int8)

    def kernel_layout(x: np.ndarray) -> np.ndarray:  # (out, n) -> (n, out)
        return np.ascontiguousarray(x.T)

    return QuantizedKernel(
        values=kernel_layout(codes),
        scales=kernel_layout(fields[..., 0]),
        offsets=kernel_layout(fields[..., 1]) if fmt == "q4_1" else None,
        format=fmt,
        axis=-2,
        dtype=dtype,
    )


def kernel_shapes(
    shape: tuple[int, ...], fmt: str, dtype: Any = jnp.float32, sharding: Any = None
) -> QuantizedKernel:
    """A `QuantizedKernel` of `jax.ShapeDtypeStruct`s: `kernel_from_gguf`'s arrays, by shape.

    What a GGUF-block kernel of `shape` holds (layers stacked in front if `shape` has them),
    computed without reading anything, for `read_weights=False`.

    Args:
      shape: the kernel's shape, (..., in, out).
      fmt: "q4_0", "q4_1" or "q8_0".
      dtype: the float dtype the kernel dequantizes to.
      sharding: optional sharding given to every array (a single device, say; for a mesh,
        `lorax_ft.parallel.sharding.quantized_sharding` gives each array its own).

    >>> q = kernel_shapes((30, 576, 192), "q4_1")
    >>> q.shape, q.values.shape, q.offsets.shape
    ((30, 576, 192), (30, 288, 192), (30, 18, 192))
    """
    if fmt not in _HEADER:
        raise ValueError(f"GGUF block format {fmt!r}; valid: {', '.join(_HEADER)}")
    *lead, inputs, outputs = shape

    def struct(rows: int, array_dtype: Any) -> jax.ShapeDtypeStruct:
        array_shape = (*lead, rows, outputs)
        return jax.ShapeDtypeStruct(array_shape, array_dtype, sharding=sharding)

    four_bit = fmt in FOUR_BIT
    values = struct(inputs // 2 if four_bit else inputs, np.uint8 if four_bit else np.int8)
    blocks = inputs // BLOCK[fmt]
    offsets = struct(blocks, np.float16) if fmt == "q4_1" else None
    return QuantizedKernel(
        values, struct(blocks, np.float16), offsets, format=fmt, axis=-2, dtype=dtype
    )
