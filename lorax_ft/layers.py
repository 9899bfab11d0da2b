"""The factored LoRA delta of each supported layer kind: scale · up(down(x, A), B).

A `Layer` describes one call of a Flax layer (linen or NNX) well enough to compute the adapter's
contribution from its input without ever forming W + scale · A @ B. The frontends in
`lorax_ft.factored` recognise the layers (`from_linen`, `from_nnx`) and add the delta to the
layer's own output.

Dense-like layers ("dense" kind) compute `down` as one matmul over the flattened input axes, so
several adapters reading the same input can share it: `down(x, concat(A1, A2, ...))`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from lorax_ft.lora import Factors, KernelLayout


@dataclasses.dataclass(frozen=True)
class Layer:
    """One supported layer call, enough to compute its adapter's delta factored.

    Attributes:
      kind: "dense", "conv", "embed" (lookup), "attend" (x @ table.T) or "einsum".
      kernel_shape: the kernel's shape as the layer sees it (stacked axes already sliced off).
      inputs: how many leading kernel axes are input axes.
      contract: dense: the input's axes that the kernel contracts, in kernel order.
      einsum: einsum: the layer's equation.
      conv: conv: `conv(x, kernel)` with the layer's strides, padding and dilations.
      dtype: the layer's compute dtype (None: from the input).
      precision: the layer's matmul precision.
    """

    kind: str
    kernel_shape: tuple[int, ...]
    inputs: int
    contract: tuple[int, ...] = ()
    einsum: str = ""
    conv: Callable[[jax.Array, jax.Array], jax.Array] | None = None
    dtype: Any = None
    precision: Any = None

    @property
    def layout(self) -> KernelLayout:
        return KernelLayout(stack=0, inputs=self.inputs, embedding=self.kind in ("embed", "attend"))

    @property
    def features(self) -> tuple[int, int]:
        return self.layout.features(self.kernel_shape)

    def accepts(self, factors: Factors) -> bool:
        """Whether `factors` were made for this kernel's split into inputs and outputs."""
        fan_in, fan_out = self.features
        r = factors.rank
        return factors.a.shape == (fan_in, r) and factors.b.shape == (r, fan_out)

    def group_key(self, factors: Factors) -> tuple | None:
        """Adapters with equal keys reading the same input can share one `down` matmul."""
        if self.kind != "dense" or factors.dropout:
            return None
        return (self.contract, self.features[0], self.dtype, self.precision)

    def down(self, x: jax.Array, a: jax.Array) -> jax.Array:
        """x → x·A, the rank-r intermediate (A may hold several adapters' columns)."""
        dtype = self.dtype or jnp.result_type(x, a)
        x, a = x.astype(dtype), a.astype(dtype)
        if self.kind == "dense":
            rest = [i for i in range(x.ndim) if i not in self.contract]
            x = jnp.transpose(x, (*rest, *self.contract))
            x = x.reshape((*x.shape[: len(rest)], -1))
            return jnp.matmul(x, a, precision=self.precision)
        if self.kind == "conv":
            return self.conv(x, a.reshape((*self.kernel_shape[:-1], a.shape[-1])))
        if self.kind == "einsum":
            (lhs, _), (kin, _), keep, rank = _einsum_parts(self.einsum)
            a = a.reshape((*self.kernel_shape[: self.inputs], a.shape[-1]))
            return jnp.einsum(f"{lhs},{kin}{rank}->{keep}{rank}", x, a, precision=self.precision)
        raise ValueError(f"layer kind {self.kind!r} has no separate down projection")

    def up(self, xa: jax.Array, b: jax.Array) -> jax.Array:
        """x·A → x·A·B, shaped like the layer's output."""
        b = b.astype(xa.dtype)
        if self.kind == "einsum":
            (_, out), (_, kout), keep, rank = _einsum_parts(self.einsum)
            b = b.reshape((b.shape[0], *self.kernel_shape[self.inputs :]))
            return jnp.einsum(f"{keep}{rank},{rank}{kout}->{out}", xa, b, precision=self.precision)
        y = jnp.matmul(xa, b, precision=self.precision)
        if self.kind == "dense":
            y = y.reshape((*xa.shape[:-1], *self.kernel_shape[self.inputs :]))
        return y

    def delta(self, x: jax.Array, factors: Factors) -> jax.Array:
        """scale · x·A·B for one adapter (dropout, if any, is applied to x by the caller)."""
        if self.kind == "embed":
            xa = jnp.take(factors.a, x, axis=0)
            return factors.scale * self.up(xa.astype(self.dtype or xa.dtype), factors.b)
        if self.kind == "attend":
            # x @ (A·B).T = (x @ B.T) @ A.T
            dtype = self.dtype or jnp.result_type(x, factors.a)
            xb = jnp.matmul(x.astype(dtype), factors.b.T.astype(dtype), precision=self.precision)
            return factors.scale * jnp.matmul(
                xb, factors.a.T.astype(dtype), precision=self.precision
            )
        return factors.scale * self.up(self.down(x, factors.a), factors.b)


def _einsum_parts(equation: str):
    """Splits `lhs,kernel->out` into the kernel's input and output letters and the kept letters."""
    lhs, rest = equation.replace(" ", "").split(",")
    kernel, out = rest.split("->")
    used = set(lhs + kernel + out)
    rank = next(c for c in "rzyxwvutsqponmlkjihgfedcba" if c not in used)
    k_in = "".join(c for c in kernel if c in lhs and c not in out)
    k_out = "".join(c for c in kernel if c in out and c not in lhs)
    keep = "".join(c for c in lhs if c not in k_in)
    return (lhs, out), (k_in, k_out), keep, rank


def _einsum_layer(equation: str, kernel_shape, **kw) -> Layer | None:
    if "..." in equation.split("->")[0].split(",")[1]:
        return None
    (_, _), (k_in, k_out), _, _ = _einsum_parts(equation)
    kernel = equation.replace(" ", "").split(",")[1].split("->")[0]
    if kernel != k_in + k_out:  # batch-like kernel axes, or inputs and outputs interleaved
        return None
    return Layer("einsum", tuple(kernel_shape), len(k_in), einsum=equation, **kw)


def _dense_layer(axis, ndim_x: int, kernel_shape, **kw) -> Layer:
    axis = (axis,) if isinstance(axis, int) else tuple(axis)
    contract = tuple(a % ndim_x for a in axis)
    return Layer("dense", tuple(kernel_shape), len(contract), contract=contract, **kw)


def _linen_conv(module, kernel_shape) -> Callable:
    def conv(x, kernel):
        layer = nn.Conv(
            features=kernel.shape[-1],
            kernel_size=tuple(kernel_shape[:-2]),
            strides=module.strides,
            padding=module.padding,
            input_dilation=module.input_dilation,
            kernel_dilation=module.kernel_dilation,
            use_bias=False,
            dtype=module.dtype,
            precision=module.precision,
        )
        return layer.apply({"params": {"kernel": kernel}}, x)

    return conv


def _conv_supported(module) -> bool:
    return module.feature_group_count == 1 and module.mask is None


def from_linen(module: nn.Module, method: str, x: jax.Array, kernel_shape) -> Layer | None:
    """The `Layer` for a linen module call, or None when it is not a supported layer."""
    kw = {"dtype": getattr(module, "dtype", None), "precision": getattr(module, "precision", None)}
    kind = type(module)
    if method == "__call__":
        if issubclass(kind, nn.Dense):
            return _dense_layer(-1, x.ndim, kernel_shape, **kw)
        if issubclass(kind, nn.DenseGeneral) and not module.batch_dims:
            return _dense_layer(module.axis, x.ndim, kernel_shape, **kw)
        if issubclass(kind, nn.Einsum):
            return _einsum_layer(module.einsum_str, kernel_shape, **kw)
        if issubclass(kind, nn.Conv) and _conv_supported(module):
            conv = _linen_conv(module, kernel_shape)
            return Layer("conv", tuple(kernel_shape), len(kernel_shape) - 1, conv=conv, **kw)
        if issubclass(kind, nn.Embed):
            return Layer("embed", tuple(kernel_shape), 1, **kw)
    if method == "attend" and issubclass(kind, nn.Embed):
        return Layer("attend", tuple(kernel_shape), 1, **kw)
    return None


def from_nnx(module: nnx.Module, method: str, x: jax.Array) -> Layer | None:
    """The `Layer` for an NNX module call, or None when it is not a supported layer."""
    kw = {"dtype": getattr(module, "dtype", None), "precision": getattr(module, "precision", None)}
    if isinstance(module, nnx.Embed):
        shape = module.embedding.shape
        return Layer("attend" if method == "attend" else "embed", tuple(shape), 1, **kw)
    if method != "__call__":
        return None
    shape = tuple(module.kernel.shape)
    if isinstance(module, nnx.Linear):
        return _dense_layer(-1, x.ndim, shape, **kw)
    if isinstance(module, nnx.LinearGeneral) and not module.batch_axis:
        return _dense_layer(module.axis, x.ndim, shape, **kw)
    if isinstance(module, nnx.Einsum):
        return _einsum_layer(module.einsum_str, shape, **kw)
    if isinstance(module, nnx.Conv) and _conv_supported(module):
        return Layer("conv", shape, len(shape) - 1, conv=_linen_conv(module, shape), **kw)
    return None


NNX_LAYERS = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv, nnx.Embed)
"""NNX layer classes whose calls the factored path computes directly."""


def kernel_name(module: Any) -> str:
    """The name of a layer's weight: `embedding` for embeddings, `kernel` for the rest."""
    return "embedding" if isinstance(module, nn.Embed | nnx.Embed) else "kernel"
