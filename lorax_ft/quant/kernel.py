"""A quantized kernel as pytree data: integer codes and their scales, with the kernel's shape.

`QuantizedKernel` stands in a params pytree where a float kernel stood, under the same path. Every
array it holds keeps the kernel's number of axes (block scales keep the blocked axis, shortened),
so a layer stack (`nn.scan`, `nnx.scan`) slices it exactly as it slices a kernel, and a kernel's
`PartitionSpec` applies to each of its arrays. It is frozen by construction: its codes are
integers and no gradient is ever taken with respect to it.

Formats (all blocks run along one axis, `axis`, the kernel's last input axis):

* `int8`: one float32 scale per output feature (a block is the whole input), x = q · s.
* `nf4`: QLoRA's 4-bit NormalFloat, blocks of 64, x = NF4[q] · s; with double quantization
  the block scales are themselves int8 codes around their mean (`scale_codes`, `scale_scales`,
  `scale_mean`), as bitsandbytes' `compress_statistics`.
* `q4_0`, `q4_1`, `q8_0`: llama.cpp's GGUF blocks of 32 exactly as a file stores them: float16
  scales `d` (and `m`), codes x = (q − 8)·d, q·d + m, and q·d.

Two 4-bit codes share a byte, as GGUF packs them: in each block of B codes, byte j holds code j
in its low nibble and code j + B/2 in its high one. This is written here (not left to JAX's
`uint4`) because XLA:CPU keeps a `uint4` array at one byte per code, twice the memory.

Why by hand: qwix (used for the int8 and NF4 arithmetic in `lorax_ft.quant.methods`) has no
GGUF blocks, no packed 4-bit storage and no double quantization; the `gguf` package has the
block layouts but computes in NumPy, outside a jitted step.

>>> import jax, jax.numpy as jnp
>>> from lorax_ft.quant import quantize_kernel
>>> w = jax.random.normal(jax.random.key(0), (128, 64))
>>> q = quantize_kernel(w, "nf4")
>>> q.shape, q.values.dtype, q.values.shape
((128, 64), dtype('uint8'), (64, 64))
>>> float(jnp.abs(q.dequantize() - w).max()) < 0.5
True
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx, struct

FORMATS = ("int8", "nf4", "q4_0", "q4_1", "q8_0")
FOUR_BIT = ("nf4", "q4_0", "q4_1")
BLOCK = {"nf4": 64, "q4_0": 32, "q4_1": 32, "q8_0": 32}
"""Codes per block along the blocked axis (int8: the whole input, one scale per output)."""


@struct.dataclass
class QuantizedKernel:
    """A frozen kernel stored as integer codes and block scales (see the module docstring).

    Attributes:
      values: int8 codes (int8, q8_0), or uint8 with two 4-bit codes a byte (nf4, q4_*):
        the kernel's shape, the blocked axis halved for 4-bit codes.
      scales: one scale per block (the blocked axis divided by the block size, 1 for int8),
        float32, float16 as GGUF stores it, or None where `scale_codes` hold them.
      offsets: q4_1's per-block minimum `m` (float16); None otherwise.
      scale_codes, scale_scales, scale_mean: NF4 double quantization: the block scales as
        int8 codes, their float32 scale per group, and the mean that was subtracted.
      format: one of `FORMATS`.
      axis: the blocked axis, counted from the end (negative), so stacking keeps it valid.
      dtype: the float dtype the kernel dequantizes to (the kernel's own dtype).
    """

    values: jax.Array
    scales: jax.Array | None
    offsets: jax.Array | None = None
    scale_codes: jax.Array | None = None
    scale_scales: jax.Array | None = None
    scale_mean: jax.Array | None = None
    format: str = struct.field(pytree_node=False, default="int8")
    axis: int = struct.field(pytree_node=False, default=-2)
    dtype: Any = struct.field(pytree_node=False, default=jnp.float32)

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the kernel it stands for."""
        shape = list(self.values.shape)
        if self.format in FOUR_BIT:
            shape[self.axis] *= 2
        return tuple(shape)

    @property
    def ndim(self) -> int:
        return self.values.ndim

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of every array held (codes, scales, offsets, double-quantization data)."""
        return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(self))

    def block_scales(self) -> jax.Array:
        """The float32 scale of every block (decoding double quantization, if any)."""
        if self.scale_codes is None:
            return self.scales.astype(jnp.float32)
        codes = qwix.QArray(self.scale_codes, self.scale_scales, qtype=jnp.int8)
        return qwix.dequantize(codes) + self.scale_mean

    def codes(self) -> jax.Array:
        """The integer code of every element, the kernel's shape (4-bit codes unpacked)."""
        if self.format not in FOUR_BIT:
            return self.values
        axis = self.axis % self.ndim
        half = BLOCK[self.format] // 2
        v = _split(self.values, axis, half)  # (..., blocks, half, ...)
        codes = jnp.concatenate([v & 0x0F, v >> 4], axis=axis + 1)
        return _merge(codes, axis)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """The float kernel these codes stand for, in `dtype` (default: the kernel's dtype).

        Jit-able; inside a layer call XLA fuses it into the matmul that reads it.
        """
        dtype = dtype or self.dtype
        axis = self.axis % self.ndim
        codes = self.codes()
        scales = self.block_scales()
        if self.format == "int8":
            return (codes.astype(jnp.float32) * scales).astype(dtype)
        if self.format == "nf4":
            levels = qwix.dequantize(
                qwix.QArray(codes.astype(jnp.uint4), jnp.ones((1,) * codes.ndim), qtype="nf4")
            )
        elif self.format == "q4_0":
            levels = codes.astype(jnp.float32) - 8.0
        else:  # q4_1, q8_0
            levels = codes.astype(jnp.float32)
        blocks = _split(levels, axis, BLOCK[self.format])
        out = blocks * jnp.expand_dims(scales, axis + 1)
        if self.format == "q4_1":
            out = out + jnp.expand_dims(self.offsets.astype(jnp.float32), axis + 1)
        return _merge(out, axis).astype(dtype)


# Lets an NNX Variable hold a QuantizedKernel as its value (as qwix does for its QArray).
nnx.register_data_type(QuantizedKernel)


def is_quantized(x: Any) -> bool:
    """Whether `x` is a `QuantizedKernel` (use as `is_leaf=` to keep one whole in a tree map)."""
    return isinstance(x, QuantizedKernel)


def pack_nibbles(codes: np.ndarray | jax.Array, axis: int, block: int):
    """Packs 4-bit codes (the kernel's shape) into bytes along `axis`, GGUF's order per block."""
    xp = np if isinstance(codes, np.ndarray) else jnp
    axis = axis % codes.ndim
    blocks = _split(codes.astype(xp.uint8), axis, block)
    low, high = xp.split(blocks, 2, axis=axis + 1)
    return _merge(low | (high << 4), axis)


def _split(x, axis: int, size: int):
    """(..., n, ...) -> (..., n / size, size, ...) at `axis`."""
    return x.reshape((*x.shape[:axis], x.shape[axis] // size, size, *x.shape[axis + 1 :]))


def _merge(x, axis: int):
    """The inverse of `_split`: (..., a, b, ...) -> (..., a · b, ...) at `axis`."""
    return x.reshape((*x.shape[:axis], x.shape[axis] * x.shape[axis + 1], *x.shape[axis + 2 :]))
