"""Running one layer on its dequantized kernel, inside the jitted step, without keeping it.

A layer reading a `QuantizedKernel` runs on `kernel.dequantize()`, one layer at a time: the
float kernel exists only while its layer's matmul runs, in the forward pass and again in the
backward pass, never for the whole model. Two things make that so:

* a custom VJP whose residuals are the quantized kernel and the layer's inputs, not the float
  kernel: the backward pass dequantizes again and takes the layer's VJP there (the layer's
  forward output is dead code in that VJP, so XLA removes it: no matmul is recomputed);
* a data dependency of each dequantization on what its layer runs on (the input in the forward
  pass, the output's cotangent in the backward pass): the codes are OR-ed with a zero computed
  from one element of it. Without it XLA is free to dequantize every layer's kernel at
  the start of the step, as it depends on parameters only, and XLA:CPU does (measured: 8
  layers of 1024×1024 held 33.6 MB of float kernels at once). An optimization barrier would
  say the same, but XLA:CPU expands barriers away before it schedules.

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
import jax.numpy as jnp
import numpy as np

from lorax_ft.quant.kernel import QuantizedKernel


def on_dequantized(
    fn: Callable[..., Any], kernel: QuantizedKernel, *args: Any, after: Any = None
) -> Any:
    """`fn(kernel.dequantize(), *args)`, the float kernel made where it is used (see above).

    `args` may hold anything: their arrays are differentiable inputs, everything else (flags,
    None, Python numbers) is closed over as it is. `kernel` gets no gradient. `after`: the
    array among `args` that the layer computes from (its input), which the dequantization
    waits for; default: the first array.
    """
    leaves, treedef = jax.tree.flatten(args)
    arrays = [isinstance(leaf, jax.Array | np.ndarray) for leaf in leaves]
    given = [leaf for leaf, is_array in zip(leaves, arrays, strict=True) if is_array]
    anchor = next((i for i, leaf in enumerate(given) if leaf is after), 0)

    def call(w: jax.Array, given: list) -> Any:
        it = iter(given)
        full = [
            next(it) if is_array else leaf for leaf, is_array in zip(leaves, arrays, strict=True)
        ]
        return fn(w, *jax.tree.unflatten(treedef, full))

    @jax.custom_vjp
    def run(kernel: QuantizedKernel, given: list) -> Any:
        return call(_after(kernel, given[anchor]).dequantize(), given)

    def run_fwd(kernel, given):
        return run(kernel, given), (kernel, given)

    def run_bwd(residuals, cotangent):
        kernel, given = residuals
        w = _after(kernel, cotangent).dequantize()
        _, vjp = jax.vjp(lambda given: call(w, given), given)
        (d_given,) = vjp(cotangent)
        return jax.tree.map(_zero_cotangent, kernel), d_given

    run.defvjp(run_fwd, run_bwd)
    return run(kernel, given)


def _after(kernel: QuantizedKernel, anchor: Any) -> QuantizedKernel:
    """`kernel` with its codes depending on `anchor`'s data, their values unchanged.

    The codes are OR-ed with `isnan(a) >> 1` of one element `a` of `anchor`: a boolean shifted
    right by one is 0 whatever `a` is, and XLA does not know it (it folds `x * 0` and `x & 0`
    on integers, which is why neither is used).
    """
    first = next((x for x in jax.tree.leaves(anchor) if x.size), None)
    if first is None:
        return kernel
    flag = jnp.isnan(jnp.ravel(first)[0].astype(jnp.float32)).astype(kernel.values.dtype)
    return kernel.replace(values=kernel.values | jnp.right_shift(flag, 1))


def _zero_cotangent(x: jax.Array):
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)  # integer codes: JAX's "no tangent" dtype
