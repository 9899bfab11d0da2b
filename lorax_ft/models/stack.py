"""Runs a stack of identical layers either as a Python loop or as one `nn.scan`, with optional remat.

Naming: looped layers are submodules `{name}_0`, `{name}_1`, ...; a scanned stack is one submodule
`{name}` whose parameters carry a leading layer axis (logical name "layers"). The block contract:

    block(x, layer_cache, *broadcast) -> (x, new_layer_cache)

`layer_cache` is one layer's slice of a cache pytree stacked on axis 0 (or None); the stack slices
and re-stacks it, so callers see the same `[L, ...]` cache layout in both modes.

Example:
    >>> x, cache = run_layers(Block, {"config": cfg}, x, None, bias, num_layers=2,
    ...                       name="layers", scan_layers=True, remat="full")
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lorax_ft.models.layers import REMAT_POLICIES


def _wrap_remat(block_cls: type[nn.Module], remat: str, scanned: bool) -> type[nn.Module]:
    if remat == "none":
        return block_cls
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat {remat!r}; valid: {['none', *REMAT_POLICIES]}")
    # Inside scan the loop body is not CSE'd across iterations, so the barrier is unnecessary.
    return nn.remat(block_cls, policy=REMAT_POLICIES[remat], prevent_cse=not scanned)


def run_layers(
    block_cls: type[nn.Module],
    block_kwargs: dict[str, Any],
    x: jax.Array,
    cache: Any,
    *broadcast: Any,
    num_layers: int,
    name: str,
    scan_layers: bool,
    remat: str,
) -> tuple[jax.Array, Any]:
    """Applies `num_layers` blocks; must be called inside a parent's `@nn.compact` method.

    Args:
      block_cls: the layer module class.
      block_kwargs: constructor keyword arguments of every layer.
      x: hidden states, the carry.
      cache: a pytree of `[L, ...]` arrays, or None.
      *broadcast: arguments every layer receives unchanged (mask bias, rotary tables, ...).
      num_layers: L.
      name: base name of the layer submodules.
      scan_layers: scan (stacked params) instead of a Python loop.
      remat: "none" or a key of `REMAT_POLICIES`.

    Returns:
      The final hidden states and the updated cache (None when `cache` is None).
    """
    block = _wrap_remat(block_cls, remat, scan_layers)
    if scan_layers:
        scanned = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(0, *([nn.broadcast] * len(broadcast))),
            length=num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        return scanned(**block_kwargs, name=name)(x, cache, *broadcast)
    new_caches = []
    for i in range(num_layers):
        layer_cache = None if cache is None else jax.tree.map(lambda c, i=i: c[i], cache)
        x, new_cache = block(**block_kwargs, name=f"{name}_{i}")(x, layer_cache, *broadcast)
        new_caches.append(new_cache)
    if cache is None:
        return x, None
    return x, jax.tree.map(lambda *cs: jnp.stack(cs), *new_caches)


def stack_layers(params: dict, name: str) -> dict:
    """Looped parameter layout (`{name}_0`, `{name}_1`, ...) -> scanned layout (`{name}`, `[L, ...]`).

    Example:
      >>> scanned = stack_layers(params, "layers")  # model/layers_0/... -> model/layers/...
    """
    if not isinstance(params, dict):
        return params
    indices = sorted(int(k[len(name) + 1 :]) for k in params if _is_layer_key(k, name))
    out = {k: stack_layers(v, name) for k, v in params.items() if not _is_layer_key(k, name)}
    if indices:
        if indices != list(range(len(indices))):
            raise ValueError(f"layers {indices} of {name!r} are not numbered 0..{len(indices) - 1}")
        layers = [params[f"{name}_{i}"] for i in indices]
        out[name] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return out


def unstack_layers(params: dict, name: str, num_layers: int) -> dict:
    """Scanned layout (`{name}` with a leading `[num_layers]` axis) -> looped (`{name}_i`)."""
    if not isinstance(params, dict):
        return params
    out = {}
    for key, value in params.items():
        if key == name:
            for i in range(num_layers):
                out[f"{name}_{i}"] = jax.tree.map(lambda x, i=i: x[i], value)
        else:
            out[key] = unstack_layers(value, name, num_layers)
    return out


def _is_layer_key(key: str, name: str) -> bool:
    prefix = f"{name}_"
    return key.startswith(prefix) and key[len(prefix) :].isdigit()
