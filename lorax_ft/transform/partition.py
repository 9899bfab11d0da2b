"""Frozen versus trainable: labels over the model's variables, and the split between them.

The variables of a fine-tune are `{"params": params, "lora": adapters}`. Each leaf gets a label:
`"lora"` (a LoRA factor), `"train"` (a params leaf trained fully) or `"frozen"`. `split` divides
the variables into two trees of the same structure, each holding `None` where the other has a
leaf, so the frozen tree never enters `jax.grad` and the optimizer never sees it; `combine` puts
them back together. Nothing is copied.

>>> import jax.numpy as jnp
>>> from lorax_ft.transform.spec import FULL_FINETUNE
>>> variables = {"params": {"w": jnp.ones(3)}, "lora": {}}
>>> labels = variable_labels(variables["params"], variables["lora"], FULL_FINETUNE)
>>> frozen, trainable = split(variables, labels)
>>> trainable
{'lora': {}, 'params': {'w': Array([1., 1., 1.], dtype=float32)}}
"""

from __future__ import annotations

from typing import Any

import jax

from lorax_ft.quant.kernel import is_quantized
from lorax_ft.transform import paths
from lorax_ft.transform.spec import FROZEN, LORA, Spec, SpecError

PyTree = Any


def variable_labels(params: PyTree, adapters: PyTree, spec: Spec) -> PyTree:
    """Labels of `{"params": params, "lora": adapters}`: 'lora' / 'train' / 'frozen'.

    Raises:
      SpecError: the spec trains a quantized kernel (`lorax_ft.quant`), frozen by construction.
    """
    labels = spec.labels(params)
    trained = [
        p
        for p, v in paths.flatten(params).items()
        if is_quantized(v) and paths.flatten(labels)[p] != FROZEN
    ]
    if trained:
        raise SpecError(
            f"{trained[0]!r} is a quantized kernel, frozen by construction: it cannot be "
            "trained fully (full fine-tuning or a Train rule); adapt it with LoRA, or load "
            "the base unquantized"
        )
    return {"params": labels, "lora": jax.tree.map(lambda _: LORA, adapters)}


def split(variables: PyTree, labels: PyTree) -> tuple[PyTree, PyTree]:
    """(frozen, trainable): the variables with the other part's leaves replaced by None."""
    # A quantized kernel (`lorax_ft.quant`) is one variable with one label, though several arrays.
    frozen = jax.tree.map(
        lambda x, lab: x if lab == FROZEN else None, variables, labels, is_leaf=is_quantized
    )
    trainable = jax.tree.map(
        lambda x, lab: None if lab == FROZEN else x, variables, labels, is_leaf=is_quantized
    )
    return frozen, trainable


def combine(frozen: PyTree, trainable: PyTree) -> PyTree:
    """Inverse of `split`: every leaf from whichever part holds it."""
    return jax.tree.map(
        lambda f, t: t if f is None else f,
        frozen,
        trainable,
        is_leaf=lambda x: x is None or is_quantized(x),
    )
