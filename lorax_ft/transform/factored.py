"""The factored forward pass: run an unmodified Flax model with LoRA adapters, as base(x) + s·(x·A)·B.

`factored(model)` turns a model into a function `(params, adapters, *inputs) -> outputs` that
never forms W + s·A·B. The base kernels are read only by the layers' own forward computation, so
under `jax.grad` with respect to the adapters no gradient matmul for a frozen kernel is computed:
that saves about a third of a full fine-tuning step's FLOPs.

Exact or refused: before each traced call, a shape-only discovery pass runs the model with every
adapted layer's output replaced by a stand-in that does not depend on its kernel, and JAX's
dead-code analysis of that trace tells whether the output still depends on the kernel, i.e.
whether anything other than a supported layer call reads it (a custom module's `jnp.dot`, a
hand-tied `embedding.T`, a subclass computing its own output, a layer with a custom
`dot_general`). Such kernels are computed merged (W + s·A·B, exact, slower) with a warning
naming them, or refused with `unsupported="error"`. Adapters whose shapes do not fit their
kernel or layer are refused with the path.

* Flax linen (`nn.Module`): `lorax_ft.transform.linen_hook`.
* Flax NNX (`nnx.Module`): `lorax_ft.transform.nnx_hook`.
* Any other function `fn(params, *inputs)`: the adapters are merged into the kernels first
  (exact, slower), with a warning.

DoRA adapters (`LoRA(dora=True)`) are computed factored at dense layers too: the layer's output
is rescaled per output feature by m/‖W + s·A·B‖, that norm computed from W's column norms and
Wᵀ·A (`lora.dora_norm`), never from W + s·A·B. Where a DoRA kernel is computed merged, the merge
holds the norm constant as well, so outputs and gradients are those of the factored path.

Forward-mode autodiff (`jax.jvp`, `jax.jacfwd`) through the factored path is not supported: its
dense layers define a custom VJP (reverse mode), which makes the backward pass faster.

>>> import flax.linen as nn, jax, jax.numpy as jnp
>>> from lorax_ft import lora
>>> from lorax_ft.transform.spec import LoRA, Spec
>>> model = nn.Dense(8)
>>> x = jnp.ones((2, 4))
>>> params = model.init(jax.random.key(0), x)["params"]
>>> adapters = lora.init(jax.random.key(1), params, Spec([("kernel", LoRA(rank=2))]))
>>> y = factored(model)(params, adapters, x)   # == model.apply({'params': params}, x) at init
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from typing import Any, Literal

import flax.linen as nn
import jax
from flax import nnx
from jax._src.interpreters import partial_eval as pe

from lorax_ft.quant import methods as quant_lib
from lorax_ft.quant.kernel import is_quantized
from lorax_ft.transform import linen_hook, lora, mixed, nnx_hook, paths
from lorax_ft.transform.layer_calls import AdapterError, LayerCalls, identity
from lorax_ft.transform.lora import Factors, KernelLayout

PyTree = Any
Unsupported = Literal["merge", "error"]


class UnsupportedLayerError(AdapterError):
    """An adapted kernel read outside a supported layer call, with `unsupported="error"`."""


def factored(
    model: nn.Module | nnx.Module | Callable,
    *,
    unsupported: Unsupported = "merge",
    constrain: Callable[[jax.Array], jax.Array] = identity,
) -> Callable:
    """Wraps a model into `fn(params, adapters, *inputs, lora_rng=None, adapter_index=None, **kw)`.

    Args:
      model: a linen module (params are its "params" collection; other collections go in a
        `variables=` keyword), an NNX module (params as `nnx_params(model)`; its other state is
        taken as it is when wrapped), or any function `model(params, *inputs, **kwargs)`.
      unsupported: what to do with an adapted kernel that something other than a supported
        layer call reads: "merge" (compute it as W + s·A·B, with a warning) or "error".
      constrain: applied to every adapted layer's output; the sharded steps pass a sharding
        constraint (`lorax_ft.parallel.mesh.split_over_batch`).

    Returns:
      The adapted model. `lora_rng` enables LoRA dropout for adapters that have it. An empty
      `adapters` ({}) runs the plain model: full fine-tuning goes through the same wrapper.
      `model_state=` (a dict of collections for linen, `nnx_hook.model_state_of(model)` for
      NNX) runs with that mutable state and returns `(outputs, new_model_state)`.
      `adapter_index` (int, one per example) goes with a mixed set from `lf.mixed_adapters`:
      example i runs with adapter `adapter_index[i]`, or the base model where it is -1.
    """
    run_model = _runner(model)
    if run_model is None and callable(model):
        return functools.partial(_merged_apply, model)
    if run_model is None:
        raise TypeError(f"factored() takes a linen or NNX module or a function, got {model!r}")
    if unsupported not in ("merge", "error"):
        raise ValueError(f"unsupported={unsupported!r}; valid: 'merge', 'error'")

    def apply(params, adapters, *args, lora_rng=None, adapter_index=None, **kwargs):
        factors = lora.factors_by_path(adapters)
        index = mixed.check_call(factors, adapter_index, lora_rng)
        flat = paths.flatten(params)
        shapes = {p: tuple(v.shape) for p, v in flat.items()}
        quantized = {p for p, v in flat.items() if is_quantized(v)}
        if not factors and not quantized:
            return run_model(LayerCalls({}, shapes, {}), params, args, dict(kwargs))
        check_adapters(shapes, factors)
        discovery, read_elsewhere = _discover(run_model, params, factors, args, kwargs, quantized)
        whole = sorted(read_elsewhere & quantized)
        if whole:
            if unsupported == "error":
                raise UnsupportedLayerError(_dequantized_message(whole, "refused"))
            warnings.warn(_dequantized_message(whole, "dequantized whole"), stacklevel=2)
            params = paths.map_with_path(lambda p, v: v.dequantize() if p in whole else v, params)
        merged = {p: f for p, f in factors.items() if p in read_elsewhere}
        if merged and index is not None:
            raise UnsupportedLayerError(
                f"mixed adapters {min(merged)!r}: the kernel is read outside a supported layer "
                "call, so it would have to be merged, and a mixed batch has no single merged "
                "kernel; use a supported layer there, or run each adapter in its own batch"
            )
        if merged:
            if unsupported == "error":
                raise UnsupportedLayerError(_unsupported_message(merged, "refused"))
            warnings.warn(_unsupported_message(merged, "computed merged"), stacklevel=2)
            params = lora.merge(params, paths.unflatten(merged))
            factors = {p: f for p, f in factors.items() if p not in merged}
        groups = discovery.groups_found()
        calls = LayerCalls(factors, shapes, groups, lora_rng, constrain, adapter_index=index)
        try:
            return run_model(calls, params, args, dict(kwargs))
        except TypeError as e:
            if "forward-mode autodiff" not in str(e):
                raise
            raise TypeError(
                "jax.jvp/jacfwd through a factored LoRA model is not supported (its layers "
                "define a custom VJP for a faster backward pass): use jax.grad/vjp/jacrev, or "
                "the plain model on lora.merge(params, adapters)"
            ) from e

    return apply


def infer_layouts(
    model: nn.Module | nnx.Module, params, *args, **kwargs
) -> dict[str, KernelLayout]:
    """How each supported layer's kernel splits into stacked, input and output axes.

    A shape-only pass (nothing is computed); pass the result to `lora.init` so that layer
    stacks and multi-axis kernels get factors of the right shapes.

    >>> layouts = infer_layouts(model, params, x)          # doctest: +SKIP
    >>> adapters = lora.init(rng, params, spec, layouts)   # doctest: +SKIP
    """
    run_model = _runner(model)
    if run_model is None:
        raise TypeError(
            f"infer_layouts() reads the layers of a linen or NNX module, got {model!r}; for a "
            "plain function, give each LoRA rule its input axes, LoRA(rank, in_axes=...), or "
            "build {path: lf.KernelLayout(stack, inputs)} by hand"
        )
    return _discover(run_model, params, {}, args, kwargs)[0].layouts()


def _runner(model) -> Callable | None:
    """`run(calls, params, args, kwargs)` for a linen or NNX module; None for anything else."""
    if isinstance(model, nn.Module):
        return functools.partial(linen_hook.apply, model)
    if isinstance(model, nnx.Module):
        graphdef, _, rest = nnx.split(model, nnx.Param, ...)
        return functools.partial(nnx_hook.apply, graphdef, rest)
    return None


def nnx_params(model: nnx.Module) -> PyTree:
    """The params (nnx.Param state) of an NNX model as a plain nested dict, paths as linen's."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def model_state(model: nn.Module | nnx.Module, variables: PyTree | None = None) -> dict:
    """The state a model updates as it runs (BatchNorm statistics, ...), for `model_state=`.

    Linen: the collections of `variables` (from `model.init`) other than "params". NNX: the
    model's state other than its params.
    """
    if isinstance(model, nnx.Module):
        return nnx_hook.model_state_of(model)
    return {k: v for k, v in (variables or {}).items() if k != "params"}


def check_adapters(shapes: dict[str, tuple[int, ...]], factors: dict[str, Factors]) -> None:
    """Every adapter names a kernel of `params` and its factors fit that kernel's shape.

    Raises:
      AdapterError: naming the first adapter that does not fit, and why.
    """
    for path, f in factors.items():
        if path not in shapes:
            raise AdapterError(
                f"adapter {path!r} has no kernel in params (adapters from another model?)"
            )
        shape, a, b = shapes[path], tuple(f.a.shape), tuple(f.b.shape)
        stack = shape[: len(a) - 2]
        fits = (
            len(a) == len(b) >= 2
            and a[:-2] == b[:-2] == stack
            and a[-1] == b[-2]
            and a[-2] * b[-1] == math.prod(shape[len(stack) :])
        )
        if not fits:
            raise AdapterError(
                f"adapter {path!r}: A {a} and B {b} do not fit its kernel of shape {shape} "
                "(adapters from another model, or made without this model's layouts?)"
            )
        if f.dora and tuple(f.magnitude.shape) != (*stack, b[-1]):
            raise AdapterError(
                f"DoRA adapter {path!r}: magnitude {tuple(f.magnitude.shape)} does not fit B "
                f"{b}; it holds one value per output feature: {(*stack, b[-1])}"
            )


def _discover(
    run_model, params, factors, args, kwargs, quantized=frozenset()
) -> tuple[LayerCalls, set[str]]:
    """A shape-only pass: the calls it saw, and the adapted or quantized kernels read elsewhere."""
    flat = paths.flatten(params)
    shapes = {p: tuple(v.shape) for p, v in flat.items()}
    calls = LayerCalls(factors, shapes, None, quantized=quantized)
    adapted = sorted(set(factors) | set(quantized))

    def trace(kernels, params, factors):
        # The kernels come in as separate arguments, so the dead-code analysis below can ask
        # of each whether the output depends on it. A quantized kernel comes in as a float
        # kernel of its shape: code that reads it outside a layer call sees what it expects.
        by_path = dict(zip(adapted, kernels, strict=True))
        params = paths.map_with_path(lambda p, v: by_path.get(p, v), params)
        # Inputs are closed over, not traced: flags such as `deterministic=True` stay Python.
        return run_model(calls, params, args, dict(kwargs))

    kernels = [jax.ShapeDtypeStruct(flat[p].shape, flat[p].dtype) for p in adapted]
    closed = jax.make_jaxpr(trace)(kernels, params, factors)
    if not adapted:
        return calls, set()
    jaxpr = pe.convert_constvars_jaxpr(closed.jaxpr)
    _, used = pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
    used = used[len(closed.jaxpr.constvars) :][: len(adapted)]
    return calls, {p for p, u in zip(adapted, used, strict=True) if u}


def _merged_apply(model, params, adapters, *args, lora_rng=None, adapter_index=None, **kwargs):
    del lora_rng  # dropout on the adapter's input has no meaning once the adapter is merged
    factors = lora.factors_by_path(adapters)
    if mixed.check_call(factors, adapter_index, None) is not None:
        raise AdapterError(
            "a mixed adapter set runs factored only: the model is a plain function, whose "
            "layers lorax_ft cannot see, and merging would give one kernel for all examples; "
            "write it as a linen or NNX module"
        )
    quantized = quant_lib.quantized_paths(params)
    if quantized:
        warnings.warn(
            f"quantized kernels dequantized whole ({', '.join(quantized[:5])}): the model is a "
            "plain function, whose layers lorax_ft cannot see; write it as a linen or NNX "
            "module to dequantize each kernel inside its layer call",
            stacklevel=2,
        )
        params = quant_lib.dequantize(params)
    if factors:
        check_adapters({p: tuple(v.shape) for p, v in paths.flatten(params).items()}, factors)
        warnings.warn(
            "LoRA adapters computed merged (W + s·A·B materialised, exact but slower) for "
            f"{', '.join(sorted(factors))}: the model is a plain function, whose layers "
            "lorax_ft cannot see; write it as a linen or NNX module to compute them factored",
            stacklevel=2,
        )
        params = lora.merge(params, adapters)
    return model(params, *args, **kwargs)


def _dequantized_message(whole: list[str], what: str) -> str:
    return (
        f"quantized kernels {what} (the float kernel materialised in each step) for "
        f"{', '.join(whole)}: they are read outside a supported layer call, which is where a "
        "quantized kernel is dequantized piecewise; use a supported layer there, or leave "
        "these kernels unquantized (quantize(..., skip=...))"
    )


def _unsupported_message(factors: dict[str, Factors], what: str) -> str:
    return (
        f"LoRA adapters {what} (W + s·A·B materialised) for {', '.join(sorted(factors))}: "
        "these kernels are read outside a supported layer call (nn.Dense/DenseGeneral/Einsum/"
        "Conv/Embed of linen, nnx.Linear/LinearGeneral/Einsum/Conv/Embed, or a subclass that "
        "calls super().__call__), e.g. by a custom module, a hand-tied embedding or a custom "
        "dot_general; use a supported layer to compute them factored"
    )
