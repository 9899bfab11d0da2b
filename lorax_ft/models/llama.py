"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM): RoPE, RMSNorm, SwiGLU, grouped-query attention.

Parameter paths mirror Hugging Face's `LlamaForCausalLM` state dict with `.` -> `/`, `layers.N` ->
`layers_N`, and Flax leaf names (`kernel` = Linear weight transposed, `embedding`, `scale`, `bias`):

    model/embed_tokens/embedding                    [vocab, embed]
    model/layers_0/input_layernorm/scale            [embed]
    model/layers_0/self_attn/{q,k,v,o}_proj/kernel  [embed, heads] / [embed, kv] / [heads, embed]
    model/layers_0/self_attn/{q,k,v}_proj/bias      (attention_bias / Qwen2)
    model/layers_0/post_attention_layernorm/scale
    model/layers_0/mlp/{gate,up,down}_proj/kernel   [embed, mlp] / [mlp, embed]
    model/norm/scale
    lm_head/kernel                                  [embed, vocab] (absent when tied)

With `scan_layers=True` the `layers_N` components collapse into one `layers` whose leaves gain a
leading `[num_layers]` axis, e.g. `model/layers/self_attn/q_proj/kernel`.

Example:
    >>> cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
    ...                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> module = LlamaForCausalLM(cfg)
    >>> params = nn.unbox(module.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    >>> logits = module.apply({"params": params}, jnp.zeros((1, 8), jnp.int32))
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from lorax_ft.models import attention as attn_lib
from lorax_ft.models import layers
from lorax_ft.models.stack import run_layers


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture plus runtime options of a Llama-family decoder.

    Attributes mirror the Hugging Face config fields of the same names, except:
      rope: theta and scaling of the rotary embedding.
      qkv_bias / o_bias: biases on q/k/v and on o_proj (Llama's `attention_bias` sets both; Qwen2
        has q/k/v bias only).
      eos_token_ids: all stop tokens (HF allows an int or a list).
      scan_layers: `nn.scan` over the layer stack (params get a leading `layers` axis).
      remat: "none", "full", "dots", "dots_no_batch" or "nothing".
      dtype / param_dtype: computation and parameter dtypes.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope: attn_lib.RopeConfig = dataclasses.field(default_factory=attn_lib.RopeConfig)
    max_position_embeddings: int = 4096
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    initializer_range: float = 0.02
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    scan_layers: bool = False
    remat: str = "none"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def _dense(self, features, axes, name, use_bias=False):
        return layers.dense(
            features,
            axes,
            name=name,
            use_bias=use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            init_std=self.initializer_range,
        )


class LlamaAttention(nn.Module):
    """Grouped-query self-attention with rotary embeddings and an optional KV cache."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, layer_cache, bias, cos, sin, index):
        cfg = self.config
        b, s, _ = x.shape
        h, kv, d = cfg.num_attention_heads, cfg.kv_heads, cfg.head_size
        q = cfg._dense(h * d, ("embed", "heads"), "q_proj", cfg.qkv_bias)(x).reshape(b, s, h, d)
        k = cfg._dense(kv * d, ("embed", "kv"), "k_proj", cfg.qkv_bias)(x).reshape(b, s, kv, d)
        v = cfg._dense(kv * d, ("embed", "kv"), "v_proj", cfg.qkv_bias)(x).reshape(b, s, kv, d)
        q, k = attn_lib.apply_rope(q, cos, sin), attn_lib.apply_rope(k, cos, sin)
        new_cache = None
        if layer_cache is not None:
            k, v, new_cache = attn_lib.write_cache(layer_cache, k, v, index)
        out = attn_lib.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), bias)
        return cfg._dense(cfg.hidden_size, ("heads", "embed"), "o_proj", cfg.o_bias)(out), new_cache


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: down(act(gate(x)) * up(x))."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        gate = cfg._dense(cfg.intermediate_size, ("embed", "mlp"), "gate_proj", cfg.mlp_bias)(x)
        up = cfg._dense(cfg.intermediate_size, ("embed", "mlp"), "up_proj", cfg.mlp_bias)(x)
        hidden = layers.activation(cfg.hidden_act)(gate) * up
        return cfg._dense(cfg.hidden_size, ("mlp", "embed"), "down_proj", cfg.mlp_bias)(hidden)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm residual block: attention then MLP."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, layer_cache, bias, cos, sin, index):
        cfg = self.config
        norm = lambda name: layers.rms_norm(
            cfg.rms_norm_eps, name=name, dtype=cfg.dtype, param_dtype=cfg.param_dtype
        )
        attn, new_cache = LlamaAttention(cfg, name="self_attn")(
            norm("input_layernorm")(x), layer_cache, bias, cos, sin, index
        )
        x = x + attn
        x = x + LlamaMLP(cfg, name="mlp")(norm("post_attention_layernorm")(x))
        return x, new_cache


def decoder_positions(attention_mask, seq_len, offset=0):
    """Token positions `[B, S]`: counted over real tokens so left padding does not shift them."""
    if attention_mask is None:
        return jnp.arange(seq_len)[None, :] + offset
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def decoder_inputs(input_ids, attention_mask, positions, cache):
    """What a decoder call needs besides its tokens: `(key_len, index, layer_cache, positions)`.

    Without a cache the keys are the tokens themselves; with one they are all its slots, new
    tokens go in at `cache["index"]`, and `positions` must be given.
    """
    s = input_ids.shape[1]
    if cache is None:
        key_len, index, layer_cache = s, jnp.zeros((), jnp.int32), None
    else:
        key_len, index = cache["k"].shape[2], cache["index"]
        layer_cache = {"k": cache["k"], "v": cache["v"]}
    if positions is None:
        if cache is not None:
            raise ValueError("decoding with a cache needs explicit positions")
        positions = decoder_positions(attention_mask, s)
    return key_len, index, layer_cache, positions


class LlamaModel(nn.Module):
    """Embeddings, decoder stack and final norm; returns hidden states `[B, S, embed]`."""

    config: LlamaConfig

    @nn.compact
    def __call__(
        self, input_ids, attention_mask=None, positions=None, cache=None, tied_logits=False
    ):
        """Hidden states, or with `tied_logits` the LM logits through the embedding table."""
        cfg = self.config
        s = input_ids.shape[1]
        key_len, index, layer_cache, positions = decoder_inputs(
            input_ids, attention_mask, positions, cache
        )
        bias = attn_lib.mask_bias(
            attention_mask,
            s,
            key_len,
            causal=True,
            query_offset=index,
            sliding_window=cfg.sliding_window,
        )
        cos, sin = attn_lib.rope_cos_sin(positions, attn_lib.rope_inv_freq(cfg.head_size, cfg.rope))
        embed_tokens = layers.embed(
            cfg.vocab_size,
            cfg.hidden_size,
            ("vocab", "embed"),
            name="embed_tokens",
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            init_std=cfg.initializer_range,
        )
        x = embed_tokens(input_ids)
        x, new_cache = run_layers(
            LlamaDecoderLayer,
            {"config": cfg},
            x,
            layer_cache,
            bias,
            cos,
            sin,
            index,
            num_layers=cfg.num_hidden_layers,
            name="layers",
            scan_layers=cfg.scan_layers,
            remat=cfg.remat,
        )
        x = layers.rms_norm(
            cfg.rms_norm_eps, name="norm", dtype=cfg.dtype, param_dtype=cfg.param_dtype
        )(x)
        if cache is not None:
            new_cache = {**new_cache, "index": index + s}
        if tied_logits:
            # Through the embedding module, so that whatever wraps it (a LoRA adapter on the
            # table, say) applies to the LM head as well.
            x = embed_tokens.attend(x)
        return x, new_cache


class LlamaForCausalLM(nn.Module):
    """Decoder plus LM head.

    `__call__(input_ids, attention_mask=None, positions=None, cache=None)`:
      input_ids: int `[B, S]`.
      attention_mask: `[B, S]` (no cache) or `[B, T]` over all cache slots (with a cache); nonzero
        marks real tokens. Padding goes on the left.
      positions: `[B, S]`; derived from the mask when omitted (required with a cache).
      cache: see `attention.init_cache`; when given, returns `(logits, new_cache)`.
    Returns float32 logits `[B, S, vocab]`.
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, positions=None, cache=None):
        cfg = self.config
        model = LlamaModel(cfg, name="model")
        tied = cfg.tie_word_embeddings
        hidden, new_cache = model(input_ids, attention_mask, positions, cache, tied_logits=tied)
        if tied:
            logits = hidden
        else:
            logits = cfg._dense(cfg.vocab_size, ("embed", "vocab"), "lm_head")(hidden)
        logits = logits.astype(jnp.float32)
        return logits if cache is None else (logits, new_cache)

    def init_cache(self, batch: int, max_len: int) -> dict:
        """An empty KV cache for `batch` rows of up to `max_len` tokens (prompt + generated)."""
        cfg = self.config
        return attn_lib.init_cache(
            num_layers=cfg.num_hidden_layers,
            batch=batch,
            max_len=max_len,
            kv_heads=cfg.kv_heads,
            head_dim=cfg.head_size,
            dtype=cfg.dtype,
        )
