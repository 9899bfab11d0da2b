"""BERT encoder (post-LayerNorm, GELU, token types, padding mask) and a sequence-classification head.

Parameter paths mirror Hugging Face's `BertModel` / `BertForSequenceClassification` state dicts
(`layer.N` -> `layer_N`; kernels are Linear weights transposed):

    embeddings/{word,position,token_type}_embeddings/embedding
    embeddings/LayerNorm/{scale,bias}
    encoder/layer_0/attention/self/{query,key,value}/{kernel,bias}
    encoder/layer_0/attention/output/dense/{kernel,bias}
    encoder/layer_0/attention/output/LayerNorm/{scale,bias}
    encoder/layer_0/intermediate/dense/{kernel,bias}
    encoder/layer_0/output/dense/{kernel,bias}
    encoder/layer_0/output/LayerNorm/{scale,bias}
    pooler/dense/{kernel,bias}              (add_pooling_layer)

`BertForSequenceClassification` nests all of that under `bert/` and adds `classifier/{kernel,bias}`.
Scanned: `encoder/layer/...` with a leading layer axis.

Example:
    >>> cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
    ...                  num_attention_heads=4, intermediate_size=64)
    >>> module = BertModel(cfg)
    >>> variables = module.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    >>> out = module.apply(nn.unbox(variables), jnp.zeros((1, 8), jnp.int32))
    >>> out.mean_embedding.shape
    (1, 32)
"""

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from lorax_ft.models import attention as attn_lib
from lorax_ft.models import layers
from lorax_ft.models.stack import run_layers


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """BERT architecture (HF field names) plus runtime options (see `LlamaConfig`).

    Attributes:
      num_labels: classifier outputs (`BertForSequenceClassification` only).
      classifier_pooling: what the classifier reads: "pooler" (HF), "cls" or "mean".
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    add_pooling_layer: bool = True
    num_labels: int = 2
    classifier_dropout: float | None = None
    classifier_pooling: str = "pooler"
    model_type: str = "bert"
    scan_layers: bool = False
    remat: str = "none"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

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

    def _norm(self):
        return layers.layer_norm(
            self.layer_norm_eps, name="LayerNorm", dtype=self.dtype, param_dtype=self.param_dtype
        )


@flax.struct.dataclass
class EncoderOutput:
    """What `BertModel` returns.

    Attributes:
      last_hidden_state: `[B, S, embed]`.
      cls_embedding: `[B, embed]`, the first token's final hidden state.
      mean_embedding: `[B, embed]`, hidden states averaged over real (mask != 0) tokens, the
        sentence-transformers pooling.
      pooler_output: `[B, embed]`, tanh(dense(cls)); None without a pooler.
    """

    last_hidden_state: jax.Array
    cls_embedding: jax.Array
    mean_embedding: jax.Array
    pooler_output: jax.Array | None


class BertEmbeddings(nn.Module):
    config: BertConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, input_ids, token_type_ids, positions):
        cfg = self.config
        emb = lambda n, axes, name: layers.embed(
            n,
            cfg.hidden_size,
            axes,
            name=name,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            init_std=cfg.initializer_range,
        )
        x = emb(cfg.vocab_size, ("vocab", "embed"), "word_embeddings")(input_ids)
        x = x + emb(cfg.max_position_embeddings, (None, "embed"), "position_embeddings")(positions)
        x = x + emb(cfg.type_vocab_size, (None, "embed"), "token_type_embeddings")(token_type_ids)
        x = cfg._norm()(x)
        return nn.Dropout(cfg.hidden_dropout_prob, deterministic=self.deterministic)(x)


class BertSelfAttention(nn.Module):
    config: BertConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, bias):
        cfg = self.config
        b, s, e = x.shape
        h = cfg.num_attention_heads
        q, k, v = (
            cfg._dense(e, ("embed", axes), name)(x).reshape(b, s, h, e // h)
            for name, axes in (("query", "heads"), ("key", "kv"), ("value", "kv"))
        )
        drop = nn.Dropout(cfg.attention_probs_dropout_prob, deterministic=self.deterministic)
        return attn_lib.dot_product_attention(q, k, v, bias, probs_dropout=drop)


class BertResidualOutput(nn.Module):
    """dense -> dropout -> LayerNorm(x + residual): HF's BertSelfOutput and BertOutput."""

    config: BertConfig
    axes: tuple[str, str]
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, residual):
        cfg = self.config
        x = cfg._dense(cfg.hidden_size, self.axes, "dense")(x)
        x = nn.Dropout(cfg.hidden_dropout_prob, deterministic=self.deterministic)(x)
        return cfg._norm()(x + residual)


class BertAttention(nn.Module):
    config: BertConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, bias):
        cfg = self.config
        attended = BertSelfAttention(cfg, self.deterministic, name="self")(x, bias)
        out = BertResidualOutput(cfg, ("heads", "embed"), self.deterministic, name="output")
        return out(attended, x)


class BertIntermediate(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dense = cfg._dense(cfg.intermediate_size, ("embed", "mlp"), "dense")
        return layers.activation(cfg.hidden_act)(dense(x))


class BertLayer(nn.Module):
    """Post-LN block; follows the `run_layers` contract with an always-None cache."""

    config: BertConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, layer_cache, bias):
        cfg = self.config
        x = BertAttention(cfg, self.deterministic, name="attention")(x, bias)
        hidden = BertIntermediate(cfg, name="intermediate")(x)
        x = BertResidualOutput(cfg, ("mlp", "embed"), self.deterministic, name="output")(hidden, x)
        return x, layer_cache


class BertEncoder(nn.Module):
    config: BertConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, bias):
        cfg = self.config
        x, _ = run_layers(
            BertLayer,
            {"config": cfg, "deterministic": self.deterministic},
            x,
            None,
            bias,
            num_layers=cfg.num_hidden_layers,
            name="layer",
            scan_layers=cfg.scan_layers,
            remat=cfg.remat,
        )
        return x


class BertPooler(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, cls):
        cfg = self.config
        # Output axis unnamed: one tensor cannot map two of its axes to the same mesh axis.
        return jnp.tanh(cfg._dense(cfg.hidden_size, ("embed", None), "dense")(cls))


class BertModel(nn.Module):
    """The encoder. `__call__(input_ids, attention_mask=None, token_type_ids=None,
    deterministic=True) -> EncoderOutput`; padding goes on the right (positions are 0..S-1)."""

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, deterministic=True):
        cfg = self.config
        b, s = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, s), jnp.int32)
        if token_type_ids is None:
            token_type_ids = jnp.zeros((b, s), jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(s), (b, s))
        x = BertEmbeddings(cfg, deterministic, name="embeddings")(
            input_ids, token_type_ids, positions
        )
        bias = attn_lib.mask_bias(attention_mask, s, s, causal=False)
        x = BertEncoder(cfg, deterministic, name="encoder")(x, bias)
        weights = attention_mask.astype(jnp.float32)[..., None]
        mean = (x.astype(jnp.float32) * weights).sum(1) / jnp.maximum(weights.sum(1), 1e-9)
        pooled = None
        if cfg.add_pooling_layer:
            pooled = BertPooler(cfg, name="pooler")(x[:, 0])
        return EncoderOutput(
            last_hidden_state=x, cls_embedding=x[:, 0], mean_embedding=mean, pooler_output=pooled
        )


class BertForSequenceClassification(nn.Module):
    """BERT plus dropout and a linear classifier over the pooled sequence; returns float32 logits
    `[B, num_labels]`. Same call arguments as `BertModel`."""

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, deterministic=True):
        cfg = self.config
        out = BertModel(cfg, name="bert")(input_ids, attention_mask, token_type_ids, deterministic)
        pooled = {
            "pooler": out.pooler_output,
            "cls": out.cls_embedding,
            "mean": out.mean_embedding,
        }[cfg.classifier_pooling]
        if pooled is None:
            raise ValueError("classifier_pooling='pooler' needs add_pooling_layer=True")
        rate = cfg.hidden_dropout_prob if cfg.classifier_dropout is None else cfg.classifier_dropout
        pooled = nn.Dropout(rate, deterministic=deterministic)(pooled)
        logits = cfg._dense(cfg.num_labels, ("embed", "labels"), "classifier")(pooled)
        return logits.astype(jnp.float32)
