"""Where parameters live: rules from parameter names to `NamedSharding`s on a mesh.

The mesh (`lorax_ft.parallel.mesh`) has three axes: `data` (batch only), `fsdp` (batch, and parameters
split ZeRO-3 style) and `tensor` (parameters split Megatron style, the feature axes of each
layer). Placement is config data, two kinds of ordered rules:

* *logical rules* `(logical_name, mesh_axis_or_None)` for models whose parameters carry logical
  axis names (`lorax_ft.models.logical_axes(module)`): for each axis of a parameter, the first
  rule for its name whose mesh axes are not yet used by that parameter and divide its size wins;
  a `None` rule, no rule, or no rule that fits leaves the axis replicated.
* *path rules* `(regex, PartitionSpec)` over `/`-joined parameter paths, for models without
  annotations; the first full match wins and overrides the logical rules (`lorax_ft.transform.rules`: a
  rule that matches no parameter is an error). A spec axis that does not divide its dimension
  falls back to replicated.

Mesh axes of size 1 are dropped from the specs, so a spec says what is really split. LoRA factors
are placed from their kernel: A (*stack, in, r) keeps the stacked and input axes' sharding, B
(*stack, r, out) the stacked and output axes'; the rank axis is replicated. A DoRA magnitude
(*stack, out) is placed like B's stacked and output axes.

A quantized kernel (`lorax_ft.quant.QuantizedKernel`, QLoRA's frozen base) is placed as the float
kernel it stands for: its spec comes from the same rules (on the kernel's shape, under the same
path), and each of its arrays (codes, block scales, ...) takes that spec axis by axis, since
every one keeps the kernel's axes; a mesh axis is dropped where the array's dimension does not
divide over it (a block-scale axis of 1, int8's single scale per output). Its sharding is a
`QuantizedKernel` of `NamedSharding`s, a pytree shaped like the kernel's arrays.

>>> mesh = lorax_ft.parallel.mesh.make_mesh(lorax_ft.parallel.mesh.fsdp_tensor(tensor=2))   # doctest: +SKIP
>>> shardings = variable_shardings(
...     {"params": params, "lora": adapters}, mesh, logical_axes=logical_axes(module))  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lorax_ft.quant.kernel import QuantizedKernel, is_quantized
from lorax_ft.transform import lora, paths
from lorax_ft.transform.lora import Factors, KernelLayout
from lorax_ft.transform.rules import Rules

PyTree = Any
MeshAxes = str | tuple[str, ...] | None
LogicalRule = tuple[str, MeshAxes]
PathRule = tuple[str, P]

FSDP_RULES: tuple[LogicalRule, ...] = (("embed", "fsdp"),)
"""ZeRO-3: every parameter with a model-width axis is split over `fsdp`."""
TENSOR_RULES: tuple[LogicalRule, ...] = (
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("vocab", "tensor"),
)
"""Megatron: feed-forward, attention-head and vocabulary axes are split over `tensor`."""
DEFAULT_RULES: tuple[LogicalRule, ...] = (
    ("layers", None),  # the stacked layer axis of scanned models; no pipeline axis
    ("labels", None),  # classifier outputs: a handful
    *FSDP_RULES,
    *TENSOR_RULES,
)
"""FSDP plus tensor parallelism; on a mesh where `fsdp` or `tensor` is 1 those rules do nothing."""


# ------------------------------------------------------------------------------------------------
# One parameter


def axes_tuple(axes: MeshAxes) -> tuple[str, ...]:
    """The mesh axes one spec entry names: None -> (), 'fsdp' -> ('fsdp',), a tuple as is."""
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def _entry(axes: Sequence[str]) -> MeshAxes:
    return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def _check_axes(axes: tuple[str, ...], mesh: Mesh, where: str) -> None:
    missing = [a for a in axes if a not in mesh.shape]
    if missing:
        raise ValueError(f"{where} names mesh axes {missing}; the mesh has {tuple(mesh.shape)}")


def logical_to_spec(
    shape: Sequence[int], logical: P, rules: Sequence[LogicalRule], mesh: Mesh
) -> P:
    """The mesh `PartitionSpec` of one parameter from its logical axis names.

    >>> logical_to_spec((64, 128), P("embed", "mlp"), DEFAULT_RULES, mesh)   # doctest: +SKIP
    PartitionSpec('fsdp', 'tensor')
    """
    names = tuple(logical)
    if len(names) > len(shape):
        raise ValueError(f"logical axes {logical} have more entries than the shape {shape}")
    names += (None,) * (len(shape) - len(names))
    used: set[str] = set()
    out = []
    for size, name in zip(shape, names, strict=True):
        chosen: tuple[str, ...] = ()
        for rule_name, rule_axes in rules if name is not None else ():
            if rule_name != name:
                continue
            axes = axes_tuple(rule_axes)
            _check_axes(axes, mesh, f"logical rule {(rule_name, rule_axes)!r}")
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
            if used & set(axes) or size % math.prod(mesh.shape[a] for a in axes):
                continue  # taken by another axis of this parameter, or does not divide it
            chosen = axes
            break
        used |= set(chosen)
        out.append(_entry(chosen))
    return P(*out)


def fit_spec(shape: Sequence[int], spec: P, mesh: Mesh) -> P:
    """`spec` padded to `shape`'s rank, with size-1 mesh axes dropped and axes that do not divide
    their dimension replicated."""
    entries = tuple(spec)
    if len(entries) > len(shape):
        raise ValueError(f"partition spec {spec} has more entries than the shape {shape}")
    entries += (None,) * (len(shape) - len(entries))
    out = []
    for size, entry in zip(shape, entries, strict=True):
        axes = axes_tuple(entry)
        _check_axes(axes, mesh, f"partition spec {spec}")
        axes = tuple(a for a in axes if mesh.shape[a] > 1)
        out.append(None if size % math.prod(mesh.shape[a] for a in axes) else _entry(axes))
    return P(*out)


def quantized_specs(kernel: QuantizedKernel, spec: P, mesh: Mesh) -> QuantizedKernel:
    """The spec of each array of a quantized kernel placed as its float kernel's `spec`.

    Every array keeps the kernel's axes, so each takes `spec` axis by axis (`fit_spec`). Where
    an array's dimension does not divide over its mesh axis (a block-scale axis of 1 or of
    inputs / 64, 4-bit codes' halved blocked axis), that mesh axis moves to the first output
    dimension of the array (after the blocked axis: never a stacked-layer axis, which a layer
    scan slices) that is not split and divides, else the array is replicated along it: SmolLM2's NF4 block scales (9, 576) under 8-way FSDP split their 576 outputs instead
    of being whole on every device. Here: codes (32, 256), one block scale (1, 256).

    >>> q = lorax_ft.quant.quantize_kernel(jnp.ones((64, 256)), "nf4")   # doctest: +SKIP
    >>> quantized_specs(q, P("fsdp", "tensor"), mesh)                   # doctest: +SKIP
    QuantizedKernel(values=P('fsdp', 'tensor'), scales=P(None, 'tensor'), ...)
    """
    outputs = kernel.ndim + kernel.axis + 1  # the first axis after the blocked one
    return jax.tree.map(lambda x: _moved_spec(tuple(x.shape), spec, mesh, outputs), kernel)


def _moved_spec(shape: tuple[int, ...], spec: P, mesh: Mesh, outputs: int) -> P:
    """`fit_spec`, each mesh axis it had to drop moved to a free output axis that divides."""
    fitted = list(fit_spec(shape, spec, mesh))
    kept = {a for entry in fitted for a in axes_tuple(entry)}
    wanted = [a for entry in tuple(spec) for a in axes_tuple(entry) if mesh.shape[a] > 1]
    for axis in (a for a in wanted if a not in kept):
        free = (
            i
            for i, size in enumerate(shape)
            if i >= outputs and fitted[i] is None and size > 1 and size % mesh.shape[axis] == 0
        )
        i = next(free, None)
        if i is not None:
            fitted[i] = axis
    return P(*fitted)


def quantized_sharding(kernel: QuantizedKernel, sharding: NamedSharding) -> QuantizedKernel:
    """The `NamedSharding` of each array of `kernel`, from its float kernel's `sharding`."""
    specs = quantized_specs(kernel, sharding.spec, sharding.mesh)
    return jax.tree.map(lambda spec: NamedSharding(sharding.mesh, spec), specs, is_leaf=_is_spec)


def follow_quantized(shardings: PyTree, params: PyTree) -> PyTree:
    """`shardings` of float params, with each kernel `params` holds quantized placed as above.

    For a base loaded into its shardings and then quantized: jit the quantization with
    `out_shardings=follow_quantized(shardings, jax.eval_shape(quantize, params))`, and each
    device computes the codes of its own shard. Leaves already placed as quantized stay.

    >>> quantize = lambda p: lorax_ft.quant.quantize(p, "nf4", layouts)          # doctest: +SKIP
    >>> placed = follow_quantized(shardings, jax.eval_shape(quantize, params))    # doctest: +SKIP
    >>> params = jax.jit(quantize, out_shardings=placed, donate_argnums=0)(params)  # doctest: +SKIP
    """

    def place(leaf, sharding):
        if is_quantized(leaf) and isinstance(sharding, NamedSharding):
            return quantized_sharding(leaf, sharding)
        return sharding

    return jax.tree.map(place, params, shardings, is_leaf=is_quantized)


def kernel_spec(sharding: NamedSharding | QuantizedKernel) -> P:
    """The spec of the kernel that a (possibly quantized) parameter's sharding stands for.

    A quantized kernel's codes keep the kernel's axes, so their spec is the kernel's, but for a
    4-bit blocked axis whose half does not divide over its mesh axes (then replicated).
    """
    return sharding.values.spec if is_quantized(sharding) else sharding.spec


def _is_spec(x) -> bool:
    return isinstance(x, P)


def lora_specs(
    kernel_shape: Sequence[int], kernel_spec: P, factors: Factors, layout: KernelLayout | None
) -> tuple[P, P]:
    """(A's spec, B's spec) for the factors of a kernel placed as `kernel_spec`.

    A (*stack, in, r) keeps the sharding of the kernel's stacked and input axes (several input
    axes merge, major first), B (*stack, r, out) that of its stacked and output axes; the rank
    axis is replicated. `layout` gives the input axes; when it is missing or disagrees with the
    factors' shapes (a `LoRA(in_axes=...)` override) they are read off those shapes.
    """
    kernel_shape = tuple(kernel_shape)
    entries = tuple(kernel_spec) + (None,) * (len(kernel_shape) - len(kernel_spec))
    stack, fan_in = factors.a.ndim - 2, factors.a.shape[-2]
    core = kernel_shape[stack:]
    if layout is not None and layout.stack == stack and math.prod(core[: layout.inputs]) == fan_in:
        inputs = layout.inputs
    else:
        inputs = next(k for k in range(len(core) + 1) if math.prod(core[:k]) == fan_in)
    merged = lambda axes: _entry([a for e in axes for a in axes_tuple(e)])
    stacked = entries[:stack]
    in_axes = merged(entries[stack : stack + inputs])
    out_axes = merged(entries[stack + inputs :])
    return P(*stacked, in_axes, None), P(*stacked, None, out_axes)


# ------------------------------------------------------------------------------------------------
# Pytrees


def _flat_logical(logical_axes: PyTree | None) -> dict[str, P]:
    if logical_axes is None:
        return {}
    leaves = jax.tree_util.tree_flatten_with_path(logical_axes, is_leaf=lambda x: isinstance(x, P))[
        0
    ]
    return {paths.path_str(kp): spec for kp, spec in leaves}


def param_specs(
    params: PyTree,
    mesh: Mesh,
    *,
    logical_axes: PyTree | None = None,
    rules: Sequence[LogicalRule] = DEFAULT_RULES,
    path_rules: Sequence[PathRule] = (),
    check_path_rules: bool = True,
) -> PyTree:
    """A pytree like `params` (arrays or `jax.ShapeDtypeStruct`s) of mesh `PartitionSpec`s.

    Each leaf's spec comes from the first path rule that fully matches its path, else from its
    logical axes through `rules`, else it is replicated. A quantized kernel gets a
    `QuantizedKernel` of specs, one per array (`quantized_specs` of its float kernel's spec).

    Raises:
      RuleError: a path rule that is not a valid regex or (unless `check_path_rules` is False,
        for a table shared by several models) matches no parameter.
    """
    table = Rules(path_rules, what="sharding.path_rules")
    chosen = table.match(paths.flatten(params), check=check_path_rules) if table else {}
    logical = _flat_logical(logical_axes)

    def spec_of(path: str, leaf) -> P:
        shape = tuple(leaf.shape)  # a quantized kernel's: the float kernel's shape
        if chosen.get(path) is not None:
            return fit_spec(shape, chosen[path], mesh)
        if path in logical:
            return logical_to_spec(shape, logical[path], rules, mesh)
        return P()

    def placed(path: str, leaf):
        spec = spec_of(path, leaf)
        return quantized_specs(leaf, spec, mesh) if is_quantized(leaf) else spec

    return paths.map_with_path(placed, params)


def param_shardings(params: PyTree, mesh: Mesh, **rules) -> PyTree:
    """`NamedSharding`s for `params`; keyword arguments as `param_specs`.

    >>> shardings = param_shardings(abstract_params(module), mesh,
    ...                             logical_axes=logical_axes(module))   # doctest: +SKIP
    """
    specs = param_specs(params, mesh, **rules)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=_is_spec)


def lora_shardings(
    adapters: PyTree,
    params: PyTree,
    shardings: PyTree,
    layouts: Mapping[str, KernelLayout] | None = None,
) -> PyTree:
    """`NamedSharding`s for an adapters pytree, derived from its kernels' `shardings`.

    Args:
      adapters: `Factors` nodes at kernel paths (arrays or shapes), from `lora.init`.
      params: the base params (arrays or shapes), for the kernels' shapes.
      shardings: `param_shardings(params, ...)` (a quantized kernel's: a `QuantizedKernel`
        of shardings; its factors are placed from the float kernel's spec, `kernel_spec`).
      layouts: from `lorax_ft.infer_layouts`; optional, the factors' shapes tell the same.

    Returns:
      The adapters' structure with `Factors(a=NamedSharding, b=NamedSharding)` nodes (and
      `magnitude=NamedSharding` for DoRA, B's stacked and output axes).
    """
    layouts = layouts or {}
    flat_params, flat_shardings = paths.flatten(params), paths.flatten(shardings)
    placed = {}
    for path, factors in lora.factors_by_path(adapters).items():
        sharding = flat_shardings[path]
        mesh = sharding.values.mesh if is_quantized(sharding) else sharding.mesh
        a_spec, b_spec = lora_specs(
            flat_params[path].shape, kernel_spec(sharding), factors, layouts.get(path)
        )
        placed[path] = factors.replace(a=NamedSharding(mesh, a_spec), b=NamedSharding(mesh, b_spec))
        if factors.magnitude is not None:
            m_spec = P(*b_spec[:-2], b_spec[-1])
            placed[path] = placed[path].replace(magnitude=NamedSharding(mesh, m_spec))
    return paths.unflatten(placed)


def variable_shardings(
    variables: PyTree,
    mesh: Mesh,
    *,
    layouts: Mapping[str, KernelLayout] | None = None,
    **rules,
) -> PyTree:
    """Shardings of `{"params": params, "lora": adapters}`; other keywords as `param_specs`."""
    params = variables["params"]
    shardings = param_shardings(params, mesh, **rules)
    adapters = lora_shardings(variables["lora"], params, shardings, layouts)
    return {"params": shardings, "lora": adapters}
