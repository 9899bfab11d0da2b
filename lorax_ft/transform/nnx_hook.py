"""Flax NNX frontend of the factored path: each call merges a fresh copy of the model whose
supported layers add the adapter delta.

For every node that is (or derives from) a supported NNX layer (`layers.NNX_LAYERS`), the copy
gets a class whose method resolution order puts a hook *between* the user's class and the
supported one: `FactoredX(UserSubclass, Hooked[nnx.Linear])`. A subclass that wraps
`super().__call__(x)` therefore reaches the hook once, at the inner call, where the delta
belongs; a subclass whose `__call__` computes something of its own never reaches it (the
dependency check in `lorax_ft.transform.factored` then merges that kernel instead).

The factors are placed on the layer as `nnx.Param` variables (`lorax_a`, `lorax_b`, and DoRA's
magnitude `lorax_m`), so NNX transforms slice them as they slice the kernel: blocks created with
`nnx.vmap` and run with `nnx.scan` get per-layer factors, like linen's `nn.scan`. The pass
itself is found through a context variable set for the duration of the call.

A layer whose weight holds a quantized kernel (`lorax_ft.quant.QuantizedKernel`) runs as a copy
of itself with the weight dequantized (`lorax_ft.quant.layer_call.on_dequantized`).
"""

from __future__ import annotations

import contextvars
import functools
from typing import Any

import jax
from flax import nnx

from lorax_ft.quant.kernel import is_quantized
from lorax_ft.quant.layer_call import on_dequantized
from lorax_ft.transform import layers
from lorax_ft.transform.layer_calls import LayerCalls, first_input
from lorax_ft.transform.lora import Factors
from lorax_ft.transform.mixed import MixedFactors

_CALLS: contextvars.ContextVar[LayerCalls | None] = contextvars.ContextVar(
    "lorax_ft_layer_calls", default=None
)


class LoRAFactor(nnx.Param):
    """An adapter factor placed on a layer for one call (a Param, so layer stacks slice it)."""


@functools.cache
def _hooked(known: type) -> type:
    """A subclass of the supported layer `known` whose calls go through the current pass."""

    def hook(method_name):
        base = getattr(known, method_name)

        def method(self, *args, **kwargs):
            calls = _CALLS.get()
            path = getattr(self, "lorax_path", None)
            run = lambda: base(self, *args, **kwargs)
            if calls is None or path is None:
                return run()
            x = first_input(args, kwargs)
            weight_name = layers.kernel_name(self)
            kernel = _value(getattr(self, weight_name))
            if is_quantized(kernel):
                run = lambda: _run_dequantized(self, base, weight_name, kernel, args, kwargs)
            layer = layers.from_nnx(self, known, method_name, x)
            if layer is None:
                return run()
            factors = None
            if getattr(self, "lorax_a", None) is not None:
                factors = Factors(
                    a=self.lorax_a.get_value(),
                    b=self.lorax_b.get_value(),
                    scale=self.lorax_scale,
                    dropout=self.lorax_dropout,
                    magnitude=_value(getattr(self, "lorax_m", None)),
                )
                mixed = getattr(self, "lorax_mixed", None)
                if mixed is not None:  # a mixed set has no DoRA magnitude
                    ranks, dropouts = mixed
                    factors = MixedFactors(
                        a=factors.a,
                        b=factors.b,
                        scale=factors.scale,
                        dropout=factors.dropout,
                        ranks=ranks,
                        dropouts=dropouts,
                    )
            # Inside a layer stack the factors are slices: the group partners' would have to
            # be sliced too, so down-projections are shared only outside stacks.
            stacked = len(calls.kernel_shapes[path]) > len(layer.kernel_shape)
            lookup = None if stacked else calls.factors.__getitem__
            weights = lambda: (_dequantized(kernel), _value(getattr(self, "bias", None)))
            return calls.layer_call(path, layer, x, factors, run, lookup, weights)

        return method

    methods = {"__call__": hook("__call__")}
    if hasattr(known, "attend"):
        methods["attend"] = hook("attend")
    return type(f"Hooked{known.__name__}", (known,), methods)


def _value(variable):
    return None if variable is None else variable.get_value()


def _dequantized(kernel):
    return kernel.dequantize() if is_quantized(kernel) else kernel


def _run_dequantized(node, base, name: str, kernel, args, kwargs):
    """`base(node, ...)` on a copy of the layer whose quantized weight is dequantized.

    The copy is made inside `on_dequantized`, so the float kernel is not kept for the backward.
    """
    graphdef, state = nnx.split(node)

    def call(w, state, args, kwargs):
        copy = nnx.merge(graphdef, state)
        getattr(copy, name).set_value(w)
        return base(copy, *args, **kwargs)

    return on_dequantized(call, kernel, state, args, kwargs, after=first_input(args, kwargs))


@functools.cache
def _factored_class(cls: type, known: type) -> type:
    if cls is known:
        return _hooked(known)
    return type(f"Factored{cls.__name__}", (cls, _hooked(known)), {})


def apply(graphdef, rest, calls: LayerCalls, params, args, kwargs) -> Any:
    """Runs a fresh copy of the model with `params`; see `linen_hook.apply` for `model_state`."""
    model_state = kwargs.pop("model_state", None)
    if model_state is not None:
        rest = jax.tree.map(lambda v: v, rest)  # a copy: the wrapped model's state stays as is
        nnx.replace_by_pure_dict(rest, model_state)
    model = nnx.merge(graphdef, params, rest)
    for node_path, node in list(nnx.iter_graph(model)):
        known = layers.nnx_known_class(type(node))
        if known is None:
            continue
        path = "/".join(map(str, (*node_path, layers.kernel_name(node))))
        object.__setattr__(node, "__class__", _factored_class(type(node), known))
        node.lorax_path = path
        f = calls.factors.get(path)
        if f is not None:
            node.lorax_a, node.lorax_b = LoRAFactor(f.a), LoRAFactor(f.b)
            node.lorax_scale, node.lorax_dropout = f.scale, f.dropout
            if f.dora:  # a Param too, so layer stacks slice the magnitude like the factors
                node.lorax_m = LoRAFactor(f.magnitude)
            if isinstance(f, MixedFactors):  # static, like the scale
                node.lorax_mixed = (f.ranks, f.dropouts)
    token = _CALLS.set(calls)
    try:
        out = model(*args, **kwargs)
    finally:
        _CALLS.reset(token)
    if model_state is not None:
        return out, model_state_of(model)
    return out


def model_state_of(model: nnx.Module) -> dict:
    """An NNX model's state other than its params (BatchNorm statistics, RNG counters, ...)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))
