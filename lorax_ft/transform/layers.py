"""The factored LoRA delta of each supported layer kind: scale · up(down(x, A), B).

A `Layer` describes one call of a Flax layer (linen or NNX) well enough to compute the adapter's
contribution from its input without ever forming W + scale · A @ B. The frontends in
`lorax_ft.transform.factored` recognise the layers (`from_linen`, `from_nnx`) and add the delta to the
layer's own output.

Dense-like layers ("dense" kind) compute `down` as one matmul over the flattened input axes, so
several adapters reading the same input can share it: `down(x, concat(A1, A2, ...))`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from lorax_ft.transform import lora
from lorax_ft.transform.lora import Factors, KernelLayout


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
        embedding = self.kind in ("embed", "attend")
        return KernelLayout(0, self.inputs, embedding, kernel_shape=self.kernel_shape)

    @property
    def features(self) -> tuple[int, int]:
        return self.layout.features(self.kernel_shape)

    def accepts(self, factors: Factors) -> bool:
        """Whether `factors` were made for this kernel's split into inputs and outputs."""
        fan_in, fan_out = self.features
        r = factors.rank
        fits = factors.a.shape == (fan_in, r) and factors.b.shape == (r, fan_out)
        return fits and (not factors.dora or factors.magnitude.shape == (fan_out,))

    def group_key(self, factors: Factors) -> tuple | None:
        """Adapters with equal keys reading the same input can share one x·[A1 A2 ...] matmul."""
        if self.kind != "dense" or factors.dropout:
            return None
        return (self.contract, self.features[0], self.dtype, self.precision)

    @property
    def out_dims(self) -> tuple[int, ...]:
        return tuple(self.kernel_shape[self.inputs :])

    def rows_first(self, x) -> bool:
        """Whether axis 0 of the input `x` stays axis 0 of x·A (a per-example mask needs it)."""
        if self.kind == "dense":
            return 0 not in self.contract
        if self.kind == "einsum":
            (lhs, _), (k_in, _), _, _ = _einsum_parts(self.einsum)
            return lhs[0] not in k_in
        # embed: ids (batch, ...); attend: (batch, ..., features); conv: (batch, *spatial, in).
        least = {"embed": 1, "attend": 2, "conv": len(self.kernel_shape)}[self.kind]
        return x.ndim >= least

    def dense_deltas(
        self,
        x,
        factors: Sequence[Factors],
        out_dims: Sequence[tuple[int, ...]],
        rows: jax.Array | None = None,
    ):
        """scale_i · x·A_i·B_i for adapters reading the same input x of a dense-kind layer.

        Args:
          x: the layer input.
          factors: one or more adapters whose kernels contract the same axes of x.
          out_dims: each adapter's kernel output dims, to shape its delta like its layer output.
          rows: a mixed batch's (x.shape[0], Σ ranks) 0/1 mask: the rank columns that each
            example uses (`rows_first(x)` must hold); None: all of them.
        """
        dtype = self.dtype or jnp.result_type(x, factors[0].a)
        rest = [i for i in range(x.ndim) if i not in self.contract]
        x = jnp.transpose(x, (*rest, *self.contract))
        lead = x.shape[: len(rest)]
        x2 = x.reshape((math.prod(lead), -1)).astype(dtype)
        a = jnp.concatenate([f.a for f in factors], axis=-1).astype(dtype)
        bs = tuple((f.scale * f.b).astype(dtype) for f in factors)
        rows = None if rows is None else rows.astype(dtype)
        deltas = _low_rank(x2, a, bs, self.precision, rows)
        return [d.reshape((*lead, *dims)) for d, dims in zip(deltas, out_dims, strict=True)]

    def delta(self, x: jax.Array, factors: Factors, rows: jax.Array | None = None) -> jax.Array:
        """scale · x·A·B for one adapter (dropout, if any, is applied to x by the caller).

        `rows`: a mixed batch's per-example mask of rank columns, as for `dense_deltas`.
        """
        # The scale goes on the small B, never on a (tokens × features) activation.
        dtype = self.dtype or jnp.result_type(x, factors.a)
        a, b = factors.a.astype(dtype), (factors.scale * factors.b).astype(dtype)
        mm = functools.partial(jnp.matmul, precision=self.precision)
        mask = functools.partial(_mask_rows, rows)
        if self.kind == "dense":
            return self.dense_deltas(x, [factors], [self.out_dims], rows)[0]
        if self.kind == "embed":
            return mm(mask(jnp.take(a, x, axis=0)), b)
        if self.kind == "attend":  # x @ (A·B).T = (x @ B.T) @ A.T
            return mm(mask(mm(x.astype(dtype), b.T)), a.T)
        if self.kind == "conv":
            xa = self.conv(x.astype(dtype), a.reshape((*self.kernel_shape[:-1], -1)))
            return mm(mask(xa), b)
        if self.kind == "einsum":
            (lhs, out), (k_in, k_out), keep, r = _einsum_parts(self.einsum)
            a = a.reshape((*self.kernel_shape[: self.inputs], -1))
            b = b.reshape((-1, *self.out_dims))
            xa = jnp.einsum(
                f"{lhs},{k_in}{r}->{keep}{r}", x.astype(dtype), a, precision=self.precision
            )
            xa = mask(xa)
            return jnp.einsum(f"{keep}{r},{r}{k_out}->{out}", xa, b, precision=self.precision)
        raise ValueError(f"unknown layer kind {self.kind!r}")

    def dora(self, y, delta, kernel, bias, factors: Factors) -> jax.Array:
        """A DoRA layer's output from the base layer's output `y` and the LoRA `delta`.

        PEFT's `DoraLinearLayer.forward`, with n = ‖W + s·A·B‖ per output feature computed
        factored and held constant: y + (m/n − 1)·(y − bias) + (m/n)·delta, i.e. the layer
        with kernel m·(W + s·A·B)/n. Dense kind only (`LayerCalls` refuses the others).

        Args:
          y: the layer's own output, bias included.
          delta: s·x·A·B shaped like `y`.
          kernel: the kernel as the layer reads it (stacked axes sliced off).
          bias: the bias the layer added, or None.
          factors: the DoRA adapter (its `magnitude` set).
        """
        ratio = factors.magnitude.astype(jnp.float32) / lora.dora_norm(kernel, factors)
        ratio = ratio.reshape(self.out_dims)
        base = y.astype(jnp.float32)
        if bias is not None:
            base = base - bias.astype(jnp.float32).reshape(self.out_dims)
        return (y + ((ratio - 1.0) * base + ratio * delta)).astype(y.dtype)


def _low_rank(x, a, bs, precision, rows=None):
    """(x·A ⊙ rows)[:, block i]·B_i for each i: x (N, in), A (in, Σr), B_i (r_i, out_i).

    `rows` (batch, Σr), or None (all ones), masks the rank columns per example, the N rows of
    x being batch-major (N = batch × tokens per example).
    """
    return _masked_low_rank(x, a, bs, rows, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _masked_low_rank(x, a, bs, rows, precision):
    return _low_rank_fwd(x, a, bs, rows, precision)[0]


def _low_rank_fwd(x, a, bs, rows, precision):
    xa = _mask_rows(rows, jnp.matmul(x, a, precision=precision), flat=True)
    outs = tuple(
        jnp.matmul(xa_i, b, precision=precision)
        for xa_i, b in zip(_blocks(xa, bs), bs, strict=True)
    )
    return outs, (x, a, bs, rows, xa)


def _low_rank_bwd(precision, residuals, grads):
    # Every product is written as a plain (M, K) @ (K, N) matmul, transposing only rank-sized
    # operands: autodiff would contract over the token axis of the big activations instead,
    # which XLA:CPU runs several times slower than the row-major form.
    x, a, bs, rows, xa = residuals
    mm = functools.partial(jnp.matmul, precision=precision)
    d_bs = tuple(mm(xa_i.T, g) for xa_i, g in zip(_blocks(xa, bs), grads, strict=True))
    d_xa = jnp.concatenate([mm(g, b.T) for g, b in zip(grads, bs, strict=True)], axis=-1)
    # A masked-out rank column contributed nothing to the row, so it passes no gradient back.
    d_xa = _mask_rows(rows, d_xa, flat=True)
    d_a = mm(d_xa.T, x).T
    d_x = mm(d_xa, a.T)
    d_rows = None if rows is None else jnp.zeros_like(rows)  # an input-derived 0/1 mask
    return d_x, d_a, d_bs, d_rows


_masked_low_rank.defvjp(_low_rank_fwd, _low_rank_bwd)


def _mask_rows(rows, xa, flat: bool = False):
    """xa (batch, ..., Σr) times the per-example mask `rows` (batch, Σr); None: xa as it is.

    `flat`: xa is (batch × tokens, Σr), batch-major.
    """
    if rows is None:
        return xa
    rows = rows.astype(xa.dtype)
    if flat:
        n, rank = rows.shape
        return (xa.reshape((n, -1, rank)) * rows[:, None, :]).reshape(xa.shape)
    return xa * rows.reshape((rows.shape[0], *(1,) * (xa.ndim - 2), rows.shape[1]))


def _blocks(xa, bs):
    """Splits the columns of x·A into each adapter's rank-sized block."""
    ends = itertools.accumulate(b.shape[0] for b in bs)
    return [xa[:, end - b.shape[0] : end] for b, end in zip(bs, ends, strict=True)]


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
    # ConvLocal shares `_Conv.__call__` but has one kernel per output position.
    return (
        module.feature_group_count == 1
        and module.mask is None
        and getattr(module, "shared_weights", True)
    )


# The operations a layer may take as an argument in place of JAX's own. The delta is computed
# with plain matmuls, so a layer that brings its own (quantised, fp8, ...) is not recognised.
_OP_FIELDS = (
    "dot_general",
    "dot_general_cls",
    "conv_general_dilated",
    "conv_general_dilated_cls",
    "einsum_op",
)


def _default_ops(cls: type) -> dict[str, Any]:
    if dataclasses.is_dataclass(cls):  # linen: the module's dataclass fields
        fields = {f.name: f.default for f in dataclasses.fields(cls)}
    else:  # NNX: the constructor's defaults
        fields = {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items()}
    return {name: fields[name] for name in _OP_FIELDS if name in fields}


def _uses_own_ops(module: Any, known: type) -> bool:
    return any(getattr(module, n, d) is not d for n, d in _DEFAULT_OPS[known].items())


LINEN_LAYERS = (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv, nn.Embed)
"""linen layer classes whose own `__call__` (and `Embed.attend`) the factored path computes."""
NNX_LAYERS = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv, nnx.Embed)
"""NNX layer classes whose own `__call__` (and `Embed.attend`) the factored path computes."""
_DEFAULT_OPS = {cls: _default_ops(cls) for cls in (*LINEN_LAYERS, *NNX_LAYERS)}


def unwrapped(cls: type, method: str):
    # linen wraps every module method; interceptors see the function underneath.
    fn = getattr(cls, method)
    return getattr(fn, "__wrapped__", fn)


LINEN_IMPLEMENTATIONS: dict[Any, tuple[type, str]] = {
    unwrapped(cls, method): (cls, method)
    for cls in LINEN_LAYERS
    for method in ("__call__", "attend")
    if hasattr(cls, method)
}
"""The functions that implement the supported linen layers -> (layer class, method).

A layer call is recognised by the function that runs, not by the module's class: a subclass
whose `__call__` scales `super().__call__(x)` is recognised once, at the inner call, where the
delta belongs; one whose `__call__` computes something of its own is not recognised at all.
"""


def from_linen(
    module: nn.Module, known: type, method: str, x: jax.Array, kernel_shape
) -> Layer | None:
    """The `Layer` for a call of `known.method` (a supported linen implementation) on `module`.

    None when that call cannot be computed factored (custom ops, feature groups, batch dims).
    """
    return _layer(module, known, method, x, tuple(kernel_shape))


def nnx_known_class(cls: type) -> type | None:
    """The supported NNX layer class that `cls` is or derives from, if any."""
    return next((c for c in cls.__mro__ if c in NNX_LAYERS), None)


def from_nnx(module: nnx.Module, known: type, method: str, x: jax.Array) -> Layer | None:
    """The `Layer` for a call of `known.method` (a supported NNX layer) on `module`, or None."""
    weight = module.embedding if known is nnx.Embed else module.kernel
    return _layer(module, known, method, x, tuple(weight.shape))


def _no_batch_dims(batch_dims) -> bool:
    # `batch_dims=0` is a batch axis (dimension 0), not "none": compare with the empty tuple.
    return ((batch_dims,) if isinstance(batch_dims, int) else tuple(batch_dims)) == ()


def _layer(module, known: type, method: str, x, shape: tuple[int, ...]) -> Layer | None:
    if _uses_own_ops(module, known):
        return None
    kw = {"dtype": getattr(module, "dtype", None), "precision": getattr(module, "precision", None)}
    if known in (nn.Embed, nnx.Embed):
        return Layer("attend" if method == "attend" else "embed", shape, 1, **kw)
    if known in (nn.Dense, nnx.Linear):
        return _dense_layer(-1, x.ndim, shape, **kw)
    if known is nn.DenseGeneral and _no_batch_dims(module.batch_dims):
        return _dense_layer(module.axis, x.ndim, shape, **kw)
    if known is nnx.LinearGeneral and not module.batch_axis:
        return _dense_layer(module.axis, x.ndim, shape, **kw)
    if known in (nn.Einsum, nnx.Einsum):
        return _einsum_layer(module.einsum_str, shape, **kw)
    if known in (nn.Conv, nnx.Conv) and _conv_supported(module):
        return Layer("conv", shape, len(shape) - 1, conv=_linen_conv(module, shape), **kw)
    return None


def kernel_name(module: Any) -> str:
    """The name of a layer's weight: `embedding` for embeddings, `kernel` for the rest."""
    return "embedding" if isinstance(module, nn.Embed | nnx.Embed) else "kernel"
