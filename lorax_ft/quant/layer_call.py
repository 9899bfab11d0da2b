"""Running one layer on its dequantized kernel, inside the jitted step, without keeping it.

A layer reading a `QuantizedKernel` runs on `kernel.dequantize()`; the call is wrapped in
`jax.checkpoint` with the quantized kernel as its input, so that the backward pass recomputes
the float kernel from the codes instead of holding it from the forward pass: otherwise every
float kernel would stay alive between the two passes, as much memory as the unquantized model.
Only elementwise work is recomputed (the dequantization); the layer's matmul result is saved.

>>> import jax, jax.numpy as jnp
>>> from lorax_ft.quant import quantize_kernel
>>> q = quantize_kernel(jax.random.normal(jax.random.key(0), (64, 8)), "nf4")
>>> y = on_dequantized(lambda w, x: x @ w, q, jnp.ones((2, 64)))
>>> y.shape
(2, 8)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from lorax_ft.quant.kernel import QuantizedKernel

# Save matmul results (the layer's output and anything like it), recompute the rest, the
# dequantization being the rest.
_POLICY = jax.checkpoint_policies.dots_with_no_batch_dims_saveable


def on_dequantized(fn: Callable[..., Any], kernel: QuantizedKernel, *args: Any) -> Any:
    """`fn(kernel.dequantize(), *args)`, the float kernel recomputed in the backward pass.

    `args` may hold anything: their arrays are passed through, everything else (flags,
    None, Python numbers) is closed over as it is.
    """
    leaves, treedef = jax.tree.flatten(args)
    arrays = [isinstance(leaf, jax.Array | np.ndarray) for leaf in leaves]

    def run(kernel: QuantizedKernel, given: list) -> Any:
        it = iter(given)
        full = [
            next(it) if is_array else leaf for leaf, is_array in zip(leaves, arrays, strict=True)
        ]
        return fn(kernel.dequantize(), *jax.tree.unflatten(treedef, full))

    given = [leaf for leaf, is_array in zip(leaves, arrays, strict=True) if is_array]
    return jax.checkpoint(run, policy=_POLICY)(kernel, given)
