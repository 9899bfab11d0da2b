"""A zoo of user-style Flax models for the factored-LoRA conformance suite (test_conformance.py).

Each model is written the way people write models, with no thought of LoRA: subclasses of the
library layers, lifted transforms (remat, vmap, scan), shared and tied weights, kernels read by
hand. A `Case` builds one of them into a `Built` (model, params, inputs, spec) and says what
lorax_ft must do with it:

* by default its adapters must be computed factored, equal to the model run on merged params;
* `may_refuse` names the kernels for which refusing (one line naming the path) or computing
  merged with a warning naming the path is also acceptable: the kernel is used in a way that a
  factored x·A·B delta on a layer's output cannot reproduce (custom math on it, a transform of
  the weight, the weight read by hand). Exact is always acceptable too.
* `stacked` gives the factor shapes of kernels in a layer stack: one A and B per layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

import lorax_ft as lf

D, HIDDEN, OUT, HEADS, HEAD_DIM, VOCAB, LAYERS = 8, 16, 4, 2, 4, 20, 3
ALL_KERNELS = lf.Spec([(r".*(kernel|embedding)", lf.LoRA(rank=2, alpha=4))])


@dataclasses.dataclass
class Built:
    """A model ready to run: `model(params, *inputs, **kwargs)` is the computation compared.

    Attributes:
      model: a linen or NNX module.
      params: its params as a nested dict (linen's "params" collection; `lf.nnx_params` for NNX).
      inputs: positional call arguments (float arrays among them get input gradients).
      spec: which kernels get adapters.
      variables: linen collections other than params (batch_stats), passed as `variables=`.
      kwargs: call keyword arguments (linen: `mutable`, `rngs`, flags).
    """

    model: Any
    params: dict
    inputs: tuple
    spec: lf.Spec = ALL_KERNELS
    variables: dict = dataclasses.field(default_factory=dict)
    kwargs: dict = dataclasses.field(default_factory=dict)

    def reference(self) -> Callable:
        """`fn(params, *inputs)`: the unmodified model on the given (e.g. merged) params."""
        if isinstance(self.model, nnx.Module):
            graphdef, _, rest = nnx.split(self.model, nnx.Param, ...)
            return lambda p, *xs: nnx.merge(graphdef, p, rest)(*xs, **self.kwargs)
        return lambda p, *xs: self.model.apply({"params": p, **self.variables}, *xs, **self.kwargs)

    @property
    def call_kwargs(self) -> dict:
        """Keyword arguments for `lf.factored(model)` and `lf.infer_layouts`."""
        return {**self.kwargs, **({"variables": self.variables} if self.variables else {})}

    def factored(self) -> Callable:
        """`fn(params, adapters, *inputs)` through `lf.factored`."""
        fn = lf.factored(self.model)
        return lambda p, a, *xs: fn(p, a, *xs, **self.call_kwargs)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], Built]
    may_refuse: tuple[str, ...] = ()
    stacked: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = dataclasses.field(
        default_factory=dict
    )


def _x(*shape, seed=0):
    return jax.random.normal(jax.random.key(100 + seed), shape)


def _ids(*shape, seed=0):
    return jax.random.randint(jax.random.key(200 + seed), shape, 0, VOCAB)


def _linen(model, *inputs, spec=ALL_KERNELS, init_rngs=None, **kwargs) -> Built:
    rngs = {"params": jax.random.key(0), **(init_rngs or {})}
    init_kwargs = {k: v for k, v in kwargs.items() if k not in ("mutable", "rngs")}
    variables = nn.unbox(model.init(rngs, *inputs, **init_kwargs))
    params = variables.pop("params")
    return Built(model, params, inputs, spec, dict(variables), kwargs)


def _nnx(model, *inputs, spec=ALL_KERNELS) -> Built:
    return Built(model, lf.nnx_params(model), inputs, spec)


def _rms(x):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


# --------------------------------------------------------------------------------------------
# linen: plain layers


class Mlp(nn.Module):
    hidden: int = HIDDEN
    out: int = OUT

    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(self.hidden)(x))
        x = nn.gelu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.out)(x)


class MultiHeadProjections(nn.Module):
    """DenseGeneral d -> (heads, head_dim) and back over axis=(-2, -1); a token-mixing DenseGeneral."""

    @nn.compact
    def __call__(self, x):  # x: (batch, tokens, D)
        q = nn.DenseGeneral((HEADS, HEAD_DIM), name="q")(x)
        k = nn.DenseGeneral((HEADS, HEAD_DIM), use_bias=False, name="k")(jnp.tanh(x))
        o = nn.DenseGeneral(D, axis=(-2, -1), name="o")(jnp.tanh(q) * k)
        # MLP-Mixer style: mix the token axis (axis 1 of (batch, tokens, D)) with a kernel.
        mixed = nn.DenseGeneral(5, axis=1, name="token_mix")(o)  # (batch, D, 5)
        return mixed


class EinsumProjections(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Einsum((D, HEADS, HEAD_DIM), "btd,dnh->btnh", name="qkv")(x)
        return nn.Einsum((HEADS, HEAD_DIM, D), "btnh,nhd->btd", use_bias=False, name="out")(
            jnp.tanh(h)
        )


class TorchLayoutEinsum(nn.Module):
    """A kernel stored (out, in) as in a PyTorch checkpoint, applied with an einsum layer."""

    @nn.compact
    def __call__(self, x):
        return nn.Einsum((HIDDEN, D), "btd,od->bto", name="proj")(x)


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):  # NHWC
        x = nn.relu(nn.Conv(6, (3, 3), strides=2, padding=((1, 0), (2, 1)), name="conv1")(x))
        x = nn.relu(nn.Conv(8, (2, 3), kernel_dilation=(1, 2), padding="SAME", name="conv2")(x))
        return nn.Dense(OUT, name="head")(x.mean(axis=(1, 2)))


class GroupedConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), feature_group_count=2, name="grouped")(x))
        return nn.Dense(OUT, name="head")(x.mean(axis=(1, 2)))


class UpsampleNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.ConvTranspose(6, (3, 3), strides=(2, 2), name="up")(x)
        return nn.Dense(OUT, name="head")(x.mean(axis=(1, 2)))


class TiedEmbedLM(nn.Module):
    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(VOCAB, D, name="embed")
        h = nn.gelu(nn.Dense(D, name="mix")(embed(ids)))
        return embed.attend(h)


class BatchNormDropout(nn.Module):
    train: bool = False

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(HIDDEN, name="fc1")(x)
        x = nn.BatchNorm(use_running_average=not self.train, name="bn")(x)
        x = nn.Dropout(0.3, deterministic=not self.train)(nn.relu(x))
        return nn.Dense(OUT, name="fc2")(x)


class GroupedProjections(nn.Module):
    """q/k/v read one normalised input, gate/up another: the factored path shares x·[A1 A2 A3]."""

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="norm1")(x)
        q = nn.Dense(D, name="q_proj")(h)
        k = nn.Dense(D, name="k_proj")(h)
        v = nn.Dense(D, use_bias=False, name="v_proj")(h)
        att = jax.nn.softmax(jnp.einsum("btd,bsd->bts", q, k) / jnp.sqrt(D), axis=-1)
        x = x + nn.Dense(D, name="o_proj")(jnp.einsum("bts,bsd->btd", att, v))
        h = nn.LayerNorm(name="norm2")(x)
        gate = nn.Dense(HIDDEN, use_bias=False, name="gate_proj")(h)
        up = nn.Dense(HIDDEN, use_bias=False, name="up_proj")(h)
        return x + nn.Dense(D, use_bias=False, name="down_proj")(nn.silu(gate) * up)


# Different ranks and scales within one group: the shared x·[A_q A_k A_v] has uneven blocks.
GROUPED_SPEC = lf.Spec(
    [
        (r"q_proj/kernel", lf.LoRA(rank=2, alpha=4)),
        (r"k_proj/kernel", lf.LoRA(rank=3, alpha=1)),
        (r"v_proj/kernel", lf.LoRA(rank=1, alpha=2, rslora=True)),
        (r"(o|gate|up|down)_proj/kernel", lf.LoRA(rank=2, alpha=8)),
    ]
)


# --------------------------------------------------------------------------------------------
# linen: subclasses of nn.Dense


class HookedDense(nn.Dense):
    """A subclass that only forwards (where a user would add logging or a sharding hint)."""

    def __call__(self, x):
        return super().__call__(x)


class MupOutputDense(nn.Dense):
    """muP-style readout: the layer output times a fixed multiplier."""

    multiplier: float = 2.0

    def __call__(self, x):
        return self.multiplier * super().__call__(x)


class NormalizedInputDense(nn.Dense):
    """RMS-normalises its input before the projection."""

    def __call__(self, x):
        return super().__call__(_rms(x))


class ResidualDense(nn.Dense):
    def __call__(self, x):
        return x + super().__call__(x)


class PreNormResidualDense(ResidualDense):
    """Two levels of subclassing: pre-norm on top of a residual Dense on top of nn.Dense."""

    def __call__(self, x):
        return super().__call__(_rms(x))


class WithLayer(nn.Module):
    """Runs `layer_cls(features, name='proj')` between two plain Dense layers."""

    layer_cls: type
    features: int = D

    @nn.compact
    def __call__(self, x):
        h = nn.tanh(nn.Dense(D, name="inp")(x))
        h = nn.tanh(self.layer_cls(self.features, name="proj")(h))
        return nn.Dense(OUT, name="out")(h)


# --------------------------------------------------------------------------------------------
# linen: sharing, tying and lifted transforms


class CalledTwice(nn.Module):
    """One Dense applied twice (ALBERT/universal-transformer style weight reuse)."""

    def setup(self):
        self.step = nn.Dense(D)

    def __call__(self, x):
        return self.step(nn.tanh(self.step(x)))


class Branch(nn.Module):
    proj: nn.Module

    @nn.compact
    def __call__(self, x):
        return nn.gelu(self.proj(inputs=x)) + nn.Dense(D, name="own")(x)


class SharedBetweenChildren(nn.Module):
    """One Dense instance handed to two child modules."""

    @nn.compact
    def __call__(self, x):
        shared = nn.Dense(D, name="shared")
        return Branch(shared, name="left")(x) * Branch(shared, name="right")(jnp.flip(x, -1))


class EncoderDecoder(nn.Module):
    """Run through another method than __call__: `model.apply(..., method="encode")`."""

    def setup(self):
        self.encoder = Mlp(out=D)
        self.decoder = nn.Dense(OUT)

    def encode(self, x):
        return self.encoder(x)

    def __call__(self, x):
        return self.decoder(nn.tanh(self.encode(x)))


class UserGatedDense(nn.Module):
    """flax's `nn.share_scope` pattern: a wrapper adds its own param in the wrapped Dense's scope."""

    base: nn.Dense

    def setup(self):
        nn.share_scope(self, self.base)

    @nn.compact
    def __call__(self, x):
        gate = self.param("gate", nn.initializers.normal(1.0), (self.base.features,))
        return self.base(x) * jax.nn.sigmoid(gate)


class ShareScopeModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        dense = nn.Dense(HIDDEN)
        return nn.Dense(OUT, name="head")(nn.tanh(UserGatedDense(dense)(x)))


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(HIDDEN, name="up")(nn.LayerNorm()(x)))
        return x + nn.Dense(D, name="down")(h)


class RematModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.remat(Block)(name="block0")(x)
        x = nn.remat(Block, prevent_cse=False)(name="block1")(x)
        return nn.Dense(OUT, name="head")(x)


class Ensemble(nn.Module):
    """nn.vmap over an ensemble axis: every member has its own weights, all see the same input."""

    @nn.compact
    def __call__(self, x):
        members = nn.vmap(
            Mlp,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=None,
            out_axes=0,
            axis_size=3,
        )
        return members(name="members")(x).mean(axis=0)


class PerExample(nn.Module):
    """nn.vmap with broadcast params: one set of weights mapped over the batch."""

    @nn.compact
    def __call__(self, x):
        per_example = nn.vmap(
            Mlp, in_axes=0, out_axes=0, variable_axes={"params": None}, split_rngs={"params": False}
        )
        return per_example(name="mapped")(x)


class ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return Block(name="block")(x), None


class ScanLayers(nn.Module):
    @nn.compact
    def __call__(self, x):
        stack = nn.scan(
            ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=LAYERS
        )
        x, _ = stack(name="layers")(x, None)
        return nn.Dense(OUT, name="head")(x)


class RnnCell(nn.Module):
    @nn.compact
    def __call__(self, h, x):
        h = jnp.tanh(nn.Dense(D, name="hh")(h) + nn.Dense(D, use_bias=False, name="xh")(x))
        return h, nn.Dense(OUT, name="readout")(h)


class Rnn(nn.Module):
    """nn.scan over time with the cell's params broadcast to every step."""

    @nn.compact
    def __call__(self, xs):  # (batch, time, D)
        scan = nn.scan(
            RnnCell,
            variable_broadcast="params",
            split_rngs={"params": False},
            in_axes=1,
            out_axes=1,
        )
        h0 = jnp.zeros((xs.shape[0], D))
        _, ys = scan(name="cell")(h0, xs)
        return ys


# --------------------------------------------------------------------------------------------
# linen: kernels used other than through a layer's own call


class HandWrittenProjection(nn.Module):
    """`self.param` + `jnp.dot`: a kernel named `kernel`, but no library layer computes with it."""

    @nn.compact
    def __call__(self, x):
        w = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], HIDDEN))
        return jnp.dot(nn.tanh(x), w)


class HandWrittenModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(OUT, name="head")(HandWrittenProjection(name="hand")(x))


class HandTiedAutoencoder(nn.Module):
    """The decoder reuses the encoder's kernel, read directly, transposed (weight tying by hand)."""

    def setup(self):
        self.enc = nn.Dense(HIDDEN)

    def __call__(self, x):
        h = nn.tanh(self.enc(x))
        w = self.enc.variables["params"]["kernel"]
        return h @ w.T


class WeightNormModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.WeightNorm(nn.Dense(HIDDEN, name="proj"), name="wn")(x)
        return nn.Dense(OUT, name="head")(nn.tanh(h))


def _keep_top_half(variables):
    """A fixed pruning mask: zero the first half of the kernel's input rows."""
    params = variables.get("params", {})
    if "kernel" not in params:  # at init, before the kernel exists
        return variables
    rows = jnp.arange(params["kernel"].shape[0]) >= params["kernel"].shape[0] // 2
    return {**variables, "params": {**params, "kernel": params["kernel"] * rows[:, None]}}


class PrunedModel(nn.Module):
    """nn.map_variables masks the kernel before the Dense sees it (magnitude pruning)."""

    @nn.compact
    def __call__(self, x):
        pruned = nn.map_variables(nn.Dense, "params", trans_in_fn=_keep_top_half, init=True)
        h = pruned(HIDDEN, name="pruned")(x)
        return nn.Dense(OUT, name="head")(nn.tanh(h))


class RematPrunedModel(nn.Module):
    """The pruned block inside nn.remat: the mask is applied inside a lifted transform."""

    @nn.compact
    def __call__(self, x):
        return nn.remat(PrunedModel)(name="block")(x)


def _fake_quant_dot_general(lhs, rhs, dimension_numbers, precision=None, **kw):
    """Fake-quantised matmul: the kernel rounded to bfloat16 (as AQT-style training does)."""
    rhs = rhs.astype(jnp.bfloat16).astype(lhs.dtype)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, **kw)


class FakeQuantModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(HIDDEN, dot_general=_fake_quant_dot_general, name="quant")(x)
        return nn.Dense(OUT, name="head")(nn.tanh(h))


class BatchDimsModel(nn.Module):
    """DenseGeneral with a batch dim: one kernel per head, applied per head."""

    @nn.compact
    def __call__(self, x):  # (HEADS, batch, D)
        h = nn.DenseGeneral(HEAD_DIM, axis=-1, batch_dims=0, name="per_head")(x)
        return jnp.tanh(h).sum(axis=0)


# --------------------------------------------------------------------------------------------
# NNX


class NnxMlp(nnx.Module):
    def __init__(self, rngs, linear_cls=nnx.Linear):
        self.fc1 = nnx.Linear(D, HIDDEN, rngs=rngs)
        self.proj = linear_cls(HIDDEN, HIDDEN, rngs=rngs)
        self.fc2 = nnx.Linear(HIDDEN, OUT, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.gelu(self.proj(nnx.gelu(self.fc1(x)))))


class NnxHookedLinear(nnx.Linear):
    def __call__(self, x):
        return super().__call__(x)


class NnxMupLinear(nnx.Linear):
    def __call__(self, x):
        return 2.0 * super().__call__(x)


class NnxNormalizedInputLinear(nnx.Linear):
    def __call__(self, x):
        return super().__call__(_rms(x))


class NnxMultiHead(nnx.Module):
    def __init__(self, rngs):
        self.q = nnx.LinearGeneral(D, (HEADS, HEAD_DIM), rngs=rngs)
        self.o = nnx.LinearGeneral((HEADS, HEAD_DIM), D, axis=(-2, -1), rngs=rngs)

    def __call__(self, x):
        return self.o(jnp.tanh(self.q(x)))


class NnxEinsum(nnx.Module):
    def __init__(self, rngs):
        self.qkv = nnx.Einsum("btd,dnh->btnh", (D, HEADS, HEAD_DIM), (HEADS, HEAD_DIM), rngs=rngs)
        self.out = nnx.Einsum("btnh,nhd->btd", (HEADS, HEAD_DIM, D), rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.qkv(x)))


class NnxConvNet(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(3, 6, (3, 3), strides=2, padding=((1, 0), (2, 1)), rngs=rngs)
        self.conv2 = nnx.Conv(6, 8, (2, 2), padding="VALID", rngs=rngs)
        self.head = nnx.Linear(8, OUT, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv2(nnx.relu(self.conv1(x))))
        return self.head(x.mean(axis=(1, 2)))


class NnxTiedLM(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
        self.mix = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, ids):
        return self.embed.attend(nnx.gelu(self.mix(self.embed(ids))))


class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(D, HIDDEN, rngs=rngs)
        self.down = nnx.Linear(HIDDEN, D, rngs=rngs)

    def __call__(self, x):
        return x + self.down(nnx.gelu(self.up(x)))


class NnxScanLayers(nnx.Module):
    """flax's scan-over-layers idiom: blocks made with nnx.vmap, run with nnx.scan."""

    def __init__(self, rngs):
        @nnx.split_rngs(splits=LAYERS)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create_block(rngs: nnx.Rngs):
            return NnxBlock(rngs)

        self.blocks = create_block(rngs)
        self.head = nnx.Linear(D, OUT, rngs=rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def forward(x, block):
            return block(x)

        return self.head(forward(x, self.blocks))


class NnxEnsemble(nnx.Module):
    """flax's ensemble idiom: members made with nnx.vmap, applied with nnx.vmap(in_axes=(0, None))."""

    def __init__(self, rngs):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create_member(rngs: nnx.Rngs):
            return NnxBlock(rngs)

        self.members = create_member(rngs)

    def __call__(self, x):
        @nnx.vmap(in_axes=(0, None), out_axes=0)
        def forward(member, x):
            return member(x)

        return forward(self.members, x).mean(axis=0)


class NnxBatchNormDropout(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(D, HIDDEN, rngs=rngs)
        self.bn = nnx.BatchNorm(HIDDEN, rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)
        self.fc2 = nnx.Linear(HIDDEN, OUT, rngs=rngs)

    def __call__(self, x):
        return self.fc2(self.drop(nnx.relu(self.bn(self.fc1(x)))))


def _nnx_eval(model):
    model.eval()  # BatchNorm uses its running statistics, Dropout is off
    return model


class NnxRemat(nnx.Module):
    def __init__(self, rngs):
        self.block = NnxBlock(rngs)
        self.head = nnx.Linear(D, OUT, rngs=rngs)

    def __call__(self, x):
        x = nnx.remat(lambda block, x: block(x))(self.block, x)
        return self.head(x)


class NnxCalledTwice(nnx.Module):
    def __init__(self, rngs):
        self.step = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, x):
        return self.step(jnp.tanh(self.step(x)))


class NnxHandWritten(nnx.Module):
    def __init__(self, rngs):
        self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (D, HIDDEN)))
        self.head = nnx.Linear(HIDDEN, OUT, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.tanh(x) @ self.kernel[...])


class NnxHandTied(nnx.Module):
    def __init__(self, rngs):
        self.enc = nnx.Linear(D, HIDDEN, rngs=rngs)

    def __call__(self, x):
        return jnp.tanh(self.enc(x)) @ self.enc.kernel[...].T


# --------------------------------------------------------------------------------------------
# The model zoo


def _bert() -> Built:
    from lorax_ft.models import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=VOCAB, hidden_size=D, num_hidden_layers=2, num_attention_heads=HEADS,
        intermediate_size=HIDDEN, max_position_embeddings=16, num_labels=3, scan_layers=True,
    )  # fmt: skip
    ids = _ids(2, 5)
    mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    spec = lf.Spec(
        [
            (r".*(query|key|value)/kernel", lf.LoRA(rank=2, alpha=4)),
            (r".*attention/output/dense/kernel", lf.LoRA(rank=2)),
            (r".*(intermediate|output)/dense/kernel", lf.LoRA(rank=3, alpha=6)),
            (r".*word_embeddings/embedding", lf.LoRA(rank=2)),
            (r"classifier/kernel", lf.LoRA(rank=2)),
        ]
    )
    return _linen(BertForSequenceClassification(config), ids, mask, spec=spec)


def _stack(path, fan_in, fan_out, rank=2, layers=LAYERS):
    return {path: ((layers, fan_in, rank), (layers, rank, fan_out))}


_IMG = (2, 7, 9, 3)

CASES = [
    # linen: library layers used as intended: must be factored and exact.
    Case("linen_mlp", lambda: _linen(Mlp(), _x(3, D))),
    Case("linen_sequential", lambda: _linen(
        nn.Sequential([nn.Dense(HIDDEN), nn.relu, nn.Dense(OUT)]), _x(3, D))),
    Case("linen_dense_general_multi_axis", lambda: _linen(MultiHeadProjections(), _x(2, 5, D))),
    Case("linen_einsum", lambda: _linen(EinsumProjections(), _x(2, 5, D))),
    Case("linen_conv_strided_padded", lambda: _linen(ConvNet(), _x(*_IMG))),
    Case("linen_tied_embedding_attend", lambda: _linen(TiedEmbedLM(), _ids(2, 6))),
    Case("linen_batchnorm_dropout_eval", lambda: _linen(BatchNormDropout(), _x(6, D))),
    Case("linen_batchnorm_dropout_train", lambda: _linen(
        BatchNormDropout(train=True), _x(6, D), init_rngs={"dropout": jax.random.key(1)},
        mutable=["batch_stats"], rngs={"dropout": jax.random.key(9)})),
    Case("linen_grouped_qkv_gate_up", lambda: _linen(
        GroupedProjections(), _x(2, 5, D), spec=GROUPED_SPEC)),
    # linen: subclasses of nn.Dense (exact factored, or announced fallback, never wrong).
    Case("linen_dense_subclass_super", lambda: _linen(WithLayer(HookedDense), _x(3, D)),
         may_refuse=("proj/kernel",)),
    Case("linen_dense_subclass_scaled_output", lambda: _linen(WithLayer(MupOutputDense), _x(3, D)),
         may_refuse=("proj/kernel",)),
    Case("linen_dense_subclass_normalized_input", lambda: _linen(
        WithLayer(NormalizedInputDense), _x(3, D)), may_refuse=("proj/kernel",)),
    Case("linen_dense_subclass_two_levels", lambda: _linen(
        WithLayer(PreNormResidualDense), _x(3, D)), may_refuse=("proj/kernel",)),
    # linen: sharing and lifted transforms.
    Case("linen_dense_called_twice", lambda: _linen(CalledTwice(), _x(3, D))),
    Case("linen_shared_between_children", lambda: _linen(SharedBetweenChildren(), _x(3, D))),
    Case("linen_share_scope", lambda: _linen(ShareScopeModel(), _x(3, D))),
    Case("linen_apply_other_method", lambda: _linen(EncoderDecoder(), _x(3, D), method="encode")),
    Case("linen_remat", lambda: _linen(RematModel(), _x(3, D))),
    Case("linen_vmap_ensemble", lambda: _linen(Ensemble(), _x(3, D)),
         stacked={**_stack("members/Dense_0/kernel", D, HIDDEN, layers=3),
                  **_stack("members/Dense_2/kernel", HIDDEN, OUT, layers=3)}),
    Case("linen_vmap_broadcast_params", lambda: _linen(PerExample(), _x(3, D))),
    Case("linen_scan_layers", lambda: _linen(ScanLayers(), _x(2, 5, D)),
         stacked={**_stack("layers/block/up/kernel", D, HIDDEN),
                  **_stack("layers/block/down/kernel", HIDDEN, D)}),
    Case("linen_scan_over_time_rnn", lambda: _linen(Rnn(), _x(2, 4, D))),
    # linen: kernels used other than through a supported layer call.
    Case("linen_einsum_torch_layout", lambda: _linen(TorchLayoutEinsum(), _x(2, 5, D)),
         may_refuse=("proj/kernel",)),
    Case("linen_grouped_conv", lambda: _linen(GroupedConvNet(), _x(*_IMG[:3], 4)),
         may_refuse=("grouped/kernel",)),
    Case("linen_conv_transpose", lambda: _linen(UpsampleNet(), _x(*_IMG)),
         may_refuse=("up/kernel",)),
    Case("linen_dense_general_batch_dims", lambda: _linen(BatchDimsModel(), _x(HEADS, 3, D)),
         may_refuse=("per_head/kernel",)),
    Case("linen_hand_written_param_dot", lambda: _linen(HandWrittenModel(), _x(3, D)),
         may_refuse=("hand/kernel",)),
    Case("linen_kernel_read_by_hand", lambda: _linen(HandTiedAutoencoder(), _x(3, D)),
         may_refuse=("enc/kernel",)),
    Case("linen_weight_norm", lambda: _linen(WeightNormModel(), _x(3, D)),
         may_refuse=("proj/kernel",)),
    Case("linen_map_variables_pruned", lambda: _linen(PrunedModel(), _x(3, D)),
         may_refuse=("pruned/kernel",)),
    Case("linen_map_variables_inside_remat", lambda: _linen(RematPrunedModel(), _x(3, D)),
         may_refuse=("block/pruned/kernel",)),
    Case("linen_fake_quant_dot_general", lambda: _linen(FakeQuantModel(), _x(3, D)),
         may_refuse=("quant/kernel",)),
    # NNX.
    Case("nnx_mlp", lambda: _nnx(NnxMlp(nnx.Rngs(0)), _x(3, D))),
    Case("nnx_linear_subclass_super", lambda: _nnx(NnxMlp(nnx.Rngs(0), NnxHookedLinear), _x(3, D)),
         may_refuse=("proj/kernel",)),
    Case("nnx_linear_subclass_scaled_output", lambda: _nnx(
        NnxMlp(nnx.Rngs(0), NnxMupLinear), _x(3, D)), may_refuse=("proj/kernel",)),
    Case("nnx_linear_subclass_normalized_input", lambda: _nnx(
        NnxMlp(nnx.Rngs(0), NnxNormalizedInputLinear), _x(3, D)), may_refuse=("proj/kernel",)),
    Case("nnx_linear_general_multi_axis", lambda: _nnx(NnxMultiHead(nnx.Rngs(0)), _x(2, 5, D))),
    Case("nnx_einsum", lambda: _nnx(NnxEinsum(nnx.Rngs(0)), _x(2, 5, D))),
    Case("nnx_conv_strided_padded", lambda: _nnx(NnxConvNet(nnx.Rngs(0)), _x(*_IMG))),
    Case("nnx_tied_embedding_attend", lambda: _nnx(NnxTiedLM(nnx.Rngs(0)), _ids(2, 6))),
    Case("nnx_vmap_scan_layers", lambda: _nnx(NnxScanLayers(nnx.Rngs(0)), _x(2, 5, D)),
         stacked={**_stack("blocks/up/kernel", D, HIDDEN),
                  **_stack("blocks/down/kernel", HIDDEN, D)}),
    Case("nnx_vmap_ensemble", lambda: _nnx(NnxEnsemble(nnx.Rngs(0)), _x(3, D)),
         stacked={**_stack("members/up/kernel", D, HIDDEN),
                  **_stack("members/down/kernel", HIDDEN, D)}),
    Case("nnx_sequential", lambda: _nnx(nnx.Sequential(
        nnx.Linear(D, HIDDEN, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(HIDDEN, OUT, rngs=nnx.Rngs(1))),
        _x(3, D))),
    Case("nnx_batchnorm_dropout_eval", lambda: _nnx(
        _nnx_eval(NnxBatchNormDropout(nnx.Rngs(0))), _x(6, D))),
    Case("nnx_remat", lambda: _nnx(NnxRemat(nnx.Rngs(0)), _x(3, D))),
    Case("nnx_linear_called_twice", lambda: _nnx(NnxCalledTwice(nnx.Rngs(0)), _x(3, D))),
    Case("nnx_hand_written_param_matmul", lambda: _nnx(NnxHandWritten(nnx.Rngs(0)), _x(3, D)),
         may_refuse=("kernel",)),
    Case("nnx_kernel_read_by_hand", lambda: _nnx(NnxHandTied(nnx.Rngs(0)), _x(3, D)),
         may_refuse=("enc/kernel",)),
    # The repo's own model zoo.
    Case("zoo_bert_scanned", _bert,
         stacked={"bert/encoder/layer/attention/self/query/kernel": ((2, D, 2), (2, 2, D))}),
]  # fmt: skip
