"""A list of adapters over one base, aligned kernel by kernel (for combining and mixing them).

`aligned(adapters_list, what)` checks that every adapters pytree holds plain LoRA `Factors` at
the same kernel paths, with the same stacked, input and output sizes (ranks may differ), and
returns their `{path: Factors}` maps; `like(template, flat)` puts a result back into the first
pytree's structure. `lorax_ft.transform.combine` and `lorax_ft.transform.mixed` share them.

>>> import jax.numpy as jnp
>>> one = {"k": Factors(jnp.ones((4, 2)), jnp.ones((2, 3)))}
>>> two = {"k": Factors(jnp.ones((4, 1)), jnp.ones((1, 3)))}
>>> [f["k"].rank for f in aligned([one, two], "combine")]
[2, 1]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from lorax_ft.transform import paths
from lorax_ft.transform.layer_calls import AdapterError
from lorax_ft.transform.lora import Factors

PyTree = Any


def aligned(
    adapters_list: Sequence[PyTree], what: str, dora: str = "it is defined for LoRA factors"
) -> list[dict[str, Factors]]:
    """`[{kernel path: Factors}]`, one per adapters pytree, checked to be alike.

    Args:
      adapters_list: adapters pytrees, as from `lora.init`.
      what: the caller, for the messages (e.g. "combine").
      dora: why DoRA adapters are refused, for the message.

    Raises:
      AdapterError: no adapters; a leaf that is not a `Factors` node; a mixed set; a DoRA
        adapter; adapters of different kernels, or of other sizes at one kernel.
    """
    if len(adapters_list) == 0:
        raise AdapterError(f"{what}: no adapters given; pass a list of adapters pytrees")
    flat = [_factors(what, k, tree, dora) for k, tree in enumerate(adapters_list)]
    first = set(flat[0])
    for k, other in enumerate(flat[1:], start=1):
        for path in sorted(first ^ set(other)):
            has, lacks = (0, k) if path in first else (k, 0)
            raise AdapterError(
                f"{what}: adapters {has} adapts {path!r} but adapters {lacks} does not: all "
                "adapters must adapt the same kernels"
            )
    for path in flat[0]:
        a0, b0 = flat[0][path].a.shape, flat[0][path].b.shape
        for k, f in enumerate(flat[1:], start=1):
            a, b = f[path].a.shape, f[path].b.shape
            if a[:-1] != a0[:-1] or (*b[:-2], b[-1]) != (*b0[:-2], b0[-1]):
                raise AdapterError(
                    f"{what}: {path!r} has A {tuple(a0)}, B {tuple(b0)} in adapters 0 but "
                    f"A {tuple(a)}, B {tuple(b)} in adapters {k}: not the same kernel layout"
                )
    return flat


def like(template: PyTree, flat: dict[str, Factors]) -> PyTree:
    """`flat` ({path: Factors}) in the container structure of `template`."""
    nodes, treedef = jax.tree_util.tree_flatten_with_path(template, is_leaf=_is_factors)
    return jax.tree_util.tree_unflatten(treedef, [flat[paths.path_str(kp)] for kp, _ in nodes])


def _is_factors(x) -> bool:
    return isinstance(x, Factors)


def _factors(what: str, k: int, tree: PyTree, dora: str) -> dict[str, Factors]:
    out = {}
    for keypath, node in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_factors)[0]:
        path = paths.path_str(keypath)
        if not isinstance(node, Factors):
            raise AdapterError(
                f"{what}: adapters {k} has {path!r}, which is not a Factors node (pass adapters "
                "pytrees, as from lora.init)"
            )
        if type(node) is not Factors:  # a subclass: lorax_ft.transform.mixed.MixedFactors
            raise AdapterError(
                f"{what}: adapters {k} is already a mixed set at {path!r}; pass the adapters it "
                "was made from"
            )
        if node.dora:
            raise AdapterError(f"{what}: adapters {k} is a DoRA adapter at {path!r}: {dora}")
        out[path] = node
    return out
