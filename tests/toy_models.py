"""Small, unmodified Flax models the tests adapt: written as users write them, with no LoRA hooks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

HIDDEN, HEADS, HEAD_DIM, MLP, VOCAB = 32, 4, 8, 48, 50


class Attention(nn.Module):
    """Multi-axis projections: q/k/v kernels (d, heads, head_dim), o kernel (heads, head_dim, d)."""

    @nn.compact
    def __call__(self, x):
        proj = lambda name: nn.DenseGeneral((HEADS, HEAD_DIM), use_bias=False, name=name)(x)
        q, k, v = proj("q_proj"), proj("k_proj"), proj("v_proj")
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(HEAD_DIM)
        causal = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
        probs = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        return nn.DenseGeneral(HIDDEN, axis=(-2, -1), use_bias=False, name="o_proj")(out)


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        gate = nn.Dense(MLP, use_bias=False, name="gate_proj")(x)
        up = nn.Dense(MLP, use_bias=False, name="up_proj")(x)
        return nn.Dense(HIDDEN, use_bias=False, name="down_proj")(nn.silu(gate) * up)


class LlamaBlock(nn.Module):
    """A Llama-style pre-norm decoder block."""

    @nn.compact
    def __call__(self, x, _=None):
        x = x + Attention(name="attn")(nn.RMSNorm(name="attn_norm")(x))
        x = x + Mlp(name="mlp")(nn.RMSNorm(name="mlp_norm")(x))
        return x, None


class TinyLlama(nn.Module):
    """Embedding, decoder blocks (a Python loop or one `nn.scan`), norm and an untied LM head."""

    layers: int = 2
    scan: bool = False

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(VOCAB, HIDDEN, name="embed_tokens")(ids)
        if self.scan:
            stack = nn.scan(
                LlamaBlock,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                length=self.layers,
            )
            x, _ = stack(name="layers")(x, None)
        else:
            for i in range(self.layers):
                x, _ = LlamaBlock(name=f"layers_{i}")(x)
        x = nn.RMSNorm(name="norm")(x)
        return nn.Dense(VOCAB, use_bias=False, name="lm_head")(x)


class EinsumBlock(nn.Module):
    """nn.Einsum projections, as in gemma-style code."""

    @nn.compact
    def __call__(self, x):
        h = nn.Einsum((HIDDEN, HEADS, HEAD_DIM), "btd,dnh->btnh", name="qkv")(x)
        return nn.Einsum((HEADS, HEAD_DIM, HIDDEN), "btnh,nhd->btd", name="out")(jnp.tanh(h))


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), name="conv1")(x))
        x = nn.relu(nn.Conv(16, (3, 3), strides=2, padding="VALID", name="conv2")(x))
        return nn.Dense(10, name="head")(x.mean(axis=(1, 2)))


class TiedEmbedLM(nn.Module):
    """Embedding lookup in, the same table's `attend` out (tied LM head)."""

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(VOCAB, HIDDEN, name="embed")
        h = nn.gelu(nn.Dense(HIDDEN, name="mix")(embed(ids)))
        return embed.attend(h)


class NnxModel(nnx.Module):
    """Every NNX layer kind the factored path supports."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, HIDDEN, rngs=rngs)
        self.q = nnx.LinearGeneral(HIDDEN, (HEADS, HEAD_DIM), rngs=rngs)
        self.k = nnx.LinearGeneral(HIDDEN, (HEADS, HEAD_DIM), rngs=rngs)
        self.mix = nnx.Einsum("btnh,nhd->btd", (HEADS, HEAD_DIM, HIDDEN), rngs=rngs)
        self.conv = nnx.Conv(HIDDEN, HIDDEN, kernel_size=(3,), rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(HIDDEN, HIDDEN, rngs=rngs) for _ in range(2)])

    def __call__(self, ids):
        x = self.embed(ids)
        x = x + self.mix(jnp.tanh(self.q(x) * self.k(x)))
        x = x + self.conv(x)
        for block in self.blocks:
            x = x + nnx.gelu(block(x))
        return self.embed.attend(x)


def nonzero(adapters, seed=7):
    """Adapters with B (and A) perturbed, so that the delta is far from zero and a test on it
    can fail (PEFT's initialisation makes B zero)."""
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef,
        [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)],
    )
