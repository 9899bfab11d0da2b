"""Float comparisons whose tolerance scales with the magnitudes compared.

Two correct float32 programs that add in different orders (another CPU's kernels, another mesh,
a factored vs a merged matmul) differ by a few ulps of the *largest* values involved, not of
each element: `atol=1e-5` means six digits for outputs near 1 but four for outputs near 56, and
such a test passes on one x86-64 CPU and fails on another. `assert_close` allows every element
`tol × max|expected|` (per array), the same strictness whatever the magnitudes. Comparisons
meant to be bitwise stay `np.testing.assert_array_equal`.

>>> assert_close(np.array([56.0, 0.1]), np.array([56.0004, 0.1004]), tol=1e-5)
>>> assert_close(np.array([1.0, 0.1]), np.array([1.0, 0.1004]), tol=1e-5)  # doctest: +ELLIPSIS
Traceback (most recent call last):
AssertionError: ...
"""

import jax
import numpy as np


def magnitude(tree) -> float:
    """The largest finite |value| in a pytree, over all its leaves together."""
    leaves = [np.abs(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)]
    return max((float(x[np.isfinite(x)].max(initial=0.0)) for x in leaves), default=0.0)


def assert_close(actual, expected, tol: float, scale: float | None = None):
    """Asserts `|actual - expected| <= tol × magnitude` elementwise, leaf by leaf of two pytrees.

    Args:
      actual: an array, a number or a pytree of them.
      expected: the reference, with `actual`'s structure (a list of numbers is one array).
      tol: the allowed error as a fraction of the magnitude.
      scale: the magnitude; default: each expected leaf's largest finite |value|. Give one
        when the error scales with other values than those compared: W after unmerge(merge(W))
        carries the merged kernel's rounding (`magnitude(merged)`); Adam moves every weight by
        about the learning rate per step whatever its gradient, so float noise in a near-zero
        gradient becomes a difference on the scale of the steps taken (lr × steps).
    """
    if isinstance(expected, list | tuple) and all(np.isscalar(x) for x in expected):
        actual, expected = np.asarray(actual), np.asarray(expected)

    def check(a, e):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        largest = magnitude(e) if scale is None else scale
        np.testing.assert_allclose(a, e, rtol=0, atol=tol * largest)

    jax.tree.map(check, actual, expected)
