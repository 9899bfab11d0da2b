"""Parameter paths: every leaf of a params pytree is named by a `/`-joined string.

The same names serve LoRA targets, freezing, learning-rate groups and sharding rules, so they
are computed in exactly one place.

>>> import jax.numpy as jnp
>>> params = {"layers_0": {"attn": {"q_proj": {"kernel": jnp.zeros((4, 4))}}}}
>>> list(flatten(params))
['layers_0/attn/q_proj/kernel']
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax

from lorax_ft.quant.kernel import is_quantized

PyTree = Any


def key_str(key: Any) -> str:
    """The path component of one pytree key (dict key, sequence index or attribute name)."""
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_str(keypath: Iterable[Any]) -> str:
    """Joins a JAX key path into `a/b/c`."""
    return "/".join(key_str(k) for k in keypath)


def flatten(tree: PyTree) -> dict[str, Any]:
    """`{path: leaf}` for every leaf, in the tree's own (deterministic) order.

    A quantized kernel (`lorax_ft.quant.QuantizedKernel`) is one leaf, named as the kernel it
    stands for.
    """
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)[0]
    return {path_str(kp): leaf for kp, leaf in leaves}


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dicts from `{path: leaf}`; the inverse of `flatten` for trees of dicts."""
    out: dict[str, Any] = {}
    for path, leaf in flat.items():
        *parents, name = path.split("/")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[name] = leaf
    return out


def map_with_path(fn, tree: PyTree, *rest: PyTree) -> PyTree:
    """`jax.tree.map` whose function also receives the leaf's path string first."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, *xs: fn(path_str(kp), *xs), tree, *rest, is_leaf=is_quantized
    )
