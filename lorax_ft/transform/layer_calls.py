"""One forward pass of an adapted model: what happens at each recognised layer call.

The frontends (`lorax_ft.transform.linen_hook`, `lorax_ft.transform.nnx_hook`) recognise the calls of supported
layers and hand each one to a `LayerCalls`, which either

* *discovers* (a shape-only trace before the real one): records the call (its path, layer kind,
  layout and input) and returns a stand-in output that does not depend on the kernel, so that
  a dependency analysis of the traced model can tell whether a kernel is also read anywhere
  else (see `lorax_ft.transform.factored`); or
* *applies*: returns the layer's own output plus the adapter's delta, scale·(x·A)·B, where
  adapted layers that read the same input share one x·[A1 A2 ...] matmul. A DoRA adapter
  rescales the sum per output feature (`Layer.dora`); it shares x·A like the others, since
  only its post-processing differs.

With an `adapter_index` (a mixed set from `lorax_ft.transform.mixed`), each layer masks the
rank columns of x·A per example, so that example i gets the delta of its own adapter only.

DoRA's norm ‖W + s·A·B‖ reads the kernel in the apply pass only: the discovery stand-in does
not, so a kernel read nowhere else is still found to be read only by its layer.

A `LayerCalls` lives for a single call of the wrapped model and holds no state between calls.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Collection, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lorax_ft.errors import UserError
from lorax_ft.transform.layers import Layer
from lorax_ft.transform.lora import Factors, KernelLayout


class AdapterError(UserError, ValueError):
    """Adapters that do not fit the params or the layers they are used with."""


@dataclasses.dataclass
class Call:
    """What the discovery pass saw of one recognised layer call."""

    path: str
    layer: Layer
    layout: KernelLayout
    x: Any
    group_key: tuple | None


def identity(y):
    return y


def first_input(args, kwargs):
    """A layer call's input: its first positional argument, else its first keyword argument."""
    return args[0] if args else next(iter(kwargs.values()))


class LayerCalls:
    """The adapter side of one forward pass (see the module docstring).

    Args:
      factors: `{kernel path: Factors}` applied factored in this pass.
      kernel_shapes: `{path: shape}` of every param, to count a kernel's stacked layer axes.
      groups: from a discovery pass, `path -> ((member path, out dims), ...)`; None discovers.
      rng: key for LoRA dropout, or None.
      constrain: applied to each adapted layer's output (a sharding constraint, or identity).
      adapter_index: a mixed batch (`lorax_ft.transform.mixed`): the adapter of each example,
        int (batch,); every factor is then a `MixedFactors`. None: one adapter for all.
      quantized: paths of quantized kernels: the discovery pass stands in for their layers'
        outputs as for adapted ones, to find any read of them outside a layer call.
    """

    def __init__(
        self,
        factors: Mapping[str, Factors],
        kernel_shapes: Mapping[str, tuple[int, ...]],
        groups: Mapping[str, tuple] | None,
        rng: jax.Array | None = None,
        constrain: Callable[[jax.Array], jax.Array] = identity,
        adapter_index: jax.Array | None = None,
        quantized: Collection[str] = (),
    ):
        self.factors = factors
        self.quantized = quantized
        self.kernel_shapes = kernel_shapes
        self.discovering = groups is None
        self.groups = groups or {}
        self.rng = rng
        self.constrain = constrain
        self.adapter_index = adapter_index
        self.calls: list[Call] = []
        self._shared: dict[tuple, tuple[Any, dict[str, jax.Array]]] = {}
        self._dropout_calls = 0

    def layer_call(
        self,
        path: str,
        layer: Layer,
        x: jax.Array,
        factors: Factors | None,
        compute: Callable[[], jax.Array],
        lookup: Callable[[str], Factors] | None,
        weights: Callable[[], tuple[jax.Array, jax.Array | None]] | None = None,
    ) -> jax.Array:
        """The output of one recognised layer call (`compute()` runs the layer itself).

        Args:
          path: the kernel's `/`-joined params path.
          layer: the recognised layer.
          x: its input.
          factors: the adapter's factors as the layer sees them (sliced inside a layer stack).
          compute: runs the layer's own forward pass.
          lookup: `lookup(path)` gives another adapted layer's factors as this layer sees them,
            for sharing one down-projection among layers reading the same input; None: never
            shared.
          weights: `(kernel, bias or None)` as the layer reads them, for DoRA's norm and bias.
        """
        y = compute()
        if self.discovering:
            self._record(path, layer, x, factors, lookup)
            if factors is None and path not in self.quantized:
                return y
            # A stand-in that depends on x but not on the kernel: if the model's output still
            # depends on the kernel, something other than a supported layer call read it.
            return jnp.zeros(y.shape, y.dtype) + (0 * jnp.sum(x)).astype(y.dtype)
        y = self.constrain(y)
        if factors is None:
            return y
        delta = self._delta(path, layer, x, factors, lookup)
        if factors.dora:
            return self.constrain(layer.dora(y, delta, *weights(), factors))
        return self.constrain(y + delta.astype(y.dtype))

    def _record(self, path, layer: Layer, x, factors: Factors | None, lookup) -> None:
        stack = len(self.kernel_shapes[path]) - len(layer.kernel_shape)
        layout = dataclasses.replace(layer.layout, stack=stack)
        if factors is not None and not layer.accepts(factors):
            fan_in, fan_out = layer.features
            raise AdapterError(
                f"adapter {path!r}: A {tuple(factors.a.shape)} and B {tuple(factors.b.shape)} do "
                f"not fit its layer, which uses the kernel {layer.kernel_shape} as {fan_in} in × "
                f"{fan_out} out features; make the adapters with lora.init(rng, params, spec, "
                "layouts=lf.infer_layouts(model, params, *inputs))"
            )
        if factors is not None and factors.dora and layer.kind != "dense":
            raise AdapterError(
                f"DoRA adapter {path!r}: its layer is a {layer.kind!r} layer, and DoRA is "
                "computed at dense layers only (Dense/DenseGeneral, nnx.Linear/LinearGeneral); "
                "give this kernel a rule without dora"
            )
        key = None
        if factors is not None and lookup is not None:
            key = layer.group_key(factors)
        self.calls.append(Call(path, layer, layout, x, key))

    def _delta(self, path: str, layer: Layer, x, factors: Factors, lookup) -> jax.Array:
        group = self.groups.get(path)
        if group is None:
            rows = self._rows(path, layer, x, [factors])
            return layer.delta(self._dropout(path, x, factors), factors, rows)
        # The first member to run computes the whole group's deltas from one x·[A1 A2 ...].
        entry = self._shared.get(group)
        if entry is None or entry[0] is not x:
            member_paths = [p for p, _ in group]
            members = [lookup(p) for p in member_paths]
            rows = self._rows(path, layer, x, members)
            deltas = layer.dense_deltas(x, members, [dims for _, dims in group], rows)
            entry = self._shared[group] = (x, dict(zip(member_paths, deltas, strict=True)))
        return entry[1][path]

    def _rows(self, path, layer: Layer, x, factors: list[Factors]) -> jax.Array | None:
        """A mixed batch's (batch, Σ ranks) mask of the rank columns each example uses."""
        index = self.adapter_index
        if index is None:
            return None
        if x.ndim == 0 or x.shape[0] != index.shape[0] or not layer.rows_first(x):
            raise AdapterError(
                f"mixed adapters {path!r}: its layer's input has shape {tuple(x.shape)}, whose "
                f"axis 0 is not the batch of {index.shape[0]} examples that adapter_index "
                "selects for; a mixed batch needs every adapted layer's input batch-first"
            )
        return jnp.concatenate([f.row_mask(index) for f in factors], axis=-1)

    def _dropout(self, path, x, factors: Factors):
        if not factors.dropout or self.rng is None or jnp.issubdtype(x.dtype, jnp.integer):
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
            # are: inside a layer stack their sliced factors are read through the parent.
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

    def layouts(self) -> dict[str, KernelLayout]:
        """`{path: KernelLayout}` of every recognised layer's kernel."""
        return {c.path: c.layout for c in self.calls}
