"""A quantized frozen base (lorax_ft.quant): the codes, the bytes, and exactness of the adapted model.

The reference for a quantized model is the unmodified model on the explicitly dequantized and
merged params, `model.apply(lora.merge(dequantize(params), adapters))`: outputs and gradients
of the factored path on the quantized base must equal it.
"""

from __future__ import annotations

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_ft as lf
from lorax_ft import quant
from lorax_ft.quant.kernel import pack_nibbles
from lorax_ft.transform import lora
from lorax_ft.transform.factored import UnsupportedLayerError
from tests import conformance_models as cm
from tests import toy_models
from tests.test_conformance import _loss_and_grads
from tests.tolerance import assert_close

# NF4's 16 levels, Appendix E of the QLoRA paper (Dettmers et al., 2023): the reference codebook.
NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])  # fmt: skip


def _weights(*shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def test_nf4_equals_a_numpy_qlora_reference():
    """Blocks of 64 along the input axis: absmax scale, nearest NF4 level (as bitsandbytes)."""
    w = _weights(256, 48)
    q = quant.quantize_kernel(w, "nf4")
    blocks = np.asarray(w, np.float64).reshape(4, 64, 48)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    codes = np.abs(blocks / absmax - NF4[:, None, None, None]).argmin(axis=0)
    np.testing.assert_array_equal(np.asarray(q.codes()).reshape(4, 64, 48), codes)
    expected = (NF4[codes] * absmax).reshape(256, 48)
    assert_close(q.dequantize(), expected, 1e-6)
    assert q.values.dtype == jnp.uint8 and q.values.shape == (128, 48)


def test_int8_is_per_output_feature_absmax():
    w = _weights(3, 96, 40)  # a stack of 3 layers
    q = quant.quantize_kernel(w, "int8", stack=1)
    assert q.scales.shape == (3, 1, 40) and q.values.dtype == jnp.int8
    scale = np.abs(np.asarray(w)).max(axis=1, keepdims=True) / 127.5  # qwix's absmax bound
    assert_close(q.scales, scale, 1e-6)
    error = np.abs(np.asarray(q.dequantize()) - np.asarray(w))
    assert np.all(error <= 0.5 * scale + 1e-6)  # round to nearest


def test_multi_axis_kernels_block_along_their_last_input_axis():
    w = _weights(2, 64, 5, 3)  # (heads, head_dim) in, (5, 3) out: a DenseGeneral o-projection
    q = quant.quantize_kernel(w, "nf4", inputs=2)
    assert q.values.shape == (2, 32, 5, 3) and q.scales.shape == (2, 1, 5, 3)
    for i in range(2):  # each head's slice is an independent (64, 15) kernel
        alone = quant.quantize_kernel(w[i].reshape(64, 15), "nf4")
        np.testing.assert_array_equal(q.dequantize()[i].reshape(64, 15), alone.dequantize())
    i8 = quant.quantize_kernel(w, "int8", inputs=2)
    assert i8.scales.shape == (1, 1, 5, 3)  # one scale per output feature, over both inputs


def test_nibbles_are_packed_in_gguf_order():
    """In a block of B codes, byte j holds code j (low nibble) and code j + B/2 (high)."""
    codes = np.arange(64, dtype=np.uint8)[:, None] % 16
    packed = np.asarray(pack_nibbles(codes, 0, 64))
    assert packed.shape == (32, 1)
    for j in range(32):
        assert packed[j, 0] == codes[j, 0] | (codes[j + 32, 0] << 4)


def test_double_quantization_keeps_scales_within_int8_error():
    w = _weights(2, 576, 1536)  # SmolLM2-135M's MLP shape, 2 stacked layers
    plain = quant.quantize_kernel(w, "nf4", stack=1)
    double = quant.quantize_kernel(w, "nf4", stack=1, double_quant=True)
    exact, approx = np.asarray(plain.scales), np.asarray(double.block_scales())
    spread = np.abs(exact - exact.mean(axis=(1, 2), keepdims=True)).max()
    assert np.abs(approx - exact).max() <= spread / 127.0
    np.testing.assert_array_equal(plain.codes(), double.codes())


@pytest.mark.parametrize(
    ("method", "double_quant", "most"),
    [("int8", False, 1.07), ("nf4", False, 0.57), ("nf4", True, 0.52)],
)
def test_bytes_per_parameter(method, double_quant, most):
    """Measured from the arrays held, on SmolLM2-135M's kernel shapes (the issue's targets)."""
    for shape in [(576, 576), (576, 192), (576, 1536), (1536, 576)]:
        q = quant.quantize_kernel(_weights(*shape), method, double_quant=double_quant)
        assert quant.bytes_per_param(q) <= most, (shape, quant.bytes_per_param(q))
    assert quant.bytes_per_param(_weights(576, 576)) == 4.0


# ------------------------------------------------------------------------------------------
# The adapted model on a quantized base equals the model on the dequantized base + adapters

# One model of each layer kind and lifted transform (tests/conformance_models.py), quantized as
# int8 (no block constraint on these small widths), embedding tables included. (The repo's own
# BERT and Llama run quantized in test_quant_trainer.py and test_quant_sharded.py.)
CONFORMANCE = [
    "linen_mlp",
    "linen_dense_general_multi_axis",
    "linen_einsum",
    "linen_conv_strided_padded",
    "linen_tied_embedding_attend",
    "linen_dense_subclass_super",
    "linen_vmap_ensemble",
    "linen_scan_layers",
    "linen_kernel_read_by_hand",
    "nnx_mlp",
    "nnx_linear_general_multi_axis",
    "nnx_tied_embedding_attend",
    "nnx_vmap_scan_layers",
]
CASES = {c.name: c for c in cm.CASES}


def _loss_grads(apply, adapters, inputs):
    """(outputs, (d adapters, d float inputs)) of sum(out²), as the conformance suite takes them."""
    (_, out), grads = _loss_and_grads(apply, inputs)(adapters)
    return out, grads


@pytest.mark.parametrize("name", CONFORMANCE)
def test_quantized_base_equals_dequantized_base(name):
    case = CASES[name]
    built = case.build()
    layouts = lf.infer_layouts(built.model, built.params, *built.inputs, **built.call_kwargs)
    adapters = toy_models.nonzero(lora.init(jax.random.key(1), built.params, built.spec, layouts))
    params = quant.quantize(built.params, "int8", layouts, embeddings=True)
    assert quant.quantized_paths(params)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _loss_grads(lambda a, *xs: built.factored()(params, a, *xs), adapters, built.inputs)
    reference = built.reference()
    dequantized = quant.dequantize(params)
    want = _loss_grads(
        lambda a, *xs: reference(lora.merge(dequantized, a), *xs), adapters, built.inputs
    )
    for message in map(str, (w.message for w in caught)):
        # Only kernels the case reads outside a layer call may be dequantized whole (named).
        assert any(p in message for p in case.may_refuse), message
    assert_close(got[0], want[0], 1e-5)
    assert_close(got[1], want[1], 1e-4)


class _Block(nn.Module):
    """A Llama-style block whose input axes are multiples of NF4's block of 64 (head_dim too)."""

    @nn.compact
    def __call__(self, x, _=None):
        h = nn.RMSNorm()(x)
        proj = lambda name: nn.DenseGeneral((2, 64), use_bias=False, name=name)(h)
        q, k, v = proj("q_proj"), proj("k_proj"), proj("v_proj")
        probs = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / 8.0, axis=-1)
        attn = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        x = x + nn.DenseGeneral(128, axis=(-2, -1), use_bias=False, name="o_proj")(attn)
        h = nn.RMSNorm()(x)
        gate = nn.Dense(256, use_bias=False, name="gate_proj")(h)
        up = nn.Dense(256, use_bias=False, name="up_proj")(h)
        return x + nn.Dense(128, use_bias=False, name="down_proj")(nn.silu(gate) * up), None


class _Llama(nn.Module):
    scan: bool = False

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(50, 128, name="embed_tokens")(ids)
        if self.scan:
            stack = nn.scan(
                _Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2
            )
            x, _ = stack(name="layers")(x, None)
        else:
            for i in range(2):
                x, _ = _Block(name=f"layers_{i}")(x)
        return nn.Dense(50, use_bias=False, name="lm_head")(nn.RMSNorm()(x))


@pytest.mark.parametrize(
    ("scan", "double_quant", "dora"),
    [(False, False, False), (True, True, False), (False, False, True), (True, False, True)],
)
def test_nf4_llama_lora_and_dora_equal_dequantized(scan, double_quant, dora):
    model = _Llama(scan=scan)
    ids = jax.random.randint(jax.random.key(3), (2, 6), 0, 50)
    params = model.init(jax.random.key(0), ids)["params"]
    spec = lf.Spec([(r".*(proj|lm_head)/kernel", lf.LoRA(rank=4, alpha=8, dora=dora))])
    layouts = lf.infer_layouts(model, params, ids)
    adapters = toy_models.nonzero(lora.init(jax.random.key(1), params, spec, layouts))
    qparams = quant.quantize(params, "nf4", layouts, double_quant=double_quant)
    quantized = quant.quantized_paths(qparams)
    assert len(quantized) == (7 if scan else 14) + 1 and "embed_tokens/embedding" not in quantized
    fn = lf.factored(model, unsupported="error")
    got = _loss_grads(lambda a, x: fn(qparams, a, x), adapters, (ids,))
    dq = quant.dequantize(qparams)
    want = _loss_grads(lambda a, x: model.apply({"params": lora.merge(dq, a)}, x), adapters, (ids,))
    assert_close(got[0], want[0], 1e-5)
    assert_close(got[1], want[1], 1e-4)


def test_kernel_read_outside_a_layer_is_dequantized_whole_with_a_warning_or_refused():
    built = CASES["linen_hand_written_param_dot"].build()
    params = quant.quantize(built.params, "int8")  # no layouts: every 2-D `kernel`
    assert set(quant.quantized_paths(params)) == {"hand/kernel", "head/kernel"}
    with pytest.raises(UnsupportedLayerError, match=r"hand/kernel") as refused:
        lf.factored(built.model, unsupported="error")(params, {}, *built.inputs)
    assert "head/kernel" not in str(refused.value) and "\n" not in str(refused.value)
    with pytest.warns(UserWarning, match=r"dequantized whole.*hand/kernel"):
        out = lf.factored(built.model)(params, {}, *built.inputs)
    want = built.model.apply({"params": quant.dequantize(params)}, *built.inputs)
    assert_close(out, want, 1e-6)


def test_merging_into_a_quantized_kernel_is_refused():
    params = {"d": {"kernel": _weights(64, 8)}}
    adapters = lora.init(jax.random.key(0), params, lf.Spec([("d/kernel", lf.LoRA(2))]))
    with pytest.raises(ValueError, match=r"'d/kernel'.*dequantize"):
        lora.merge(quant.quantize(params, "nf4"), adapters)


class _Deep(nn.Module):
    @nn.compact
    def __call__(self, x):
        for _ in range(8):
            x = jnp.tanh(nn.Dense(1024)(x))
        return x


def test_float_kernels_exist_one_layer_at_a_time():
    """The jitted LoRA gradient on an NF4 base holds about one float kernel at a time.

    8 layers of 1024×1024: 33.5 MB of float32 kernels. Dequantized all at once (as XLA
    schedules a dequantization that depends on parameters only), the step's temporaries would
    hold them all; each dequantization waits for its layer's input or cotangent instead.
    """
    model, x = _Deep(), jnp.ones((16, 1024))
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
    layouts = lf.infer_layouts(model, params, x)
    qparams = quant.quantize(params, "nf4", layouts)
    adapters = lora.init(jax.random.key(1), params, lf.Spec([(".*kernel", lf.LoRA(4))]), layouts)
    loss = lambda a, p: jnp.sum(lf.factored(model)(p, a, x) ** 2)
    compiled = jax.jit(jax.grad(loss)).lower(adapters, qparams).compile()
    kernel_bytes = 1024 * 1024 * 4
    assert compiled.memory_analysis().temp_size_in_bytes < 1.5 * kernel_bytes


class _Classifier(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(128, name="up_proj")(x))
        h = nn.gelu(nn.Dense(128, name="mid_proj")(h))
        return nn.Dense(4, name="classifier")(h)


def test_adapt_quantized_trains_as_lora_on_the_dequantized_base():
    """The same train step: QLoRA's losses are LoRA's on the dequantized base, step by step."""
    import optax

    model, x = _Classifier(), jax.random.normal(jax.random.key(0), (32, 64))
    y = jax.random.randint(jax.random.key(1), (32,), 0, 4)
    variables = model.init(jax.random.key(2), x)
    spec = lf.Spec([(r".*_proj/kernel", lf.LoRA(rank=4, alpha=8)), (r"classifier/.*", lf.Train())])
    qlora = lf.adapt(model, spec, x, variables=variables, quantize="nf4", double_quant=True)
    assert sorted(quant.quantized_paths(qlora.params)) == ["mid_proj/kernel", "up_proj/kernel"]
    assert qlora.summary().total == lf.adapt(model, spec, x, variables=variables).summary().total
    plain = lf.adapt(model, spec, x, params=quant.dequantize(qlora.params))

    def loss_fn(model, batch, rng):
        logits = model(batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean(), {}

    losses = []
    for adapted in (qlora, plain):
        tx = optax.adamw(1e-2)
        state, step = adapted.init_state(tx), adapted.train_step(loss_fn, tx)
        trace = []
        for _ in range(5):
            state, metrics = step(state, {"x": x, "y": y})
            trace.append(float(metrics["loss"]))
        losses.append((trace, adapted.merge(state)))
    assert losses[0][0][-1] < 0.7 * losses[0][0][0]  # it learns
    assert_close(losses[0][0], losses[1][0], 1e-5)
    assert_close(losses[0][1], losses[1][1], 1e-5)  # merged: float, dequantized base + adapters


def test_a_quantized_kernel_cannot_be_trained_fully():
    model, x = _Classifier(), jnp.ones((2, 64))
    variables = model.init(jax.random.key(2), x)
    with pytest.raises(lf.SpecError, match="full fine-tuning"):
        lf.adapt(model, lf.FULL_FINETUNE, x, variables=variables, quantize="int8")
    params = quant.quantize(variables["params"], "int8")
    with pytest.raises(lf.SpecError, match=r"'classifier/kernel' is a quantized kernel"):
        lf.adapt(model, lf.FULL_FINETUNE, x, params=params)


class _TiedEmbed(nn.Module):
    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(128, 64, name="embed")
        return embed.attend(nn.Dense(64, name="d")(embed(ids)))


def test_nf4_embedding_table_made_in_setup():
    """nn.Embed makes its table in `setup`, whose shape check would see the packed codes."""
    model, ids = _TiedEmbed(), jnp.arange(12).reshape(2, 6)
    params = model.init(jax.random.key(0), ids)["params"]
    layouts = lf.infer_layouts(model, params, ids)
    qparams = quant.quantize(params, "nf4", layouts, embeddings=True)
    assert sorted(quant.quantized_paths(qparams)) == ["d/kernel", "embed/embedding"]
    spec = lf.Spec([(".*(kernel|embedding)", lf.LoRA(2))])
    adapters = toy_models.nonzero(lora.init(jax.random.key(1), params, spec, layouts))
    got = _loss_grads(lambda a, x: lf.factored(model)(qparams, a, x), adapters, (ids,))
    dq = quant.dequantize(qparams)
    want = _loss_grads(lambda a, x: model.apply({"params": lora.merge(dq, a)}, x), adapters, (ids,))
    assert_close(got[0], want[0], 1e-5)
    assert_close(got[1], want[1], 1e-4)
