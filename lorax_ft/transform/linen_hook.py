"""Flax linen frontend of the factored path: an interceptor on the supported layers' own code.

`apply` runs `module.apply` with an `nn.intercept_methods` interceptor. A call is recognised by
the *function that runs* (`nn.Dense.__call__`, `nn.Embed.attend`, ... as listed in
`layers.LINEN_IMPLEMENTATIONS`), not by the module's class, so a subclass that wraps
`super().__call__(x)` gets its delta once, at the inner call, and one that computes something
of its own is not recognised (the dependency check in `lorax_ft.transform.factored` then sees the kernel
read outside a supported call and merges it instead).

The factors of a kernel travel in the params collection beside it (`FACTORS_KEY`), so
`nn.scan`/`nn.vmap` layer stacks slice stacked factors exactly as they slice their kernels.

A quantized kernel (`lorax_ft.quant.QuantizedKernel`) sits at its kernel's path; a recognised
call of its layer runs as an unbound copy of the layer applied to its own params with the kernel
dequantized (`lorax_ft.quant.layer_call.on_dequantized`), that inner apply left alone by the
interceptor. nn.Embed's `setup`, which would check the table's shape against the packed codes,
is skipped for a quantized table: the table is read at the layer call only.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
from jax._src.interpreters import batching
from jax._src.interpreters import partial_eval as pe

from lorax_ft.quant.kernel import is_quantized
from lorax_ft.quant.layer_call import on_dequantized
from lorax_ft.transform import layers, paths
from lorax_ft.transform.layer_calls import LayerCalls, first_input

# A layer's scope holds one weight (`kernel` or `embedding`); its factors sit beside it under a
# fixed key that contains neither name (nn.WeightNorm, for one, maps every param whose path
# contains "kernel").
FACTORS_KEY = "lora@factors"

# Set while a layer runs on its dequantized kernel in an apply of its own, which the
# interceptor must leave alone (it would see the layer's call a second time).
_INNER_CALL: contextvars.ContextVar[bool] = contextvars.ContextVar("lorax_inner", default=False)


@contextlib.contextmanager
def _inner_call():
    token = _INNER_CALL.set(True)
    try:
        yield
    finally:
        _INNER_CALL.reset(token)


_EMBED_SETUP = layers.unwrapped(nn.Embed, "setup")


def _quantized_table(mod: nn.Module) -> bool:
    scope = mod.scope
    if scope is None or _INNER_CALL.get() or not scope.has_variable("params", "embedding"):
        return False
    return is_quantized(scope.get_variable("params", "embedding"))


def _run_dequantized(mod: nn.Module, known, name: str, kernel, args, kwargs):
    """The supported layer function `known` on `mod`, its quantized kernel dequantized.

    The layer runs as an unbound copy of itself (same fields) applied to its own params with
    the float kernel, in `on_dequantized`, so the float kernel is not kept for the backward.
    """
    cls, method = known
    own = {
        k: v
        for k, v in mod.scope.variables().get("params", {}).items()
        if k not in (name, FACTORS_KEY)
    }
    copy = mod.clone(parent=None)

    def call(w, own, args, kwargs):
        with _inner_call():
            variables = {"params": {**own, name: w}}
            return copy.apply(variables, *args, method=getattr(cls, method), **kwargs)

    return on_dequantized(call, kernel, own, args, kwargs, after=first_input(args, kwargs))


def _transformed(kernel, given) -> bool:
    """Whether the kernel a layer reads was computed from the param rather than being it.

    Asked in the discovery pass only, where everything is traced (the apply pass follows its
    verdict: a transformed kernel is merged, so it has no factors there). Lifted transforms
    that slice or re-trace (nn.scan, nn.remat, nn.jit) hand their layers *inputs* of an inner
    trace, and nn.vmap a batched view of one; a kernel that an equation of its trace computed
    (nn.map_variables, nn.WeightNorm, at any depth) is not the param its factors adapt.
    """
    while isinstance(kernel, batching.BatchTracer):
        kernel = kernel.val
    if kernel is given or not isinstance(kernel, pe.DynamicJaxprTracer):
        return False
    return kernel.parent is not None  # None: an input (or constant) of its trace


def _with_factors(tree, factors, prefix: str = ""):
    """A copy of the params dicts with each adapted kernel's factors beside it."""
    if not isinstance(tree, Mapping):
        return tree
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        out[key] = _with_factors(value, factors, path + "/")
        if path in factors:
            out[FACTORS_KEY] = factors[path]
    return out


def apply(module: nn.Module, calls: LayerCalls, params, args, kwargs) -> Any:
    """`module.apply` with the factors of `calls` beside their kernels and the interceptor on.

    `kwargs` may hold `variables` (other collections, read-only) and `model_state` (collections
    the call may update: then `(outputs, new_model_state)` is returned).
    """
    given = paths.flatten(params)

    def interceptor(next_fun, call_args, call_kwargs, context):
        run = lambda: next_fun(*call_args, **call_kwargs)
        mod = context.module
        if getattr(context.orig_method, "func", None) is _EMBED_SETUP and _quantized_table(mod):
            # nn.Embed's setup checks its table's shape against the codes' (packed) shape; the
            # table is read at the layer call only, dequantized there, so setup is skipped.
            return None
        known = layers.LINEN_IMPLEMENTATIONS.get(getattr(context.orig_method, "func", None))
        if known is None or mod.scope is None or _INNER_CALL.get():
            return run()
        name = layers.kernel_name(mod)
        # The scope's path, not the module's: under nn.share_scope they differ.
        path = "/".join((*mod.scope.path, name))
        if path not in calls.kernel_shapes or not mod.scope.has_variable("params", name):
            return run()  # not one of the model's own params (e.g. during init)
        x = first_input(call_args, call_kwargs)
        kernel = mod.scope.get_variable("params", name)
        if calls.discovering and _transformed(kernel, given[path]):
            return run()  # e.g. nn.map_variables, nn.WeightNorm: the layer sees another kernel
        layer = layers.from_linen(mod, *known, x, kernel.shape)
        quantized = is_quantized(kernel)
        if quantized:
            run = lambda: _run_dequantized(mod, known, name, kernel, call_args, call_kwargs)
        if layer is None:
            return run()
        scope = mod.scope
        has = scope.has_variable("params", FACTORS_KEY)
        f = scope.get_variable("params", FACTORS_KEY) if has else None

        def lookup(member: str):
            # A group's members are siblings: read their (stack-sliced) factors via the parent.
            member_module = member.split("/")[-2]
            return scope.parent.variables()["params"][member_module][FACTORS_KEY]

        def weights():
            has_bias = getattr(mod, "use_bias", False) and scope.has_variable("params", "bias")
            bias = scope.get_variable("params", "bias") if has_bias else None
            return (kernel.dequantize() if quantized else kernel), bias

        return calls.layer_call(path, layer, x, f, run, lookup, weights)

    model_state = kwargs.pop("model_state", None)
    variables = {**kwargs.pop("variables", {}), **(model_state or {})}
    variables["params"] = _with_factors(params, calls.factors)
    if model_state is not None:
        kwargs["mutable"] = list(model_state)
    with nn.intercept_methods(interceptor):
        out = module.apply(variables, *args, **kwargs)
    if model_state is not None:
        out, updates = out
        return out, {**model_state, **updates}
    return out
