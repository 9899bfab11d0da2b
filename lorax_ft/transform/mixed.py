"""Several adapters over one base model in one batch, a different adapter for each example.

`mixed_adapters([adapters_1, ..., adapters_K])` puts, at every adapted kernel, the K adapters'
factors side by side on the rank axis: A = [A₁ ... A_K] (*stack, in, Σr) and
B = [s₁B₁; ...; s_KB_K] (*stack, Σr, out), each scale folded into its block of B. The factored
path (`factored(model)(params, mixed, x, adapter_index=index)`) then computes, at each adapted
layer, x·A (one rank-Σr down-projection for the whole batch), zeroes in row i every rank column
but those of adapter `index[i]`, and multiplies by B: row i gets exactly s_k·(x_i·A_k)·B_k with
k = index[i], and nothing where index[i] = -1 (the base model). No kernel is merged, no adapter
runs over the whole batch on its own; the cost is that of one adapter of rank Σr.

The mask is applied to the rank-sized x·A (and to its gradient in the backward pass), so an
adapter's factors get gradients from its own rows only.

The batch is axis 0 of the model's inputs and of every adapted layer's input; a layer whose
input has another leading axis (a model that folds the batch into the tokens, or vmaps over it)
is refused. Refused as well: DoRA adapters, adapters of different kernels or layouts, kernels
that would have to be merged, and LoRA dropout rates that differ between the adapters when a
`lora_rng` is given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lorax_ft.transform.adapter_list import aligned, like
from lorax_ft.transform.layer_calls import AdapterError
from lorax_ft.transform.lora import Factors

PyTree = Any
_DORA = (
    "its magnitude rescales the whole layer output, which a per-example rank mask cannot "
    "select; run DoRA adapters one batch each"
)


@struct.dataclass
class MixedFactors(Factors):
    """K adapters of one kernel on one rank axis: `ranks[k]` columns of A (rows of B) each.

    `scale` is 1 (each adapter's scale is in its block of B); `dropouts` are the adapters' own
    LoRA dropout rates (`dropout` is their common rate, or 0 when they differ).
    """

    ranks: tuple[int, ...] = struct.field(pytree_node=False, default=())
    dropouts: tuple[float, ...] = struct.field(pytree_node=False, default=())

    def row_mask(self, index: jax.Array) -> jax.Array:
        """(len(index), Σr) float32: 1 where rank column j belongs to the adapter of row i.

        A row whose index is outside [-1, K) (only possible when the index is traced: a
        concrete one is refused) is all NaN, so that its outputs say so instead of silently
        being the base model's.
        """
        owner = np.repeat(np.arange(len(self.ranks)), self.ranks)
        mask = (index[:, None] == owner[None, :]).astype(jnp.float32)
        valid = (index >= -1) & (index < len(self.ranks))
        return jnp.where(valid[:, None], mask, jnp.nan)

    def delta(self, shape, dtype) -> jax.Array:
        raise AdapterError(
            "a mixed adapter set (lf.mixed_adapters) has one delta per adapter, not one: merge "
            "each adapter of the list on its own (lora.merge(params, adapters_k))"
        )


def mixed_adapters(adapters_list: Sequence[PyTree]) -> PyTree:
    """Adapters for a batch whose rows each use one of several adapters of the same base model.

    Args:
      adapters_list: K adapters pytrees (as from `lora.init`) adapting the same kernels with
        the same layouts; ranks, scales, dropouts and factor dtypes may differ.

    Returns:
      A pytree shaped as the first adapters, holding a `MixedFactors` at each kernel path: the
      adapters' factors concatenated on the rank axis, scales folded into B. Differentiable
      with respect to `adapters_list`. Run it with `factored(model)(params, mixed, *inputs,
      adapter_index=index)`, `index` an int array with one entry per example (axis 0 of the
      inputs): `index[i] = k` runs row i with `adapters_list[k]`, -1 with the base model.

    Raises:
      AdapterError: no adapters, DoRA adapters, adapters of different kernels or of different
        shapes at one kernel (named), a nested mixed set.

    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> import lorax_ft as lf
    >>> model, x = nn.Dense(3), jnp.ones((3, 4))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> one = {"kernel": lf.Factors(jnp.ones((4, 1)), jnp.ones((1, 3)), scale=2.0)}
    >>> two = {"kernel": lf.Factors(jnp.ones((4, 2)), jnp.ones((2, 3)), scale=0.5)}
    >>> mixed = lf.mixed_adapters([one, two])
    >>> mixed["kernel"].ranks, mixed["kernel"].scale
    ((1, 2), 1.0)
    >>> y = lf.factored(model)(params, mixed, x, adapter_index=jnp.array([0, 1, -1]))
    >>> base = model.apply({"params": params}, x)
    >>> (y - base)[:, 0]   # row 0: 2·(4·1), row 1: 0.5·(2·4), row 2: the base model
    Array([8., 4., 0.], dtype=float32)
    """
    flat = aligned(adapters_list, "mixed_adapters", _DORA)
    out = {}
    for path in flat[0]:
        group = [f[path] for f in flat]
        dropouts = tuple(f.dropout for f in group)
        out[path] = MixedFactors(
            a=jnp.concatenate([f.a for f in group], axis=-1),
            # The scale multiplies B in B's dtype, as the plain path does (`Layer.delta`).
            b=jnp.concatenate([f.scale * f.b for f in group], axis=-2),
            scale=1.0,
            dropout=dropouts[0] if len(set(dropouts)) == 1 else 0.0,
            ranks=tuple(f.rank for f in group),
            dropouts=dropouts,
        )
    return like(adapters_list[0], out)


def check_call(
    factors: Mapping[str, Factors], adapter_index: Any, lora_rng: Any
) -> jax.Array | None:
    """The adapter index of a factored call as an int32 array, or None for plain adapters.

    Raises:
      AdapterError: a mixed set without `adapter_index`, `adapter_index` without a mixed set,
        a mix of both, an index that is not 1-D integers or (when concrete) outside [-1, K),
        different dropout rates with a `lora_rng`.
    """
    mixed = {p: f for p, f in factors.items() if isinstance(f, MixedFactors)}
    if adapter_index is None:
        if mixed:
            raise AdapterError(
                f"adapters are a mixed set (lf.mixed_adapters; {min(mixed)!r}): pass "
                "adapter_index=, one adapter number per example (-1: the base model)"
            )
        return None
    if not mixed:
        raise AdapterError(
            "adapter_index= selects one adapter per example among a mixed set; these adapters "
            "are plain: build the set with lf.mixed_adapters([adapters_1, ..., adapters_K])"
        )
    plain = sorted(set(factors) - set(mixed))
    if plain:
        raise AdapterError(
            f"adapter {plain[0]!r} is a plain adapter in a mixed set: build every kernel's "
            "factors with one lf.mixed_adapters([...]) call"
        )
    counts = {len(f.ranks) for f in mixed.values()}
    if len(counts) != 1:
        raise AdapterError(
            f"the mixed set holds {sorted(counts)} adapters at different kernels: build it "
            "with one lf.mixed_adapters([...]) call"
        )
    count = counts.pop()
    index = jnp.asarray(adapter_index)
    if index.ndim != 1 or not jnp.issubdtype(index.dtype, jnp.integer):
        raise AdapterError(
            f"adapter_index must be a 1-D int array, one entry per example; got "
            f"{index.dtype}{list(index.shape)}"
        )
    if not isinstance(adapter_index, jax.core.Tracer):
        values = np.asarray(adapter_index)
        if values.size and (values.min() < -1 or values.max() >= count):
            raise AdapterError(
                f"adapter_index holds {int(values.min())}..{int(values.max())}, but the mixed "
                f"set has {count} adapters: use 0..{count - 1}, or -1 for the base model"
            )
    if lora_rng is not None:
        rates = {p: f.dropouts for p, f in mixed.items() if len(set(f.dropouts)) > 1}
        if rates:
            path = min(rates)
            raise AdapterError(
                f"mixed adapters {path!r} have different LoRA dropout rates {rates[path]}: "
                "dropout in a mixed batch needs one rate; pass lora_rng=None (no dropout)"
            )
    return index.astype(jnp.int32)
