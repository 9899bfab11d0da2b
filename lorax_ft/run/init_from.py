"""`peft.init_from`: a run that starts from a PEFT adapter directory instead of fresh factors.

The config still says what is trained (targets, ranks, alpha, DoRA, `peft.train`); the
directory gives the starting values and must fit that exactly: the same adapted kernels with the
same ranks, scales and method, and a value for every leaf the config trains fully. Anything else
is refused with one line naming the path, never patched over (PEFT itself only warns about
missing adapter keys, and then trains from fresh factors).

>>> start = initial_values("adapter/", module, params, adapters, spec)   # doctest: +SKIP
>>> params, adapters = start(params, adapters)   # traced inside the state's init
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np

from lorax_ft.errors import UserError
from lorax_ft.quant import is_quantized
from lorax_ft.transform import lora, paths
from lorax_ft.transform.spec import Spec, Train

PyTree = Any


class InitFromError(UserError, ValueError):
    """A PEFT adapter directory that does not fit the run's config."""


def initial_values(
    directory: str,
    module: Any,
    params: PyTree,
    adapters: PyTree,
    spec: Spec,
    where: str | None = None,
) -> Callable[[PyTree, PyTree], tuple[PyTree, PyTree]]:
    """Reads `directory` and checks it against the run; returns `(params, adapters) -> both
    with the directory's values`.

    Args:
      directory: a PEFT adapter directory (`peft.init_from`).
      module: the zoo model the run trains.
      params: its base params (arrays: modules saved whole are compared with them).
      adapters: the run's adapters, arrays or shapes (`lora.init`'s structure).
      spec: the run's spec (which leaves are trained fully).
      where: how messages name the directory (default: `peft.init_from=DIR`).
    """
    from lorax_ft.models.peft_format import load_peft

    where = where or f"peft.init_from={directory}"
    changed = [p for p, a in spec.lora_targets(params).items() if a.changes_base]
    if changed:
        raise InitFromError(
            f"{where}: the config initialises {changed[0]} with PiSSA/OLoRA, which changes the "
            "base, while a PEFT adapter applies to the original base; use peft.init='kaiming'"
        )
    loaded = load_peft(directory, module, params)
    want, got = lora.factors_by_path(adapters), lora.factors_by_path(loaded.adapters)
    missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
    if missing:
        raise InitFromError(f"{where} has no adapter for {missing[0]}, which the config adapts")
    if extra:
        raise InitFromError(
            f"{where} adapts {extra[0]}, which the config does not (peft.targets / peft.rules)"
        )
    for path, f in want.items():
        _check_factors(where, path, f, got[path])
    flat = paths.flatten(params)
    actions = spec.resolve(params)
    trained = {p for p, a in actions.items() if isinstance(a, Train)}
    unsaved = sorted(trained - loaded.trained.keys())
    if unsaved:
        raise InitFromError(
            f"{where} has no value for {unsaved[0]}, which the config trains fully (peft.train): "
            "it is missing from the adapter's modules_to_save"
        )
    for path in sorted(loaded.trained.keys() - trained):
        # A module saved whole also holds the leaves the run keeps frozen: their saved values
        # must be the base's, or the adapter means a model this run would not train.
        base = flat[path]
        if is_quantized(base):  # a QLoRA export saves the kernel it was trained on, dequantized
            base = base.dequantize()
        value, base = np.asarray(loaded.trained[path]), np.asarray(base)
        if value.shape != base.shape or not np.array_equal(value, base.astype(value.dtype)):
            raise InitFromError(
                f"{where} saves {path} with values other than the base's, but the config keeps "
                "it frozen: train it (peft.train) or use an adapter that does not change it"
            )
    values = {p: loaded.trained[p] for p in trained}

    def start(params: PyTree, adapters: PyTree) -> tuple[PyTree, PyTree]:
        params = paths.map_with_path(
            lambda p, x: jnp.asarray(values[p], x.dtype) if p in values else x, params
        )
        factors = {
            p: f.replace(
                a=jnp.asarray(got[p].a, f.a.dtype),
                b=jnp.asarray(got[p].b, f.b.dtype),
                magnitude=None
                if f.magnitude is None
                else jnp.asarray(got[p].magnitude, f.magnitude.dtype),
            )
            for p, f in lora.factors_by_path(adapters).items()
        }
        return params, paths.unflatten(factors)

    return start


def _check_factors(where: str, path: str, want: lora.Factors, got: lora.Factors) -> None:
    if want.a.shape != got.a.shape or want.b.shape != got.b.shape:
        raise InitFromError(
            f"{where}: the adapter of {path} has rank {got.rank} (A {tuple(got.a.shape)}, "
            f"B {tuple(got.b.shape)}), the config rank {want.rank} (A {tuple(want.a.shape)}, "
            f"B {tuple(want.b.shape)})"
        )
    if not math.isclose(want.scale, got.scale, rel_tol=1e-6):
        raise InitFromError(
            f"{where}: the adapter of {path} has scale {got.scale:g} (lora_alpha / r, or / √r "
            f"with use_rslora), the config {want.scale:g} (peft.alpha, peft.rslora)"
        )
    if (want.magnitude is None) != (got.magnitude is None):
        method = {True: "LoRA", False: "DoRA"}
        raise InitFromError(
            f"{where}: the adapter of {path} is {method[got.magnitude is None]}, the config "
            f"asks {method[want.magnitude is None]} (peft.dora)"
        )
