"""The factored forward pass: run an unmodified Flax model with LoRA adapters, as base(x) + s·(x·A)·B.

`factored(model)` turns a model into a function `(params, adapters, *inputs) -> outputs` that
never forms W + s·A·B. The base kernels are read only by the layers' own forward computation, so
under `jax.grad` with respect to the adapters no gradient matmul for a frozen kernel is computed:
that saves about a third of a full fine-tuning step's FLOPs.

* Flax linen (`nn.Module`): an `nn.intercept_methods` interceptor adds the delta to every call of
  nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv and nn.Embed (lookup and `attend`). The factors
  travel inside the params collection next to their kernel, so `nn.scan`/`nn.vmap` layer stacks
  slice stacked factors exactly as they slice the kernels.
* Flax NNX (`nnx.Module`): the model is split into (graph, params); each call merges a fresh copy
  whose nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv and nnx.Embed layers add the delta.
* Any other function `fn(params, *inputs)`: the adapters are merged into the kernels first
  (correct, slower), with a warning naming the paths.

Adapters on kernels that the model uses in some other way fall back to the merged path the same
way, with the same warning. Before each traced call a shape-only pass (`jax.eval_shape`) finds
which layers read which adapters, and which adapted layers read the *same* input (q/k/v, or
gate/up): those share one x·[A1 A2 A3] matmul, in the forward and the backward pass.

>>> import flax.linen as nn, jax, jax.numpy as jnp
>>> from lorax_ft import lora
>>> from lorax_ft.spec import LoRA, Spec
>>> model = nn.Dense(8)
>>> x = jnp.ones((2, 4))
>>> params = model.init(jax.random.key(0), x)["params"]
>>> adapters = lora.init(jax.random.key(1), params, Spec([("kernel", LoRA(rank=2))]))
>>> y = factored(model)(params, adapters, x)   # == model.apply({'params': params}, x) at init
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
import zlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from lorax_ft import layers, lora, paths
from lorax_ft.layers import Layer
from lorax_ft.lora import Factors, KernelLayout
from lorax_ft.mesh import BATCH_AXES

PyTree = Any
# The factors of kernel `k` travel in the params collection as a sibling leaf `k@lora`.
_FACTORS_SUFFIX = "@lora"


@dataclasses.dataclass
class _Call:
    """What the shape-only discovery pass saw of one adapted-layer call."""

    path: str
    layer: Layer
    layout: KernelLayout
    x: Any
    applied: bool
    group_key: tuple | None


class _Pass:
    """One forward pass: applies adapter deltas, shares down-projections, or records (discovery).

    Lives for a single call of the wrapped model, so it holds no state between calls.
    """

    def __init__(self, groups: dict[str, tuple] | None, rng: jax.Array | None):
        self.groups = groups or {}
        self.rng = rng
        self.recording = groups is None
        self.calls: list[_Call] = []
        self._shared: dict[tuple, tuple[Any, dict[str, jax.Array]]] = {}
        self._dropout_calls = 0

    def record(self, path, layer, stack, x, factors) -> bool:
        """Notes a layer call; returns whether its adapter (if any) is applied factored."""
        applied = factors is not None and layer.accepts(factors)
        if self.recording:
            layout = dataclasses.replace(layer.layout, stack=stack)
            key = layer.group_key(factors) if applied else None
            self.calls.append(_Call(path, layer, layout, x, applied, key))
        return applied

    def delta(self, path: str, layer: Layer, x, factors: Factors, lookup: Callable) -> jax.Array:
        """scale · x·A·B for the adapter at `path`; `lookup(path)` gives a group member's factors."""
        group = self.groups.get(path)
        if group is None:
            return layer.delta(self._dropout(path, x, factors), factors)
        # The first member to run computes the whole group's deltas from one x·[A1 A2 ...].
        entry = self._shared.get(group)
        if entry is None or entry[0] is not x:
            member_paths = [p for p, _ in group]
            deltas = layer.dense_deltas(
                x, [lookup(p) for p in member_paths], [dims for _, dims in group]
            )
            entry = self._shared[group] = (x, dict(zip(member_paths, deltas, strict=True)))
        return entry[1][path]

    def _dropout(self, path, x, factors: Factors):
        if not factors.dropout or self.rng is None or _is_token_ids(x):
            return x
        self._dropout_calls += 1
        key = jax.random.fold_in(self.rng, zlib.crc32(path.encode()) + self._dropout_calls)
        keep = jax.random.bernoulli(key, 1.0 - factors.dropout, x.shape)
        return jnp.where(keep, x / (1.0 - factors.dropout), 0).astype(x.dtype)

    def groups_found(self) -> dict[str, tuple[tuple[str, tuple[int, ...]], ...]]:
        """Adapted layers that read the same input object: path -> ((path, out_dims), ...)."""
        seen: dict[str, int] = {}
        for c in self.calls:
            seen[c.path] = seen.get(c.path, 0) + 1
        buckets: dict[tuple, list] = {}
        for c in self.calls:
            # A kernel used more than once (weight sharing) is never grouped, and only siblings
            # are: inside an nn.scan body their sliced factors are read through the parent scope.
            if c.group_key is not None and seen[c.path] == 1:
                parent = c.path.rsplit("/", 2)[0] if c.path.count("/") >= 2 else ""
                key = (id(c.x), parent, c.group_key)
                buckets.setdefault(key, []).append((c.path, c.layer.out_dims))
        groups = {}
        for members in buckets.values():
            if len(members) > 1:
                for p, _ in members:
                    groups[p] = tuple(members)
        return groups

    def applied_paths(self) -> set[str]:
        return {c.path for c in self.calls if c.applied}

    def layouts(self) -> dict[str, KernelLayout]:
        return {c.path: c.layout for c in self.calls}


def split_over_batch(y: jax.Array) -> jax.Array:
    """`y` with its leading (batch) dimension split over the current mesh's batch axes.

    A no-op unless traced under a mesh (`jax.sharding.use_abstract_mesh`, as the sharded steps
    do) with `data`/`fsdp` axes that divide it; the other dimensions are left to XLA.
    """
    mesh = jax.sharding.get_abstract_mesh()
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
    if not axes or y.ndim == 0 or y.shape[0] % math.prod(mesh.shape[a] for a in axes):
        return y
    spec = P(axes if len(axes) > 1 else axes[0], *[P.UNCONSTRAINED] * (y.ndim - 1))
    return jax.lax.with_sharding_constraint(y, spec)


def _is_token_ids(x) -> bool:
    return jnp.issubdtype(x.dtype, jnp.integer)


def _first_input(args, kwargs):
    if args:
        return args[0]
    return next(iter(kwargs.values()))


# --------------------------------------------------------------------------------------------
# Flax linen


def _linen_apply(module: nn.Module, run: _Pass, params, factors, args, kwargs):
    """module.apply with every factor set placed beside its kernel and an interceptor active."""
    flat = paths.flatten(params)
    injected = dict(flat)
    for path, f in factors.items():
        injected[path + _FACTORS_SUFFIX] = f

    def interceptor(next_fun, call_args, call_kwargs, context):
        mod, method = context.module, context.method_name
        if method not in ("__call__", "attend") or mod.scope is None:
            return next_fun(*call_args, **call_kwargs)
        name = layers.kernel_name(mod)
        if not mod.scope.has_variable("params", name):
            return next_fun(*call_args, **call_kwargs)
        x = _first_input(call_args, call_kwargs)
        kernel_shape = mod.scope.get_variable("params", name).shape
        path = "/".join((*mod.path, name))
        layer = layers.from_linen(mod, method, x, kernel_shape)
        if layer is None or path not in flat:  # not one of the model's own layers
            return next_fun(*call_args, **call_kwargs)
        key = name + _FACTORS_SUFFIX
        f = mod.scope.get_variable("params", key) if mod.scope.has_variable("params", key) else None
        stack = len(flat[path].shape) - len(kernel_shape)
        y = split_over_batch(next_fun(*call_args, **call_kwargs))
        if not run.record(path, layer, stack, x, f):
            return y

        def lookup(member: str):
            # A group's members are siblings: read their (scan-sliced) factors via the parent.
            *_, member_module, member_name = member.split("/")
            return mod.scope.parent.variables()["params"][member_module][
                member_name + _FACTORS_SUFFIX
            ]

        return split_over_batch(y + run.delta(path, layer, x, f, lookup).astype(y.dtype))

    variables = {**kwargs.pop("variables", {}), "params": paths.unflatten(injected)}
    with nn.intercept_methods(interceptor):
        return module.apply(variables, *args, **kwargs)


# --------------------------------------------------------------------------------------------
# Flax NNX


@functools.cache
def _factored_class(cls: type) -> type:
    """A subclass of an NNX layer class whose calls add the adapter delta (cached per class)."""

    def hooked(method_name):
        base = getattr(cls, method_name)

        def method(self, *args, **kwargs):
            y = base(self, *args, **kwargs)
            run, path, f, lookup = self._lorax
            x = _first_input(args, kwargs)
            layer = layers.from_nnx(self, method_name, x)
            if layer is None or not run.record(path, layer, 0, x, f):
                return y
            return split_over_batch(y + run.delta(path, layer, x, f, lookup).astype(y.dtype))

        return method

    methods = {"__call__": hooked("__call__")}
    if hasattr(cls, "attend"):
        methods["attend"] = hooked("attend")
    return type(f"Factored{cls.__name__}", (cls,), methods)


def _nnx_apply(graphdef, rest, run: _Pass, params, factors, args, kwargs):
    model = nnx.merge(graphdef, params, rest)
    lookup = factors.__getitem__
    for node_path, node in nnx.iter_graph(model):
        if isinstance(node, layers.NNX_LAYERS):
            path = "/".join(map(str, (*node_path, layers.kernel_name(node))))
            if path in factors or run.recording:
                object.__setattr__(node, "_lorax", (run, path, factors.get(path), lookup))
                object.__setattr__(node, "__class__", _factored_class(type(node)))
    return model(*args, **kwargs)


def nnx_params(model: nnx.Module) -> PyTree:
    """The params (nnx.Param state) of an NNX model as a plain nested dict, paths as linen's."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


# --------------------------------------------------------------------------------------------
# The wrapper


def factored(model: nn.Module | nnx.Module | Callable) -> Callable:
    """Wraps a model into `fn(params, adapters, *inputs, lora_rng=None, **kwargs)`.

    Args:
      model: a linen module (params are its "params" collection; other collections go in a
        `variables=` keyword), an NNX module (params as `nnx_params(model)`; its other state is
        taken as it is when wrapped), or any function `model(params, *inputs, **kwargs)`.

    Returns:
      The adapted model. `lora_rng` enables LoRA dropout for adapters that have it. An empty
      `adapters` ({}) runs the plain model: full fine-tuning goes through the same wrapper.
    """
    if isinstance(model, nn.Module):
        run_model = functools.partial(_linen_apply, model)
    elif isinstance(model, nnx.Module):
        graphdef, _, rest = nnx.split(model, nnx.Param, ...)
        run_model = functools.partial(_nnx_apply, graphdef, rest)
    elif callable(model):
        return functools.partial(_merged_apply, model)
    else:
        raise TypeError(f"factored() takes a linen or NNX module or a function, got {model!r}")

    def apply(params, adapters, *args, lora_rng=None, **kwargs):
        factors = lora.factors_by_path(adapters)
        if not factors:
            return run_model(_Pass({}, None), params, {}, args, dict(kwargs))
        discovery = _discover(run_model, params, factors, args, kwargs)
        fallback = {p: f for p, f in factors.items() if p not in discovery.applied_paths()}
        if fallback:
            _warn_merged(fallback)
            params = lora.merge(params, paths.unflatten(fallback))
            factors = {p: f for p, f in factors.items() if p not in fallback}
        run = _Pass(discovery.groups_found(), lora_rng)
        return run_model(run, params, factors, args, dict(kwargs))

    return apply


def infer_layouts(
    model: nn.Module | nnx.Module, params, *args, **kwargs
) -> dict[str, KernelLayout]:
    """How each supported layer's kernel splits into stacked, input and output axes.

    A shape-only pass (nothing is computed); pass the result to `lora.init` so that scanned layer
    stacks and multi-axis kernels get factors of the right shapes.

    >>> layouts = infer_layouts(model, params, x)          # doctest: +SKIP
    >>> adapters = lora.init(rng, params, spec, layouts)   # doctest: +SKIP
    """
    if isinstance(model, nn.Module):
        run_model = functools.partial(_linen_apply, model)
    else:
        graphdef, _, rest = nnx.split(model, nnx.Param, ...)
        run_model = functools.partial(_nnx_apply, graphdef, rest)
    return _discover(run_model, params, {}, args, kwargs).layouts()


def _discover(run_model, params, factors, args, kwargs) -> _Pass:
    run = _Pass(None, None)
    # Inputs are closed over, not abstracted: flags such as `deterministic=True` must stay Python.
    # Params are arguments, so shapes alone (`jax.ShapeDtypeStruct`s) will do.
    jax.eval_shape(lambda p, f: run_model(run, p, f, args, dict(kwargs)), params, factors)
    return run


def _merged_apply(model, params, adapters, *args, lora_rng=None, **kwargs):
    del lora_rng  # dropout on the adapter's input has no meaning once the adapter is merged
    factors = lora.factors_by_path(adapters)
    if factors:
        _warn_merged(factors)
        params = lora.merge(params, adapters)
    return model(params, *args, **kwargs)


def _warn_merged(factors: dict[str, Factors]) -> None:
    # Python shows each distinct warning once, which makes this a one-time notice per path set.
    warnings.warn(
        "LoRA adapters computed merged (W + s·A·B materialised, slower) for: "
        + ", ".join(sorted(factors))
        + "; the factored path covers Dense/DenseGeneral/Einsum/Conv/Embed layers of linen and NNX",
        stacklevel=3,
    )
