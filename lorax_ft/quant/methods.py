"""Quantizing a model's frozen kernels: `quantize(params, "nf4", layouts)` and back.

The int8 and NF4 arithmetic (absmax scales, rounding, NF4's levels) is qwix's
(`qwix.quantize`/`qwix.dequantize`); this module chooses which leaves to quantize and along which
axis, and packs the codes (see `lorax_ft.quant.kernel` for the layout and why).

>>> import jax, jax.numpy as jnp
>>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (128, 32)),
...                     "bias": jnp.zeros(32)}}
>>> q = quantize(params, "nf4")
>>> type(q["dense"]["kernel"]).__name__, q["dense"]["bias"].dtype
('QuantizedKernel', dtype('float32'))
>>> round(bytes_per_param(q["dense"]["kernel"]), 4)
0.5625
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Collection, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import qwix

from lorax_ft.quant.kernel import BLOCK, QuantizedKernel, is_quantized, pack_nibbles
from lorax_ft.transform import paths
from lorax_ft.transform.lora import KernelLayout

PyTree = Any
METHODS = ("none", "int8", "nf4")
"""What `quantize` makes from float kernels (GGUF blocks come as stored: `lorax_ft.quant.gguf`)."""
DOUBLE_QUANT_GROUP = 256  # block scales per float32 scale-of-scales, as bitsandbytes


class QuantizeError(ValueError):
    """A kernel or a method that cannot be quantized as asked."""


def quantize_kernel(
    kernel: jax.Array,
    method: str,
    *,
    stack: int = 0,
    inputs: int | None = None,
    double_quant: bool = False,
) -> QuantizedKernel:
    """One kernel as a `QuantizedKernel`: `int8` per output feature, or `nf4` in blocks of 64.

    Args:
      kernel: a float kernel of shape (*stack, *inputs, *outputs).
      method: "int8" or "nf4".
      stack: leading stacked-layer axes (`nn.scan`): each layer gets its own scales.
      inputs: how many axes after the stack are input axes (default: all but the last).
        NF4 blocks run along the last input axis, which must be a multiple of 64.
      double_quant: NF4 only: store the block scales as int8 codes (QLoRA's double quantization).

    Raises:
      QuantizeError: an unknown method, a blocked axis not a multiple of 64, double_quant
        with int8.
    """
    ndim = kernel.ndim
    inputs = ndim - stack - 1 if inputs is None else inputs
    if not 1 <= inputs < ndim - stack:
        raise QuantizeError(f"a kernel of shape {kernel.shape} has no input axis after {stack}")
    axis = stack + inputs - 1  # the last input axis
    x = kernel.astype(jnp.float32)
    if method == "int8":
        if double_quant:
            raise QuantizeError("double quantization is for nf4's block scales, not int8")
        keep = [a for a in range(ndim) if not stack <= a < stack + inputs]
        q = qwix.quantize(x, jnp.int8, channelwise_axes=keep)
        return QuantizedKernel(
            q.qvalue, q.scale, format="int8", axis=axis - ndim, dtype=kernel.dtype
        )
    if method != "nf4":
        raise QuantizeError(f"quantize method {method!r}; valid: int8, nf4")
    block = BLOCK["nf4"]
    if kernel.shape[axis] % block:
        raise QuantizeError(
            f"a kernel of shape {kernel.shape} has {kernel.shape[axis]} inputs along axis "
            f"{axis}, not a multiple of NF4's block of {block}"
        )
    keep = [a for a in range(ndim) if a != axis]
    q = qwix.quantize(x, "nf4", channelwise_axes=keep, tiled_axes={axis: block})
    values = pack_nibbles(q.qvalue.astype(jnp.uint8), axis, block)
    out = QuantizedKernel(values, q.scale, format="nf4", axis=axis - ndim, dtype=kernel.dtype)
    if double_quant:
        out = _double_quantized(out, stack)
    return out


# Jitted, XLA fuses NF4's nearest-level search (no (elements × 16) intermediate) and runs it
# about 14× faster than op by op; compiled once per kernel shape.
_quantize_jitted = jax.jit(
    quantize_kernel, static_argnames=("method", "stack", "inputs", "double_quant")
)


def _double_quantized(q: QuantizedKernel, stack: int) -> QuantizedKernel:
    """Block scales as int8 codes around their mean, one float32 scale per group of them."""
    scales = q.scales
    ndim, axis = scales.ndim, q.axis % scales.ndim
    per_layer = tuple(range(stack, ndim))
    mean = jnp.mean(scales, axis=per_layer, keepdims=True)
    # A group spans the blocked axis (short: inputs / 64) and a tile of the last axis, so the
    # codes keep the kernel's axes (and its sharding) and a group holds up to 256 scales.
    tile = math.gcd(scales.shape[-1], max(1, DOUBLE_QUANT_GROUP // scales.shape[axis]))
    tiles = {ndim - 1: tile} if ndim - 1 != axis else {}
    keep = [a for a in range(ndim) if a != axis and a not in tiles]
    codes = qwix.quantize(scales - mean, jnp.int8, channelwise_axes=keep, tiled_axes=tiles)
    return q.replace(
        scales=None, scale_codes=codes.qvalue, scale_scales=codes.scale, scale_mean=mean
    )


def quantize(
    params: PyTree,
    method: str,
    layouts: Mapping[str, KernelLayout] | None = None,
    *,
    skip: Collection[str] = (),
    embeddings: bool = False,
    double_quant: bool = False,
) -> PyTree:
    """`params` with the kernels of supported layers replaced by `QuantizedKernel`s.

    Args:
      params: the base params.
      method: "int8", "nf4", or "none" (params returned as they are).
      layouts: `lf.infer_layouts(model, params, *inputs)`: the kernels that supported layers
        read (only those can be dequantized inside their layer call) and their stacked and
        input axes. Without it, every leaf named `kernel` with 2+ axes is taken as a
        (inputs, outputs) Dense kernel.
      skip: paths left as they are (the trainer passes the leaves it trains).
      embeddings: quantize embedding tables too (default: they stay in their dtype).
      double_quant: NF4 with double quantization of the block scales.

    Returns:
      The params, quantized kernels in place (same paths); other leaves are the given arrays.
      A kernel whose last input axis is not a multiple of NF4's block of 64 stays in float,
      with a warning naming it.
    """
    if method not in METHODS:
        raise QuantizeError(f"quantize method {method!r}; valid: {', '.join(METHODS)}")
    if method == "none":
        return params
    flat = paths.flatten(params)
    if layouts is None:
        layouts = {
            p: KernelLayout.default(p, tuple(v.shape))
            for p, v in flat.items()
            if p.rsplit("/", 1)[-1] == "kernel" and getattr(v, "ndim", 0) >= 2
        }
    unfit = []

    def convert(path, leaf):
        layout = layouts.get(path)
        if layout is None or path in skip or is_quantized(leaf):
            return leaf
        if layout.embedding and not embeddings:
            return leaf
        try:
            return _quantize_jitted(
                leaf, method, stack=layout.stack, inputs=layout.inputs, double_quant=double_quant
            )
        except QuantizeError:
            unfit.append(path)
            return leaf

    out = paths.map_with_path(convert, params)
    if unfit:
        warnings.warn(
            f"{len(unfit)} kernels stay unquantized: their last input axis is not a multiple "
            f"of {method}'s block of {BLOCK.get(method)}: {', '.join(unfit[:5])}",
            stacklevel=2,
        )
    return out


def dequantize(params: PyTree, dtype: Any = None) -> PyTree:
    """`params` with every `QuantizedKernel` replaced by the float kernel it stands for."""
    return jax.tree.map(
        lambda x: x.dequantize(dtype) if is_quantized(x) else x, params, is_leaf=is_quantized
    )


def bytes_per_param(leaf: Any) -> float:
    """Bytes held per parameter of a kernel (quantized or not), measured from its arrays."""
    nbytes = leaf.nbytes if is_quantized(leaf) else leaf.size * leaf.dtype.itemsize
    return nbytes / math.prod(leaf.shape)


def quantized_paths(params: PyTree) -> list[str]:
    """The paths of `params` that hold a `QuantizedKernel`."""
    return [p for p, v in paths.flatten(params).items() if is_quantized(v)]
