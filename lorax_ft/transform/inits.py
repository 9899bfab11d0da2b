"""PiSSA and OLoRA initialisation, and the conversion of a trained PiSSA/OLoRA adapter to LoRA.

Both methods move the kernel's principal part into the adapter: the factors start at a rank-r
piece of W and the base becomes the *residual* W − scale · A @ B, so the adapted kernel
residual + scale · A @ B equals W when training starts. They are PEFT's `pissa_init` and
`olora_init` (peft/tuners/lora/layer.py) in lorax_ft's layout: a kernel W is
(*stack, in_features, out_features) = PEFT's Linear weight transposed, A = PEFT's lora_A.weightᵀ
(*stack, in, r) and B = lora_B.weightᵀ (*stack, r, out). Leading stacked (layer) axes are
decomposed layer by layer. Everything is computed in float32; the factors are float32 and the
residual has W's dtype (PEFT writes the residual back into the base layer's dtype).

>>> import jax, jax.numpy as jnp
>>> w = jax.random.normal(jax.random.key(0), (16, 8))
>>> a, b, residual = pissa(w, rank=4, scale=2.0)
>>> a.shape, b.shape, residual.shape
((16, 4), (4, 8), (16, 8))
>>> bool(jnp.allclose(residual + 2.0 * a @ b, w, atol=1e-5))
True
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def pissa(
    w: jax.Array,
    rank: int,
    scale: float,
    *,
    niter: int | None = None,
    rng: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """PiSSA: the factors from the top-`rank` singular triplets of `w`, as PEFT's `pissa_init`.

    With Wᵀ = V S Uᵀ (PEFT decomposes its (out, in) weight), A = U_r √(S_r / scale) and
    B = √(S_r / scale) V_rᵀ, so scale · A @ B is the best rank-r approximation of W whatever the
    scale. `niter` selects PEFT's `init_lora_weights="pissa_niter_<niter>"`: a randomized SVD
    (Halko et al. 2009, Algorithm 4.4 + 5.1, as `torch.svd_lowrank(Wᵀ, q=rank, niter)`: no
    oversampling) instead of the exact one.

    Args:
      w: the kernel, (*stack, in_features, out_features), any float dtype.
      rank: r, in [1, min(in_features, out_features)].
      scale: the adapter's scale (alpha / r, or alpha / √r with rsLoRA).
      niter: None for the exact SVD; else the number of subspace (power) iterations.
      rng: PRNG key of the randomized SVD's Gaussian test matrix (required with `niter`).

    Returns:
      (a, b, residual): a (*stack, in, r) and b (*stack, r, out) in float32; residual =
      w − scale · a @ b in w's dtype.

    >>> w = jax.random.normal(jax.random.key(0), (2, 16, 8))  # two stacked layers
    >>> a, b, _ = pissa(w, 3, 1.0, niter=2, rng=jax.random.key(1))
    >>> a.shape, b.shape
    ((2, 16, 3), (2, 3, 8))
    """
    w32 = _float32(w, "pissa")
    _check_rank(w32, rank, "pissa")
    wt = jnp.swapaxes(w32, -1, -2)  # PEFT's (out, in) weight
    if niter is None:
        v, s, uh = jnp.linalg.svd(wt, full_matrices=False)
        v, s, uh = v[..., :rank], s[..., :rank], uh[..., :rank, :]
    else:
        if rng is None:
            raise ValueError("pissa with niter (randomized SVD) needs rng, a PRNG key")
        if niter < 0:
            raise ValueError(f"pissa: niter must be >= 0, got {niter}")
        v, s, u = svd_lowrank(rng, wt, rank, niter)
        uh = jnp.swapaxes(u, -1, -2)
    root = jnp.sqrt(s / scale)
    lora_a = root[..., :, None] * uh  # (r, in)
    lora_b = v * root[..., None, :]  # (out, r)
    a, b = jnp.swapaxes(lora_a, -1, -2), jnp.swapaxes(lora_b, -1, -2)
    return a, b, _residual(w32, a, b, scale, w.dtype)


def olora(w: jax.Array, rank: int, scale: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """OLoRA: the factors from a QR decomposition of `w`, as PEFT's `olora_init`.

    With Wᵀ = Q R (PEFT's (out, in) weight, reduced QR), lora_A = R[:r] and lora_B = Q[:, :r]:
    A = R[:r]ᵀ, B = Q[:, :r]ᵀ. Unlike PiSSA the factors are *not* divided by the scale, so the
    residual w − scale · A @ B depends on it (PEFT's convention, kept for compatibility).

    Args:
      w: the kernel, (*stack, in_features, out_features), any float dtype.
      rank: r, in [1, min(in_features, out_features)].
      scale: the adapter's scale (alpha / r, or alpha / √r with rsLoRA).

    Returns:
      (a, b, residual) as for `pissa`.

    >>> a, b, residual = olora(jnp.eye(4, 3), rank=2, scale=0.5)
    >>> a.shape, b.shape, residual.dtype
    ((4, 2), (2, 3), dtype('float32'))
    """
    w32 = _float32(w, "olora")
    _check_rank(w32, rank, "olora")
    q, r = jnp.linalg.qr(jnp.swapaxes(w32, -1, -2))  # (out, k), (k, in)
    a = jnp.swapaxes(r[..., :rank, :], -1, -2)
    b = jnp.swapaxes(q[..., :, :rank], -1, -2)
    return a, b, _residual(w32, a, b, scale, w.dtype)


def svd_lowrank(
    rng: jax.Array, x: jax.Array, q: int, niter: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Randomized SVD x ≈ U diag(S) Vᵀ of rank `q`, batched over leading axes (`torch.svd_lowrank`).

    Halko et al. 2009: an orthonormal basis Q of x @ Ω (Ω Gaussian, (n, q)) refined by `niter`
    subspace iterations (re-orthonormalised by QR after every product), then the exact SVD of
    the small Qᵀ x. Like torch, a wide x is decomposed through its transpose.

    Returns:
      (u (*, m, q), s (*, q), v (*, n, q)), s descending.
    """
    m, n = x.shape[-2:]
    wide = m < n
    if wide:
        x = jnp.swapaxes(x, -1, -2)
    xt = jnp.swapaxes(x, -1, -2)
    omega = jax.random.normal(rng, (*x.shape[:-2], x.shape[-1], q), x.dtype)
    basis = jnp.linalg.qr(jnp.matmul(x, omega, precision=_HIGHEST))[0]
    for _ in range(niter):
        basis = jnp.linalg.qr(jnp.matmul(xt, basis, precision=_HIGHEST))[0]
        basis = jnp.linalg.qr(jnp.matmul(x, basis, precision=_HIGHEST))[0]
    small = jnp.matmul(jnp.swapaxes(basis, -1, -2), x, precision=_HIGHEST)  # (q, n)
    u, s, vh = jnp.linalg.svd(small, full_matrices=False)
    u, v = jnp.matmul(basis, u, precision=_HIGHEST), jnp.swapaxes(vh, -1, -2)
    return (v, s, u) if wide else (u, s, v)


def residual_to_lora(
    a0: jax.Array, b0: jax.Array, a: jax.Array, b: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """A trained PiSSA/OLoRA adapter as a rank-2r LoRA on the *original* base kernel.

    PEFT's `save_pretrained(path_initial_model_for_weight_conversion=...)`
    (`LoraModel.subtract_mutated_init`): W = W_res + s·A0@B0 and the trained kernel is
    W_res + s·A@B, so its change to W is s·(A@B − A0@B0) = s·[A | A0] @ [B ; −B0]. PEFT
    concatenates lora_A on dim 0 and lora_B on dim 1 in that order; here a2 = [a, a0] on the
    rank axis and b2 = [b; −b0].

    The scale s must stay the same: with the rank doubled, PEFT's saved config has r → 2r and
    lora_alpha → 2·alpha (alpha/r unchanged), or alpha → √2·alpha with rsLoRA (alpha/√r
    unchanged), rank_pattern and alpha_pattern values doubled (PEFT refuses the conversion for
    rsLoRA with rank/alpha patterns). `converted_alpha` gives the exported alpha.

    Args:
      a0, b0: the factors as initialised (`pissa`/`olora`), (*stack, in, r) and (*stack, r, out).
      a, b: the trained factors, same shapes, same scale.

    Returns:
      (a2 (*stack, in, 2r), b2 (*stack, 2r, out)) with the same scale: s·a2@b2 = s·(a@b − a0@b0).

    >>> a0, b0 = jnp.ones((5, 2)), jnp.ones((2, 3))
    >>> a2, b2 = residual_to_lora(a0, b0, 2 * a0, b0)
    >>> a2.shape, b2.shape, float((a2 @ b2)[0, 0])   # 2·2 − 1·2
    ((5, 4), (4, 3), 2.0)
    """
    if a.shape != a0.shape or b.shape != b0.shape:
        raise ValueError(
            f"residual_to_lora: trained factors {a.shape}, {b.shape} do not match the initial "
            f"ones {a0.shape}, {b0.shape}"
        )
    a2 = jnp.concatenate([a, a0.astype(a.dtype)], axis=-1)
    b2 = jnp.concatenate([b, -b0.astype(b.dtype)], axis=-2)
    return a2, b2


def converted_alpha(alpha: float, *, rslora: bool = False) -> float:
    """PEFT's lora_alpha for the rank-2r adapter of `residual_to_lora`, keeping the scale.

    >>> converted_alpha(16), converted_alpha(16, rslora=True) == 16 * 2**0.5
    (32, True)
    """
    return alpha * 2**0.5 if rslora else alpha * 2


def _float32(w, name):
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(
            f"{name} decomposes a float kernel, got dtype {w.dtype}: dequantize it first (and "
            "re-quantize the residual afterwards, as PEFT recommends)"
        )
    if w.ndim < 2:
        raise ValueError(f"{name} needs a kernel of shape (*stack, in, out), got {w.shape}")
    return w.astype(jnp.float32)


def _check_rank(w, rank, name):
    limit = min(w.shape[-2:])
    if not (isinstance(rank, int) and 1 <= rank <= limit):
        raise ValueError(
            f"{name} rank {rank} must be an int in [1, {limit}] for a kernel of shape {w.shape}"
        )


def _residual(w32, a, b, scale, dtype):
    product = jnp.matmul(a, b, precision=_HIGHEST)
    return (w32 - scale * product).astype(dtype)
