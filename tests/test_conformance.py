"""Exact or refused: `lf.factored` on user-style models against the model run on merged params.

For every model of tests/conformance_models.py, with non-zero adapters, the factored output and
the gradients of a scalar loss with respect to the adapters and to the float inputs must equal
those of the unmodified model applied to `lora.merge(params, adapters)` (differentiated through
the merge). A case may instead be refused with one line naming the kernel's path, or computed
merged with a warning naming the path, only where the case allows it (`may_refuse`); a silent
difference is always a failure. Each case is traced and compiled once (both tests reuse it).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import warnings
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_ft as lf
from lorax_ft.transform import layers, lora
from tests import conformance_models as cm
from tests.tolerance import assert_close, magnitude

CASES = {c.name: c for c in cm.CASES}
VALUE_TOL, GRAD_TOL = 1e-5, 1e-4


def _nonzero(adapters, seed=7):
    """Adapters with every B (and any all-zero A, as embeddings start with) made random."""

    def perturb(path, f: lf.Factors):
        key_a, key_b = jax.random.split(
            jax.random.fold_in(jax.random.key(seed), zlib.crc32(path.encode()))
        )
        a = f.a if bool(jnp.any(f.a != 0)) else 0.5 * jax.random.normal(key_a, f.a.shape)
        return dataclasses.replace(f, a=a, b=0.5 * jax.random.normal(key_b, f.b.shape))

    flat = lora.factors_by_path(adapters)
    return lf.paths.unflatten({p: perturb(p, f) for p, f in sorted(flat.items())})


def _sum_of_squares(out):
    leaves = [x for x in jax.tree.leaves(out) if jnp.issubdtype(x.dtype, jnp.floating)]
    return sum(jnp.sum(jnp.square(x)) for x in leaves)


def _loss_and_grads(apply, inputs):
    """jit(value_and_grad) of sum(out²) w.r.t. the adapters and every float input."""
    floats = [i for i, x in enumerate(inputs) if jnp.issubdtype(x.dtype, jnp.floating)]

    def loss(adapters, float_inputs):
        xs = list(inputs)
        for i, x in zip(floats, float_inputs, strict=True):
            xs[i] = x
        out = apply(adapters, *xs)
        return _sum_of_squares(out), out

    grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    return lambda adapters: grad_fn(adapters, [inputs[i] for i in floats])


@dataclasses.dataclass
class Outcome:
    """What one case gave: an error, or factored and merged (out, (d_adapters, d_inputs))."""

    built: cm.Built
    adapters: dict | None = None
    error: Exception | None = None
    messages: list[str] = dataclasses.field(default_factory=list)  # warnings emitted
    factored: tuple | None = None
    merged: tuple | None = None

    def __repr__(self):  # keeps pytest's failure reports free of array dumps
        return f"Outcome(error={self.error!r}, warnings={self.messages})"


@functools.cache
def _outcome(name: str) -> Outcome:
    case = CASES[name]
    built = case.build()
    outcome = Outcome(built)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            layouts = lf.infer_layouts(
                built.model, built.params, *built.inputs, **built.call_kwargs
            )
            adapters = lora.init(jax.random.key(1), built.params, built.spec, layouts)
            outcome.adapters = adapters = _nonzero(adapters)
            factored = built.factored()
            (_, out), grads = _loss_and_grads(
                lambda a, *xs: factored(built.params, a, *xs), built.inputs
            )(adapters)
            outcome.factored = (out, grads)
    except Exception as e:  # a refusal is judged by the tests; anything else fails them
        outcome.error = e
    finally:
        outcome.messages = [str(w.message) for w in caught]
    if outcome.adapters is not None:
        reference = built.reference()
        (_, out), grads = _loss_and_grads(
            lambda a, *xs: reference(lora.merge(built.params, a), *xs), built.inputs
        )(outcome.adapters)
        outcome.merged = (out, grads)
    return outcome


def _names(path: str, message: str) -> bool:
    return re.search(rf"(?<![\w/@]){re.escape(path)}(?![\w/@])", message) is not None


def _check_announced(case: cm.Case, outcome: Outcome) -> None:
    """A refusal names an allowed path in one line; a fallback warning names only allowed paths."""
    if outcome.error is not None:
        message = f"{type(outcome.error).__name__}: {outcome.error}"
        assert case.may_refuse, f"{case.name} must be computed factored, but raised {message}"
        assert not isinstance(outcome.error, AssertionError), message
        assert "\n" not in str(outcome.error).strip(), f"a refusal is one line, got {message}"
        assert any(_names(p, str(outcome.error)) for p in case.may_refuse), (
            f"the refusal names none of {case.may_refuse}: {message}"
        )
        return
    adapted = lora.factors_by_path(outcome.adapters)
    for message in outcome.messages:
        named = {p for p in adapted if _names(p, message)}
        assert named <= set(case.may_refuse), (
            f"{case.name}: adapters of {sorted(named - set(case.may_refuse))} were not computed "
            f"factored: {message}"
        )


def _diff(a, b) -> float:
    return max(
        (float(np.max(np.abs(np.asarray(x) - np.asarray(y)), initial=0.0))
         for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)),
        default=0.0,
    )  # fmt: skip


def _assert_close(factored, merged, tol, what):
    try:
        assert_close(factored, merged, tol=tol)
    except AssertionError:
        raise AssertionError(
            f"{what}: factored != merged, max abs diff {_diff(factored, merged):.3g} "
            f"(allowed {tol:g} x max|merged| = {tol * magnitude(merged):.3g})"
        ) from None


@pytest.mark.parametrize("name", CASES)
def test_values_equal_merged(name):
    case, outcome = CASES[name], _outcome(name)
    _check_announced(case, outcome)
    if outcome.error is not None:
        return
    factored, merged = outcome.factored[0], outcome.merged[0]
    # The adapters matter: otherwise equality would prove nothing.
    base = outcome.built.reference()(outcome.built.params, *outcome.built.inputs)
    assert _diff(base, merged) > 1e-2 * magnitude(merged), f"{name}: the adapters change nothing"
    _assert_close(factored, merged, VALUE_TOL, f"{name} outputs")


@pytest.mark.parametrize("name", CASES)
def test_gradients_equal_merged(name):
    case, outcome = CASES[name], _outcome(name)
    _check_announced(case, outcome)
    if outcome.error is not None:
        return
    (d_adapters, d_inputs), (m_adapters, m_inputs) = outcome.factored[1], outcome.merged[1]
    for path, f in lora.factors_by_path(d_adapters).items():
        m = lora.factors_by_path(m_adapters)[path]
        for leaf in ("a", "b"):
            got, want = getattr(f, leaf), getattr(m, leaf)
            _assert_close(got, want, GRAD_TOL, f"{name} d{leaf} of {path}")
    for i, (got, want) in enumerate(zip(d_inputs, m_inputs, strict=True)):
        _assert_close(got, want, GRAD_TOL, f"{name} d input {i}")


STACKED = [name for name, case in CASES.items() if case.stacked]


@pytest.mark.parametrize("name", STACKED)
def test_layer_stacks_get_factors_per_layer(name):
    case = CASES[name]
    built = case.build()
    layouts = lf.infer_layouts(built.model, built.params, *built.inputs, **built.call_kwargs)
    factors = lora.factors_by_path(lora.init(jax.random.key(1), built.params, built.spec, layouts))
    for path, (a_shape, b_shape) in case.stacked.items():
        assert (factors[path].a.shape, factors[path].b.shape) == (a_shape, b_shape), path


@pytest.mark.parametrize("ranks", [(2,), (1, 3, 2)])
def test_low_rank_vjp_equals_autodiff_of_the_plain_expression(ranks):
    """`layers._low_rank`'s hand-written backward pass against jax.grad of the plain formula."""
    n, fan_in, outs = 5, 6, (7, 4, 3)[: len(ranks)]
    keys = iter(jax.random.split(jax.random.key(0), 3 + 2 * len(ranks)))
    x = jax.random.normal(next(keys), (n, fan_in))
    a = jax.random.normal(next(keys), (fan_in, sum(ranks)))
    bs = tuple(jax.random.normal(next(keys), (r, o)) for r, o in zip(ranks, outs, strict=True))
    cotangents = tuple(jax.random.normal(next(keys), (n, o)) for o in outs)

    def plain(x, a, bs):
        xa, start, out = x @ a, 0, []
        for b in bs:
            out.append(xa[:, start : start + b.shape[0]] @ b)
            start += b.shape[0]
        return tuple(out)

    def weighted(fn):
        return lambda x, a, bs: sum(
            jnp.sum(y * c) for y, c in zip(fn(x, a, bs), cotangents, strict=True)
        )

    custom = lambda x, a, bs: layers._low_rank(x, a, bs, None)
    assert_close(custom(x, a, bs), plain(x, a, bs), tol=1e-6)
    want = jax.grad(weighted(plain), argnums=(0, 1, 2))(x, a, bs)
    got = jax.jit(jax.grad(weighted(custom), argnums=(0, 1, 2)))(x, a, bs)
    assert_close(got, want, tol=1e-6)
