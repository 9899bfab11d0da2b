"""LoRA as a pure transform over params pytrees: init, merge and unmerge of low-rank factors.

For a kernel W adapted with rank r, the factors are A (in_features × r) and B (r × out_features)
and the adapted kernel is W + scale · A @ B, reshaped back to W's shape. A kernel's axes split
into *stacked* layer axes (a `nn.scan`-ed layer stack puts a leading layer axis on every
kernel), *input* axes and *output* axes; the factors keep the stacked axes in front:
A (*stack, in_features, r), B (*stack, r, out_features).

The adapters pytree mirrors params but holds only the adapted kernels, each as a `Factors`
node; the base params are never copied or changed.

>>> import jax, jax.numpy as jnp
>>> from lorax_ft.transform.spec import LoRA, Spec
>>> params = {"dense": {"kernel": jnp.ones((16, 32)), "bias": jnp.zeros(32)}}
>>> adapters = init(jax.random.key(0), params, Spec([(".*/kernel", LoRA(rank=4))]))
>>> adapters["dense"]["kernel"].a.shape, adapters["dense"]["kernel"].b.shape
((16, 4), (4, 32))
>>> merged = merge(params, adapters)   # equal to params while B is zero

DoRA (`LoRA(rank, dora=True)`) adds a trainable magnitude m (*stack, out_features), initialised
to the column norms of W (as in_features × out_features); the adapted kernel is
m · (W + scale · A @ B) / ‖W + scale · A @ B‖ per output feature, the norm held constant in the
backward pass (PEFT's `.detach()`). `dora_norm` computes that norm factored.

>>> spec = Spec([(".*/kernel", LoRA(rank=4, dora=True))])
>>> adapters = init(jax.random.key(0), params, spec)
>>> adapters["dense"]["kernel"].magnitude.shape    # ‖W‖ per output feature: 4.0 each
(32,)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from lorax_ft.quant.kernel import is_quantized
from lorax_ft.transform import inits, paths
from lorax_ft.transform.spec import LoRA, Spec, SpecError, parse_init

PyTree = Any


@struct.dataclass
class Factors:
    """The trainable factors of one adapted kernel; `scale` and `dropout` are static.

    `magnitude` is DoRA's learned magnitude per output feature (None for plain LoRA).
    """

    a: jax.Array  # (*stack, in_features, rank)
    b: jax.Array  # (*stack, rank, out_features)
    scale: float = struct.field(pytree_node=False, default=1.0)
    dropout: float = struct.field(pytree_node=False, default=0.0)
    magnitude: jax.Array | None = None  # DoRA: (*stack, out_features)

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    @property
    def dora(self) -> bool:
        return self.magnitude is not None

    def delta(self, shape, dtype) -> jax.Array:
        """scale · A @ B as a kernel of `shape`, computed in float32, returned in `dtype`."""
        product = jnp.matmul(
            self.a.astype(jnp.float32),
            self.b.astype(jnp.float32),
            precision=jax.lax.Precision.HIGHEST,
        )
        return (self.scale * product).reshape(shape).astype(dtype)


@dataclasses.dataclass(frozen=True)
class KernelLayout:
    """How a kernel's axes split: `stack` leading layer axes, then `inputs` input axes, then outputs.

    `embedding` marks lookup tables, which PEFT initialises the other way round (A zero, B random).
    `kernel_shape`, when known (layouts from `infer_layouts` have it), is the kernel's shape as
    its layer sees it, without the stacked axes: it ties the layout to the model it came from.
    """

    stack: int = 0
    inputs: int = 1
    embedding: bool = False
    kernel_shape: tuple[int, ...] | None = None

    @classmethod
    def default(cls, path: str, shape: tuple[int, ...]) -> KernelLayout:
        """Without knowledge of the layer: all axes but the last are inputs (Dense, Embed)."""
        return cls(stack=0, inputs=len(shape) - 1, embedding=path.endswith("embedding"))

    def features(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """(in_features, out_features) of a kernel of `shape`."""
        core = shape[self.stack :]
        return math.prod(core[: self.inputs]), math.prod(core[self.inputs :])

    def check(self, path: str, shape: tuple[int, ...]) -> None:
        """Raises SpecError unless this layout can describe the kernel `path` of `shape`."""
        core = shape[self.stack :]
        if self.kernel_shape is not None and tuple(core) != tuple(self.kernel_shape):
            raise SpecError(
                f"layout for {path!r} was inferred for a kernel of shape {self.kernel_shape} "
                f"(after {self.stack} stacked axes), but params have {shape}: layouts from "
                "another model? Infer them from this one: lf.infer_layouts(model, params, x)"
            )
        if not 1 <= self.inputs < len(core):
            raise SpecError(
                f"layout for {path!r} (stack={self.stack}, inputs={self.inputs}) does not fit "
                f"its kernel of shape {shape}: it needs at least one input and one output axis"
            )


def init(
    rng: jax.Array,
    params: PyTree,
    spec: Spec,
    layouts: Mapping[str, KernelLayout] | None = None,
    *,
    dtype: Any = jnp.float32,
) -> PyTree:
    """Creates the factors of every kernel that `spec` adapts (PEFT's initialisation).

    Args:
      rng: a JAX PRNG key; each kernel's factors use `fold_in(rng, index)` in path order.
      params: the base params pytree (not changed; only shapes are read, except for the kernels
        of DoRA rules, whose column norms are the initial magnitudes).
      spec: the rules; leaves with a `LoRA` action are adapted.
      layouts: per-path `KernelLayout`, usually from `lorax_ft.transform.factored.infer_layouts`; needed
        for stacked (scanned) kernels and multi-axis kernels (an attention projection of shape
        (d, heads, head_dim)): such a target without a layout is refused rather than guessed.
        2-D kernels without a layout are (inputs, outputs); a rule's `LoRA(in_axes=...)`
        overrides the input axes. Layouts are checked against `params`.
      dtype: dtype of the factors (float32 keeps training precise with bfloat16 base weights).

    Returns:
      A nested dict mirroring `params`, holding a `Factors` node at each adapted kernel's path
      (with `magnitude` = ‖W‖ per output feature, in `dtype`, for DoRA rules).

    Raises:
      SpecError: a rank outside [1, min(in_features, out_features)]; a layout missing for a
        kernel with more than two axes, or not fitting `params`; DoRA on an embedding table;
        an init that changes the base (PiSSA, OLoRA: use `initialize`).
    """
    _check_spec(spec)
    changing = [p for p, a in spec.lora_targets(params).items() if a.changes_base]
    if changing:
        raise SpecError(
            f"LoRA init for {changing[0]!r} changes the base kernel (PiSSA/OLoRA leave the "
            "residual W − s·A·B): use lora.initialize(rng, params, spec, layouts), which returns "
            "the new base params with the adapters"
        )
    return initialize(rng, params, spec, layouts, dtype=dtype)[1]


def initialize(
    rng: jax.Array,
    params: PyTree,
    spec: Spec,
    layouts: Mapping[str, KernelLayout] | None = None,
    *,
    dtype: Any = jnp.float32,
) -> tuple[PyTree, PyTree]:
    """LoRA as a transform of the params: `(base params, adapters)` for every init.

    As `init`, which it generalises: with the PiSSA and OLoRA inits (`LoRA(init="pissa")`,
    `"pissa_niter_<N>"`, `"olora"`, see `lorax_ft.transform.inits`) the factors start at a
    rank-r part of W and the base kernel becomes the residual W − s·A·B, so that
    `merge(base, adapters)` is W at step 0 and W + ΔW after training. Other kernels (and all
    kernels for the other inits) are the given arrays, not copies.

    Returns:
      (base, adapters): the params with residual kernels where an init changed them, in their
      dtype, and the adapters as `init` makes them.

    >>> import jax, jax.numpy as jnp
    >>> from lorax_ft.transform.spec import LoRA, Spec
    >>> w = jax.random.normal(jax.random.key(0), (16, 8))
    >>> base, adapters = initialize(jax.random.key(1), {"k": w}, Spec([("k", LoRA(4, init="pissa"))]))
    >>> bool(jnp.allclose(merge(base, adapters)["k"], w, atol=1e-5))   # W at step 0
    True
    """
    _check_spec(spec)
    layouts = dict(layouts or {})
    flat = paths.flatten(params)
    unknown = sorted(set(layouts) - set(flat))
    if unknown:
        raise SpecError(
            f"layouts name {unknown[:3]}, which are not params of this model (layouts from "
            "another model? Infer them from this one: lf.infer_layouts(model, params, x))"
        )
    out, residuals = {}, {}
    for index, (path, action) in enumerate(spec.lora_targets(params).items()):
        key, shape = jax.random.fold_in(rng, index), tuple(flat[path].shape)
        layout = _layout(path, shape, layouts.get(path), action)
        factors = _init_factors(key, path, shape, layout, action, dtype)
        if action.changes_base:
            factors, residuals[path] = _principal(key, path, flat[path], layout, action, factors)
        if action.dora:
            if layout.embedding:
                raise SpecError(
                    f"LoRA(dora=True) targets the embedding table {path!r}: DoRA is supported "
                    "on dense layers only; give embeddings a rule without dora"
                )
            w = _columns(flat[path], factors)  # W = residual + s·A·B: the same norms
            factors = factors.replace(magnitude=jnp.sqrt(_column_sq_norms(w)).astype(dtype))
        out[path] = factors
    if residuals:
        params = paths.map_with_path(lambda p, x: residuals.get(p, x), params)
    return params, paths.unflatten(out)


def _check_spec(spec) -> None:
    if not isinstance(spec, Spec):
        raise SpecError(
            f"lora.init takes a Spec, got {type(spec).__name__}: wrap rules as Spec([...]) or "
            "Spec({regex: action})"
        )


def _principal(key, path: str, w, layout: KernelLayout, action: LoRA, factors: Factors):
    """PiSSA/OLoRA factors (in the dtype `factors` has) and the residual kernel of `w`."""
    if layout.embedding:
        raise SpecError(
            f"LoRA(init={action.init!r}) targets the embedding table {path!r}: PiSSA and OLoRA "
            "decompose dense kernels only; give embeddings a rule with init='kaiming'"
        )
    method, niter = parse_init(action.init)
    columns = w.reshape((*w.shape[: layout.stack], *layout.features(w.shape)))
    if method == "pissa":
        rng = None if niter is None else key
        a, b, residual = inits.pissa(columns, action.rank, action.scale, niter=niter, rng=rng)
    else:
        a, b, residual = inits.olora(columns, action.rank, action.scale)
    factors = factors.replace(a=a.astype(factors.a.dtype), b=b.astype(factors.b.dtype))
    return factors, residual.reshape(w.shape)


def _layout(path: str, shape, layout: KernelLayout | None, action: LoRA) -> KernelLayout:
    if layout is None:
        if len(shape) > 2 and action.in_axes is None:
            # A stacked or multi-axis kernel has several splits into inputs and outputs, and
            # only its layer knows which one it computes: never guess.
            raise SpecError(
                f"LoRA target {path!r} has shape {shape}: which axes are stacked layers, inputs "
                "and outputs depends on its layer; pass layouts=lf.infer_layouts(model, params, "
                "x) to lora.init, or give the rule LoRA(rank, in_axes=...) (the way for a layer "
                "lorax_ft does not compute factored, such as ConvTranspose: it is then merged)"
            )
        layout = KernelLayout.default(path, shape)
    if action.in_axes is not None:
        layout = dataclasses.replace(layout, inputs=action.in_axes, kernel_shape=None)
    layout.check(path, shape)
    return layout


def _init_factors(rng, path, shape, layout: KernelLayout, action: LoRA, dtype) -> Factors:
    fan_in, fan_out = layout.features(shape)
    if not 1 <= action.rank <= min(fan_in, fan_out):
        raise SpecError(
            f"LoRA rank {action.rank} for {path!r} (shape {shape}: {fan_in} in × {fan_out} out "
            f"features) must be in [1, {min(fan_in, fan_out)}]"
        )
    stack = shape[: layout.stack]
    a_shape, b_shape = (*stack, fan_in, action.rank), (*stack, action.rank, fan_out)
    if layout.embedding:
        # PEFT's Embedding: A zero, B standard normal (the delta starts at zero either way).
        a = jnp.zeros(a_shape, dtype)
        b = jax.random.normal(rng, b_shape, dtype)
    else:
        if action.init == "gaussian":
            a = jax.random.normal(rng, a_shape, dtype) / action.rank
        else:
            # torch's kaiming_uniform_(a=√5) on a (rank, fan_in) weight: U(±1/√fan_in).
            bound = 1.0 / math.sqrt(fan_in)
            a = jax.random.uniform(rng, a_shape, dtype, -bound, bound)
        b = jnp.zeros(b_shape, dtype)
    return Factors(a=a, b=b, scale=action.scale, dropout=action.dropout)


def merge(params: PyTree, adapters: PyTree) -> PyTree:
    """params with every adapted kernel replaced by W + scale · A @ B (in W's dtype).

    A DoRA adapter's kernel becomes m · (W + scale · A @ B) / ‖W + scale · A @ B‖ per output
    feature, the norm under `stop_gradient` as in training, so the merged model has the
    factored one's gradients too. Jit-able; float32 accumulation whatever the kernel's dtype.
    """
    return _apply_delta(params, adapters, sign=1.0)


def unmerge(params: PyTree, adapters: PyTree) -> PyTree:
    """Undoes `merge`: W' - scale · A @ B.

    Raises:
      ValueError: a DoRA adapter: the merged kernel's column norms are m whatever W was, so
        W cannot be recovered from it; keep the base params instead.
    """
    dora = sorted(p for p, f in factors_by_path(adapters).items() if f.dora)
    if dora:
        raise ValueError(
            f"cannot unmerge the DoRA adapters {dora[:3]}: the merged kernel's column norms are "
            "the magnitudes whatever the base kernel was, so it cannot be recovered; keep the "
            "base params and merge them again instead"
        )
    return _apply_delta(params, adapters, sign=-1.0)


def _apply_delta(params, adapters, sign):
    factors = factors_by_path(adapters)
    missing = sorted(set(factors) - set(paths.flatten(params)))
    if missing:
        raise KeyError(f"adapters for {missing[:5]} have no kernel in params")

    def update(path, w):
        if path not in factors:
            return w
        if is_quantized(w):
            raise ValueError(
                f"cannot merge the adapter of {path!r} into a quantized kernel (its codes "
                "cannot hold W + s·A·B): merge into the dequantized params, "
                "lf.merge(lorax_ft.quant.dequantize(params, dtype), adapters)"
            )
        f = factors[path]
        if f.dora:
            return _dora_merged(w, f)
        delta = f.delta(w.shape, jnp.float32)
        return (w.astype(jnp.float32) + sign * delta).astype(w.dtype)

    return paths.map_with_path(update, params)


def _dora_merged(w: jax.Array, f: Factors) -> jax.Array:
    columns = _columns(w, f)
    adapted = columns + f.delta(columns.shape, jnp.float32)
    norm = jax.lax.stop_gradient(jnp.sqrt(_column_sq_norms(adapted)))
    scale = f.magnitude.astype(jnp.float32) / norm
    return (scale[..., None, :] * adapted).reshape(w.shape).astype(w.dtype)


def _columns(w: jax.Array, f: Factors) -> jax.Array:
    """The kernel as (*stack, in_features, out_features), in float32."""
    return w.astype(jnp.float32).reshape((*f.a.shape[:-2], f.a.shape[-2], f.b.shape[-1]))


def _column_sq_norms(columns: jax.Array) -> jax.Array:
    return jnp.sum(jnp.square(columns), axis=-2)


def dora_norm(kernel: jax.Array, factors: Factors) -> jax.Array:
    """‖W + s·A·B‖ per output feature (*stack, out_features), without forming W + s·A·B.

    ‖W_j + s·(A·B)_j‖² = ‖W_j‖² + 2s·Σ_k (WᵀA)[j,k]·B[k,j] + s²·B[:,j]ᵀ(AᵀA)B[:,j]: W's
    column norms and one (out × in)·(in × r) product; float32, highest precision.
    Not differentiated (DoRA holds the norm constant): the result is under `stop_gradient`.

    >>> f = Factors(a=jnp.ones((3, 1)), b=jnp.ones((1, 2)), scale=2.0)
    >>> dora_norm(jnp.zeros((3, 2)), f)    # ‖2·(1, 1, 1)‖ per column
    Array([3.4641016, 3.4641016], dtype=float32)
    """
    w = _columns(kernel, factors)
    a, b = factors.a.astype(jnp.float32), factors.b.astype(jnp.float32)
    mm = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)
    cross = jnp.sum(mm("...io,...ir->...ro", w, a) * b, axis=-2)  # (WᵀA)ᵀ ⊙ B, summed over r
    quad = jnp.sum(mm("...ir,...is,...so->...ro", a, a, b) * b, axis=-2)
    s = factors.scale
    squared = _column_sq_norms(w) + 2.0 * s * cross + (s * s) * quad
    # Cancellation can leave a tiny negative square where the adapted column is ~0.
    return jax.lax.stop_gradient(jnp.sqrt(jnp.maximum(squared, 0.0)))


def factors_by_path(adapters: PyTree) -> dict[str, Factors]:
    """`{kernel path: Factors}` of an adapters pytree."""
    nodes = jax.tree_util.tree_flatten_with_path(
        adapters, is_leaf=lambda x: isinstance(x, Factors)
    )[0]
    return {paths.path_str(kp): f for kp, f in nodes if isinstance(f, Factors)}


def count(tree: PyTree) -> int:
    """Number of scalars in a pytree (params, adapters, optimizer state).

    A quantized kernel counts as the kernel it stands for.
    """
    leaves = jax.tree.leaves(tree, is_leaf=is_quantized)
    return sum(math.prod(x.shape) for x in leaves if hasattr(x, "shape"))


def nbytes(tree: PyTree) -> int:
    """Bytes held by the arrays of a pytree (a quantized kernel's codes and scales)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))
