"""Attention arithmetic without parameters: rotary embeddings, mask biases, GQA attention, KV cache.

A KV cache is a plain dict `{"k": [L, B, T, Hkv, D], "v": [L, B, T, Hkv, D], "index": int32[]}`.
`index` is the next slot to write; it is shared by the whole batch because prompts are left-padded,
so every row's newest token sits in the same slot. Which slots hold real tokens is told by the
key mask `[B, T]` that the caller passes along with the cache.

Example:
    >>> cache = init_cache(num_layers=2, batch=1, max_len=16, kv_heads=2, head_dim=8)
    >>> cache["k"].shape
    (2, 1, 16, 2, 8)
"""

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings, as in a Hugging Face config's `rope_scaling`/`rope_parameters`.

    Attributes:
      theta: base of the frequency ladder (`rope_theta`).
      rope_type: "default", "linear" or "llama3".
      factor: context extension factor ("linear", "llama3").
      low_freq_factor: "llama3" only.
      high_freq_factor: "llama3" only.
      original_max_position_embeddings: "llama3" only.
    """

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


def rope_inv_freq(head_dim: int, rope: RopeConfig) -> np.ndarray:
    """Inverse frequencies `[head_dim // 2]` (float32), following transformers' `ROPE_INIT_FUNCTIONS`."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(rope.theta) ** exponents)).astype(np.float32)
    if rope.rope_type == "default":
        return inv_freq
    if rope.rope_type == "linear":
        return (inv_freq / np.float32(rope.factor)).astype(np.float32)
    if rope.rope_type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(is_medium, smoothed, scaled).astype(np.float32)
    raise ValueError(
        f"unsupported rope_type {rope.rope_type!r}; supported: default, linear, llama3"
    )


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables `[B, S, head_dim]` for integer positions `[B, S]`."""
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates `x [B, S, H, D]` by half-split pairs (the HF `rotate_half` layout, not interleaved)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def mask_bias(
    key_mask: jax.Array | None,
    query_len: int,
    key_len: int,
    *,
    causal: bool,
    query_offset: jax.Array | int = 0,
    sliding_window: int | None = None,
) -> jax.Array:
    """Additive attention bias `[B or 1, 1, S, T]`: 0 where attending is allowed, a large negative else.

    Args:
      key_mask: `[B, T]`, nonzero for real tokens; None means all keys are real.
      query_len: S.
      key_len: T.
      causal: whether query slot i may only see key slots <= i.
      query_offset: slot of the first query (the cache index when decoding).
      sliding_window: if set, a query sees only the `sliding_window` most recent slots (Mistral).

    Returns:
      float32 bias, finite so fully masked rows (left padding) stay NaN-free.
    """
    q_slot = jnp.arange(query_len)[:, None] + query_offset
    k_slot = jnp.arange(key_len)[None, :]
    allowed = jnp.ones((query_len, key_len), bool)
    if causal:
        allowed &= k_slot <= q_slot
    if sliding_window is not None:
        allowed &= q_slot - k_slot < sliding_window
    allowed = allowed[None, None]
    if key_mask is not None:
        allowed = allowed & (key_mask[:, None, None, :] != 0)
    return jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias: jax.Array,
    *,
    scale: float | None = None,
    probs_dropout: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """Grouped-query attention: `q [B, S, H, D]`, `k, v [B, T, Hkv, D]` with H % Hkv == 0.

    Softmax runs in float32 whatever the compute dtype; `probs_dropout` (e.g. a bound
    `nn.Dropout`) is applied to the probabilities. Returns `[B, S, H * D]` in q's dtype.
    """
    b, s, h, d = q.shape
    kv_heads = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q = q.reshape(b, s, kv_heads, h // kv_heads, d)
    logits = jnp.einsum("bskgd,btkd->bkgst", q, k).astype(jnp.float32) * scale
    logits = logits + bias[:, :, None]  # bias [B, 1, S, T] broadcasts over (kv head, group)
    probs = jax.nn.softmax(logits, axis=-1)
    if probs_dropout is not None:
        probs = probs_dropout(probs)
    probs = probs.astype(v.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v)
    return out.reshape(b, s, h * d)


def init_cache(
    *, num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype=jnp.float32
) -> dict:
    """An empty KV cache (see the module docstring for its layout)."""
    shape = (num_layers, batch, max_len, kv_heads, head_dim)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "index": jnp.zeros((), jnp.int32),
    }


def write_cache(
    layer_cache: dict, k: jax.Array, v: jax.Array, index: jax.Array
) -> tuple[jax.Array, jax.Array, dict]:
    """Writes `k, v [B, S, Hkv, D]` at slot `index` of one layer's cache; returns full k, v and cache."""
    start = (0, index, 0, 0)
    k_all = jax.lax.dynamic_update_slice(layer_cache["k"], k.astype(layer_cache["k"].dtype), start)
    v_all = jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(layer_cache["v"].dtype), start)
    return k_all, v_all, {"k": k_all, "v": v_all}
