"""Combining LoRA adapters into one: PEFT's `LoraModel.add_weighted_adapter`.

Given adapters 1..n with factors (Aᵢ, Bᵢ), scales sᵢ and weights wᵢ, the *exact* combination
is the weighted sum of their deltas ΔW = Σ wᵢ·sᵢ·Aᵢ@Bᵢ. PEFT's three basic methods, in
lorax_ft's layout (A = lora_A.weightᵀ (*stack, in, r), B = lora_B.weightᵀ (*stack, r, out)):

- `cat`: A = [w₁s₁A₁, ..., wₙsₙAₙ] and B = [B₁; ...; Bₙ] on the rank axis; rank Σ rᵢ; exact.
- `linear`: equal ranks only; A = Σ sgn(wᵢsᵢ)·√|wᵢsᵢ|·Aᵢ and B = Σ √|wᵢsᵢ|·Bᵢ. Their product
  is Σᵢ wᵢsᵢAᵢBᵢ plus the cross terms Σ_{i≠j} ±√|wᵢsᵢ wⱼsⱼ|·AᵢBⱼ: exact for one adapter (or when
  the cross terms cancel, e.g. adapters in disjoint rank slots), otherwise an approximation
  (PEFT's docs: "a very rough approximation").
- `svd`: the exact ΔW truncated to `rank` (default: the largest rank) by an SVD; PEFT puts the
  singular values into B (lora_B = U_r S_r, lora_A = V_rᵀ of its (out, in) delta).

The combined adapter's scale is 1: PEFT gives it lora_alpha = r and folds every scale and weight
into the factors. (With `use_rslora` PEFT's combined adapter keeps rsLoRA and so gets scaling
r/√r = √r, multiplying the intended delta by √r; the factors here are right with scale 1, and
exported to PEFT they need lora_alpha = r without rsLoRA, or lora_alpha = √r with it.)

>>> import jax.numpy as jnp
>>> from lorax_ft.transform.lora import Factors
>>> one = {"dense": {"kernel": Factors(jnp.ones((4, 2)), jnp.ones((2, 3)), scale=2.0)}}
>>> two = {"dense": {"kernel": Factors(jnp.ones((4, 1)), jnp.ones((1, 3)), scale=1.0)}}
>>> mixed, report = combine_adapters([one, two], [0.5, 1.0], method="cat")
>>> f = mixed["dense"]["kernel"]
>>> f.rank, f.scale, float(f.delta((4, 3), jnp.float32)[0, 0])   # 0.5·2·2 + 1·1·1
(3, 1.0, 3.0)
>>> float(report["dense/kernel"])
0.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lorax_ft.transform.adapter_list import aligned, like
from lorax_ft.transform.lora import Factors

PyTree = Any
METHODS = ("linear", "cat", "svd")
_DORA = "PEFT's weighted combination is defined for plain LoRA factors only"
_HIGHEST = jax.lax.Precision.HIGHEST


def combine_adapters(
    adapters_list: Sequence[PyTree],
    weights: Sequence[float],
    method: str = "linear",
    *,
    rank: int | None = None,
) -> tuple[PyTree, dict[str, jax.Array]]:
    """One adapter from several weighted ones, as PEFT's `add_weighted_adapter`.

    Args:
      adapters_list: adapters pytrees (as from `lora.init`), all with `Factors` at the same kernel
        paths and of matching shapes (stacked layer axes included: combined layer by layer).
      weights: one Python float per adapter; negative weights subtract.
      method: "linear" (equal ranks), "cat" (rank Σ rᵢ, exact) or "svd" (truncated to `rank`).
        A single adapter is combined "linear", as PEFT does (exact).
      rank: the rank of "svd" (default: the largest rank of the adapters); only for "svd".

    Returns:
      (adapters, report): the combined adapters, shaped as the first one, each `Factors` with
      scale 1.0 and the first adapter's dropout, in the first adapter's factor dtype (computed
      in float32); report maps each path to ‖ΔW_combined − ΔW‖_F / ‖ΔW‖_F against the exact
      ΔW = Σ wᵢ·sᵢ·Aᵢ@Bᵢ, an array of the stacked axes' shape (0 for an exact combination; 0 when
      ΔW and its combination are both zero, inf when only ΔW is).

    Raises:
      ValueError: an unknown method, weights not matching the adapters, adapters at different
        paths (named), shapes that differ, unequal ranks for "linear", a `rank` outside
        [1, min(in, out)] or given for another method, DoRA factors (PEFT cannot combine them).

    >>> from lorax_ft.transform.lora import Factors
    >>> one = {"k": Factors(jnp.eye(3, 1), jnp.eye(1, 3), scale=1.0)}
    >>> two = {"k": Factors(jnp.eye(3, 1), 2 * jnp.eye(1, 3), scale=0.5)}
    >>> mixed, report = combine_adapters([one, two], [1.0, -3.0], method="svd")  # ΔW = (1 − 3)·e₀e₀ᵀ
    >>> f = mixed["k"]
    >>> f.rank, float(f.delta((3, 3), jnp.float32)[0, 0]), float(report["k"])
    (1, -2.0, 0.0)
    """
    if method not in METHODS:
        raise ValueError(f"combine: method {method!r} is not one of {METHODS}")
    if len(adapters_list) == 0:
        raise ValueError("combine: no adapters given")
    weights = [float(x) for x in weights]
    if len(weights) != len(adapters_list):
        raise ValueError(
            f"combine: {len(weights)} weights for {len(adapters_list)} adapters: give one each"
        )
    if rank is not None and method != "svd":
        raise ValueError(f"combine: rank={rank} is for method 'svd', not {method!r}")
    if len(adapters_list) == 1:
        if rank is not None and rank != _ranks(adapters_list[0]):
            raise ValueError(
                "combine: one adapter is combined 'linear' (PEFT ignores svd_rank then): its "
                f"rank stays; rank={rank} would be silently dropped"
            )
        method, rank = "linear", None

    flat = aligned(adapters_list, "combine", _DORA)
    out, report = {}, {}
    for path in flat[0]:
        group = [f[path] for f in flat]
        a, b, error = _METHOD_FNS[method](path, group, weights, rank)
        dtype = group[0].a.dtype
        out[path] = Factors(a=a.astype(dtype), b=b.astype(dtype), dropout=group[0].dropout)
        report[path] = error
    return like(adapters_list[0], out), report


def _linear(path, group, weights, rank):
    ranks = {f.rank for f in group}
    if len(ranks) != 1:
        raise ValueError(
            f"combine 'linear' needs equal ranks, {path!r} has ranks "
            f"{[f.rank for f in group]}: use 'cat' (exact) or 'svd'"
        )
    a, b = 0.0, 0.0
    for f, weight in zip(group, weights, strict=True):
        # PEFT: √|w·s| on both factors, the sign on A only (negative weights subtract).
        ws = weight * f.scale
        root = math.sqrt(abs(ws))
        a = a + (root if ws >= 0 else -root) * _f32(f.a)
        b = b + root * _f32(f.b)
    exact = _exact(group, weights)
    return a, b, _relative_error(_matmul(a, b), exact)


def _cat(path, group, weights, rank):
    a = jnp.concatenate([w * f.scale * _f32(f.a) for f, w in zip(group, weights, strict=True)], -1)
    b = jnp.concatenate([_f32(f.b) for f in group], axis=-2)
    return a, b, jnp.zeros(a.shape[:-2], jnp.float32)


def _svd(path, group, weights, rank):
    exact = _exact(group, weights)
    rank = max(f.rank for f in group) if rank is None else rank
    limit = min(exact.shape[-2:])
    if not (isinstance(rank, int) and 1 <= rank <= limit):
        raise ValueError(
            f"combine 'svd': rank {rank} for {path!r} must be an int in [1, {limit}] "
            f"(its kernel is {exact.shape[-2]} in × {exact.shape[-1]} out)"
        )
    # PEFT decomposes its (out, in) delta: ΔWᵀ = U S Vh, lora_B = U_r S_r, lora_A = Vh_r.
    u, s, vh = jnp.linalg.svd(jnp.swapaxes(exact, -1, -2), full_matrices=False)
    a = jnp.swapaxes(vh[..., :rank, :], -1, -2)  # (in, r)
    b = jnp.swapaxes(u[..., :, :rank] * s[..., None, :rank], -1, -2)  # (r, out)
    # ‖ΔW − ΔW_r‖ / ‖ΔW‖ from the singular values left out (Eckart–Young).
    total, kept = jnp.sum(s**2, axis=-1), jnp.sum(s[..., :rank] ** 2, axis=-1)
    left_out = jnp.sqrt(jnp.maximum(total - kept, 0.0))
    return a, b, _ratio(left_out, jnp.sqrt(total))


_METHOD_FNS = {"linear": _linear, "cat": _cat, "svd": _svd}


def _exact(group, weights):
    return sum(
        w * f.scale * _matmul(_f32(f.a), _f32(f.b)) for f, w in zip(group, weights, strict=True)
    )


def _relative_error(approx, exact):
    diff = jnp.sqrt(jnp.sum((approx - exact) ** 2, axis=(-2, -1)))
    return _ratio(diff, jnp.sqrt(jnp.sum(exact**2, axis=(-2, -1))))


def _ratio(num, den):
    safe = jnp.where(den > 0, den, 1.0)
    return jnp.where(den > 0, num / safe, jnp.where(num > 0, jnp.inf, 0.0))


def _matmul(a, b):
    return jnp.matmul(a, b, precision=_HIGHEST)


def _f32(x):
    return x.astype(jnp.float32)


def _ranks(tree):
    ranks = {f.rank for f in aligned([tree], "combine")[0].values()}
    return ranks.pop() if len(ranks) == 1 else None
