"""Autoregressive generation with a KV cache for the decoders (Llama family, GPT-2).

Prompts of different lengths are left-padded, so every row writes its next token into the same
cache slot; positions are counted over real tokens only. One `jax.jit` covers prefill and the
decode loop (`lax.while_loop`, which exits early once every row has hit a stop token).

Example:
    >>> tokens = generate(module, params, [[1, 5, 9], [1, 7]],
    ...                   Sampling(max_new_tokens=16, temperature=0.7, top_p=0.9, stop_tokens=(2,)),
    ...                   rng=jax.random.key(0))  # doctest: +SKIP

A prompt plus `max_new_tokens` must fit the model's positions (`max_positions`); settings and
prompts that cannot work raise `SamplingError` (a `lorax_ft.errors.UserError`) before anything
is compiled.
"""

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax_ft.errors import UserError


class SamplingError(UserError, ValueError):
    """Decoding settings or prompts that cannot work; the message names the setting."""


def max_positions(model_config: Any) -> int | None:
    """The most token positions a model takes (`max_position_embeddings` or GPT-2's
    `n_positions`), or None if its config does not say.

    Example:
      >>> from lorax_ft.models.gpt2 import Gpt2Config
      >>> max_positions(Gpt2Config(n_positions=64))
      64
    """
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How to pick tokens.

    Attributes:
      max_new_tokens: tokens generated per row (fewer if all rows stop).
      temperature: 0 means greedy (argmax); otherwise logits are divided by it before sampling.
      top_k: keep only the k most likely tokens (None: all).
      top_p: keep the smallest set of most likely tokens whose probability reaches top_p (None: all).
      stop_tokens: a row ends after emitting any of these (the stop token is kept in the output).
      pad_token: fills prompt padding and the output after a row has stopped.
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    stop_tokens: tuple[int, ...] = ()
    pad_token: int = 0

    def __post_init__(self):
        # Checked here, not in the jitted loop: a bad value would fail deep in XLA or, like a
        # huge max_new_tokens, allocate a cache of that length before anything runs.
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise SamplingError(f"max_new_tokens={self.max_new_tokens!r} must be an integer >= 1")
        if not isinstance(self.temperature, int | float) or not 0 <= self.temperature < np.inf:
            raise SamplingError(f"temperature={self.temperature!r} must be >= 0 (0 is greedy)")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise SamplingError(f"top_k={self.top_k!r} must be None or an integer >= 1")
        if self.top_p is not None and not (
            isinstance(self.top_p, int | float) and 0 < self.top_p <= 1
        ):
            raise SamplingError(f"top_p={self.top_p!r} must be None or in (0, 1]")
        if not isinstance(self.stop_tokens, tuple) or not all(map(_is_int, self.stop_tokens)):
            raise SamplingError(f"stop_tokens={self.stop_tokens!r} must be a tuple of token ids")
        if not _is_int(self.pad_token):
            raise SamplingError(f"pad_token={self.pad_token!r} must be a token id")


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def left_pad(prompts: Sequence[Sequence[int]], pad_token: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`(ids, mask)`, both `[B, max_len]` int32, with each prompt right-aligned.

    Example:
      >>> left_pad([[5, 6], [7]])[0].tolist()
      [[5, 6], [0, 7]]
    """
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_token, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            ids[row, width - len(prompt) :] = prompt
            mask[row, width - len(prompt) :] = 1
    return ids, mask


def sample_logits(logits: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
    """Next tokens `[B]` from logits `[B, vocab]` under `sampling` (greedy, temperature, top-k/p)."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / sampling.temperature
    if sampling.top_k is not None:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p is not None:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        # A token stays if the mass strictly before it is below top_p: the best token always stays.
        keep = (jnp.cumsum(probs, axis=-1) - probs) < sampling.top_p
        threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("module", "sampling"))
def _generate(module, params, ids, mask, rng, sampling: Sampling):
    batch, prompt_len = ids.shape
    steps = sampling.max_new_tokens
    key_mask = jnp.concatenate([mask, jnp.zeros((batch, steps), mask.dtype)], axis=1)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    logits, cache = module.apply(
        {"params": params},
        ids,
        attention_mask=key_mask,
        positions=positions,
        cache=module.init_cache(batch, prompt_len + steps),
    )
    stops = jnp.asarray(sampling.stop_tokens or (-1,), jnp.int32)

    def cond(carry):
        step, _, _, _, _, done, _, _ = carry
        return (step < steps) & ~jnp.all(done)

    def body(carry):
        step, cache, key_mask, last_logits, pos, done, rng, out = carry
        sub = rng
        if sampling.temperature != 0.0:  # greedy never draws; skipping the split saves compile time
            rng, sub = jax.random.split(rng)
        token = sample_logits(last_logits, sub, sampling)
        token = jnp.where(done, sampling.pad_token, token)
        out = out.at[:, step].set(token)
        done = done | jnp.isin(token, stops)
        key_mask = jax.lax.dynamic_update_slice(
            key_mask, jnp.ones((batch, 1), key_mask.dtype), (0, cache["index"])
        )
        pos = pos + 1
        logits, cache = module.apply(
            {"params": params},
            token[:, None],
            attention_mask=key_mask,
            positions=pos[:, None],
            cache=cache,
        )
        return step + 1, cache, key_mask, logits[:, -1], pos, done, rng, out

    out = jnp.full((batch, steps), sampling.pad_token, jnp.int32)
    carry = (
        0,
        cache,
        key_mask,
        logits[:, -1],
        positions[:, -1:][:, 0],
        jnp.zeros(batch, bool),
        rng,
        out,
    )
    return jax.lax.while_loop(cond, body, carry)[-1]


def generate(
    module: Any,
    params: Any,
    prompts: Sequence[Sequence[int]] | tuple[np.ndarray, np.ndarray],
    sampling: Sampling = Sampling(),
    rng: jax.Array | None = None,
) -> np.ndarray:
    """Generates continuations for a batch of prompts.

    Args:
      module: a decoder with `init_cache` (`LlamaForCausalLM`, `Gpt2LMHeadModel`).
      params: its parameters.
      prompts: token lists of any lengths, or an already left-padded `(ids, mask)` pair.
      sampling: decoding settings; part of the compiled program, so keep it fixed across calls.
      rng: PRNG key, required unless `sampling.temperature == 0`.

    Returns:
      int32 `[B, max_new_tokens]`: the new tokens only; after a row's stop token, `pad_token`.

    Raises:
      SamplingError: no prompts, an empty prompt, a token id outside the vocabulary, or a prompt
        plus `max_new_tokens` longer than the model's positions (`max_positions`).
    """
    if isinstance(prompts, tuple) and len(prompts) == 2 and isinstance(prompts[0], np.ndarray):
        ids, mask = prompts
    else:
        if not len(prompts):
            raise SamplingError("no prompts to generate from; give at least one")
        empty = [i for i, p in enumerate(prompts) if not len(p)]
        if empty:
            raise SamplingError(f"prompt {empty[0]} has no tokens; give each prompt some text")
        ids, mask = left_pad(prompts, sampling.pad_token)
    _check_fits(getattr(module, "config", None), np.asarray(ids), np.asarray(mask), sampling)
    if rng is None:
        if sampling.temperature != 0.0:
            raise ValueError("sampling with temperature > 0 needs an rng")
        rng = jax.random.key(0)
    out = _generate(module, params, jnp.asarray(ids), jnp.asarray(mask, jnp.int32), rng, sampling)
    return np.asarray(out)


def _check_fits(model_config: Any, ids: np.ndarray, mask: np.ndarray, sampling: Sampling) -> None:
    """Refuses prompts and lengths the model cannot take: positions past its last one, token
    ids outside its vocabulary (an embedding lookup would silently clamp them)."""
    vocab = getattr(model_config, "vocab_size", None)
    if isinstance(vocab, int):
        real = ids[mask.astype(bool)]
        bad = real[(real < 0) | (real >= vocab)]
        if bad.size:
            raise SamplingError(
                f"prompt token id {int(bad[0])} is outside the model's vocabulary [0, {vocab})"
            )
        if sampling.top_k is not None and sampling.top_k > vocab:
            raise SamplingError(f"top_k={sampling.top_k} exceeds the vocabulary size {vocab}")
    limit = max_positions(model_config)
    longest = int(mask.sum(axis=1).max()) if mask.size else 0
    if limit is None:
        return
    if longest >= limit:
        raise SamplingError(
            f"a prompt has {longest} tokens, the model takes {limit} positions in all; shorten "
            f"it below {limit} tokens to leave room for new ones"
        )
    if longest + sampling.max_new_tokens > limit:
        raise SamplingError(
            f"max_new_tokens={sampling.max_new_tokens} does not fit: the longest prompt has "
            f"{longest} tokens and the model takes {limit} positions; use max_new_tokens in "
            f"1..{limit - longest}"
        )
