"""GPT-2: learned positions, pre-LayerNorm blocks, tanh-GELU MLP, fused `c_attn`, tied LM head.

Parameter paths mirror Hugging Face's `GPT2LMHeadModel` (`h.N` -> `h_N`). HF stores GPT-2 weights
as `Conv1D`, already `(in, out)`, so kernels here equal the HF tensors untransposed:

    transformer/wte/embedding             [vocab, embed]   (also the LM head: tied)
    transformer/wpe/embedding             [positions, embed]
    transformer/h_0/ln_1/{scale,bias}
    transformer/h_0/attn/c_attn/{kernel,bias}   [embed, 3 * embed]  (q | k | v)
    transformer/h_0/attn/c_proj/{kernel,bias}   [embed, embed]
    transformer/h_0/ln_2/{scale,bias}
    transformer/h_0/mlp/c_fc/{kernel,bias}      [embed, mlp]
    transformer/h_0/mlp/c_proj/{kernel,bias}    [mlp, embed]
    transformer/ln_f/{scale,bias}

Scanned (`scan_layers=True`): `transformer/h/...` with a leading layer axis. Dropout (embeddings,
attention probabilities, residual branches) is active with `deterministic=False` and a "dropout" rng.

Example:
    >>> cfg = Gpt2Config(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    >>> module = Gpt2LMHeadModel(cfg)
    >>> params = nn.unbox(module.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from lorax_ft.models import attention as attn_lib
from lorax_ft.models import layers
from lorax_ft.models.llama import decoder_inputs
from lorax_ft.models.stack import run_layers


@dataclasses.dataclass(frozen=True)
class Gpt2Config:
    """GPT-2 architecture (HF field names) plus runtime options (see `LlamaConfig`)."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    initializer_range: float = 0.02
    model_type: str = "gpt2"
    bos_token_id: int | None = 50256
    eos_token_ids: tuple[int, ...] = (50256,)
    pad_token_id: int | None = None
    scan_layers: bool = False
    remat: str = "none"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @property
    def mlp_width(self) -> int:
        return self.n_inner or 4 * self.n_embd

    def _dense(self, features, axes, name):
        return layers.dense(
            features,
            axes,
            name=name,
            use_bias=True,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            init_std=self.initializer_range,
        )

    def _norm(self, name):
        return layers.layer_norm(
            self.layer_norm_epsilon, name=name, dtype=self.dtype, param_dtype=self.param_dtype
        )


class Gpt2Attention(nn.Module):
    config: Gpt2Config
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, layer_cache, bias, index):
        cfg = self.config
        b, s, e = x.shape
        h = cfg.n_head
        qkv = cfg._dense(3 * e, ("embed", "heads"), "c_attn")(x)
        q, k, v = (t.reshape(b, s, h, e // h) for t in jnp.split(qkv, 3, axis=-1))
        new_cache = None
        if layer_cache is not None:
            k, v, new_cache = attn_lib.write_cache(layer_cache, k, v, index)
        drop = nn.Dropout(cfg.attn_pdrop, deterministic=self.deterministic)
        out = attn_lib.dot_product_attention(
            q, k.astype(q.dtype), v.astype(q.dtype), bias, probs_dropout=drop
        )
        return cfg._dense(e, ("heads", "embed"), "c_proj")(out), new_cache


class Gpt2MLP(nn.Module):
    config: Gpt2Config

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        hidden = layers.activation(cfg.activation_function)(
            cfg._dense(cfg.mlp_width, ("embed", "mlp"), "c_fc")(x)
        )
        return cfg._dense(cfg.n_embd, ("mlp", "embed"), "c_proj")(hidden)


class Gpt2Block(nn.Module):
    config: Gpt2Config
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, layer_cache, bias, index):
        cfg = self.config
        drop = nn.Dropout(cfg.resid_pdrop, deterministic=self.deterministic)
        attn, new_cache = Gpt2Attention(cfg, self.deterministic, name="attn")(
            cfg._norm("ln_1")(x), layer_cache, bias, index
        )
        x = x + drop(attn)
        x = x + drop(Gpt2MLP(cfg, name="mlp")(cfg._norm("ln_2")(x)))
        return x, new_cache


class Gpt2Model(nn.Module):
    """Embeddings, blocks and final LayerNorm; returns `(hidden [B, S, embed], new_cache)`."""

    config: Gpt2Config

    @nn.compact
    def __call__(
        self, input_ids, attention_mask, positions, cache, deterministic, tied_logits=False
    ):
        """Final hidden states, or with `tied_logits` the LM logits through the tied table."""
        cfg = self.config
        s = input_ids.shape[1]
        key_len, index, layer_cache, positions = decoder_inputs(
            input_ids, attention_mask, positions, cache
        )
        bias = attn_lib.mask_bias(attention_mask, s, key_len, causal=True, query_offset=index)
        emb = lambda n, axes, name: layers.embed(
            n,
            cfg.n_embd,
            axes,
            name=name,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            init_std=cfg.initializer_range,
        )
        wte = emb(cfg.vocab_size, ("vocab", "embed"), "wte")
        x = wte(input_ids)
        x = x + emb(cfg.n_positions, (None, "embed"), "wpe")(positions)
        x = nn.Dropout(cfg.embd_pdrop, deterministic=deterministic)(x)
        x, new_cache = run_layers(
            Gpt2Block,
            {"config": cfg, "deterministic": deterministic},
            x,
            layer_cache,
            bias,
            index,
            num_layers=cfg.n_layer,
            name="h",
            scan_layers=cfg.scan_layers,
            remat=cfg.remat,
        )
        x = cfg._norm("ln_f")(x)
        if cache is not None:
            new_cache = {**new_cache, "index": index + s}
        if tied_logits:
            # Through the embedding module, so that whatever wraps it (a LoRA adapter on the
            # table, say) applies to the LM head as well.
            x = wte.attend(x)
        return x, new_cache


class Gpt2LMHeadModel(nn.Module):
    """GPT-2 with its tied LM head; same call contract as `LlamaForCausalLM` plus `deterministic`."""

    config: Gpt2Config

    @nn.compact
    def __call__(
        self, input_ids, attention_mask=None, positions=None, cache=None, deterministic=True
    ):
        cfg = self.config
        model = Gpt2Model(cfg, name="transformer")
        logits, new_cache = model(
            input_ids, attention_mask, positions, cache, deterministic, tied_logits=True
        )
        logits = logits.astype(jnp.float32)
        return logits if cache is None else (logits, new_cache)

    def init_cache(self, batch: int, max_len: int) -> dict:
        """An empty KV cache for `batch` rows of up to `max_len` tokens (prompt + generated)."""
        cfg = self.config
        return attn_lib.init_cache(
            num_layers=cfg.n_layer,
            batch=batch,
            max_len=max_len,
            kv_heads=cfg.n_head,
            head_dim=cfg.n_embd // cfg.n_head,
            dtype=cfg.dtype,
        )
