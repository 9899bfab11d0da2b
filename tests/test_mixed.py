"""A mixed batch (one adapter per example) against each adapter run alone on the whole batch."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lorax_ft as lf
from lorax_ft.transform import lora
from lorax_ft.transform.layer_calls import AdapterError
from tests import conformance_models as cm
from tests import toy_models as tm
from tests.tolerance import assert_close, magnitude

# Three adapters of different ranks and alphas (so different scales); -1 is the base model.
RANKS_ALPHAS = ((2, 4.0), (4, 16.0), (3, 1.5))
INDEX = np.array([2, -1, 0, 1, 0])
ALL = r".*(kernel|embedding)"


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(6, name="out")(nn.gelu(nn.Dense(16, name="hidden")(x)))


def _adapters(params, layouts, pattern=ALL, ranks_alphas=RANKS_ALPHAS):
    """One adapters pytree per (rank, alpha), every A and B non-zero and different."""
    out = []
    for k, (rank, alpha) in enumerate(ranks_alphas):
        spec = lf.Spec([(pattern, lf.LoRA(rank=rank, alpha=alpha))])
        adapters = lora.init(jax.random.key(10 + k), params, spec, layouts)
        out.append(tm.nonzero(adapters, seed=20 + k))
    return out


def _row_weights(index, k, ndim):
    return (index == k).astype(jnp.float32).reshape((-1, *(1,) * (ndim - 1)))


def _check(
    fn, params, adapters_list, inputs, index=INDEX, grads=True, tol=1e-6, grad_tol=1e-5, jit=True
):
    """The mixed batch equals, row by row, each adapter (or the base model) alone; so do grads.

    Gradients are compared within `grad_tol` × their largest value: the mixed path's matmuls
    have other widths (Σr columns, or several adapters' down-projections sharing one x·A),
    so float32 rounding differs, and a badly conditioned model amplifies it in the gradients.
    `jit=False` runs op by op (see the float64 test).
    """
    index = jnp.asarray(index)
    maybe_jit = jax.jit if jit else (lambda f: f)
    run = maybe_jit(fn)
    out = run(params, lf.mixed_adapters(adapters_list), *inputs, adapter_index=index)
    singles = [run(params, a, *inputs) for a in adapters_list]
    base = run(params, {}, *inputs)
    expected = jnp.stack([(base if k < 0 else singles[k])[i] for i, k in enumerate(index)])
    assert_close(out, expected, tol=tol)
    # Each adapter moves its rows far from the base model (a zero delta would hide bugs).
    scale = magnitude(base)
    for k, single in enumerate(singles):
        assert float(jnp.abs(single - base).max()) > 1e-2 * scale, k
    if not grads:
        return out

    # In the outputs' dtype, so that the cotangent is exactly w whatever the precision that
    # XLA keeps for a float64 w meeting float32 outputs.
    w = jax.random.normal(jax.random.key(99), out.shape, out.dtype)

    def mixed_loss(adapters_list):
        mixed = lf.mixed_adapters(adapters_list)
        return jnp.sum(w * fn(params, mixed, *inputs, adapter_index=index))

    got = maybe_jit(jax.grad(mixed_loss))(adapters_list)
    expected_grads = []
    for k, adapters in enumerate(adapters_list):
        rows = _row_weights(index, k, out.ndim)  # the rows that use adapter k
        single_loss = lambda a, rows=rows: jnp.sum(w * rows * fn(params, a, *inputs))
        expected_grads.append(maybe_jit(jax.grad(single_loss))(adapters))
    for k in range(len(adapters_list)):
        assert_close(got[k], expected_grads[k], tol=grad_tol)
        used = bool((index == k).any())
        assert (magnitude(expected_grads[k]) > 0) == used, k
    return out


def _linen(model, x, pattern=ALL):
    params = model.init(jax.random.key(0), x)["params"]
    layouts = lf.infer_layouts(model, params, x)
    return params, _adapters(params, layouts, pattern)


def test_linen_mlp():
    x = jax.random.normal(jax.random.key(1), (5, 12))
    params, adapters_list = _linen(Mlp(), x)
    _check(lf.factored(Mlp()), params, adapters_list, (x,))


def test_attention_qkv_share_one_down_projection():
    x = jax.random.normal(jax.random.key(1), (5, 6, tm.HIDDEN))
    model = tm.Attention()
    params, adapters_list = _linen(model, x)
    fn = lf.factored(model)
    _check(fn, params, adapters_list, (x,))
    # The cost of one adapter of rank Σr: as many matmuls as a single adapter, q/k/v sharing
    # one x·A (1 down + 3 up) and o_proj its own (1 + 1), whatever the number of adapters.
    mixed = lf.mixed_adapters(adapters_list)
    index = jnp.asarray(INDEX)
    hlo = jax.jit(fn).lower(params, mixed, x, adapter_index=index).as_text()
    base_hlo = jax.jit(model.apply).lower({"params": params}, x).as_text()
    assert hlo.count("dot_general") - base_hlo.count("dot_general") == 2 + 4


def test_embedding_and_tied_attend():
    ids = jax.random.randint(jax.random.key(2), (5, 7), 0, tm.VOCAB)
    params, adapters_list = _linen(tm.TiedEmbedLM(), ids)
    _check(lf.factored(tm.TiedEmbedLM()), params, adapters_list, (ids,))


def test_conv_and_einsum_layers():
    image = jax.random.normal(jax.random.key(3), (5, 9, 9, 3))
    params, adapters_list = _linen(tm.ConvNet(), image)
    _check(lf.factored(tm.ConvNet()), params, adapters_list, (image,))
    x = jax.random.normal(jax.random.key(4), (5, 4, tm.HIDDEN))
    params, adapters_list = _linen(tm.EinsumBlock(), x)
    _check(lf.factored(tm.EinsumBlock()), params, adapters_list, (x,))


def test_linen_scan_layer_stack():
    ids = jax.random.randint(jax.random.key(2), (5, 6), 0, tm.VOCAB)
    model = tm.TinyLlama(layers=3, scan=True)
    params, adapters_list = _linen(model, ids)
    q = lf.mixed_adapters(adapters_list)["layers"]["attn"]["q_proj"]["kernel"]
    assert q.a.shape == (3, tm.HIDDEN, 2 + 4 + 3) and q.ranks == (2, 4, 3)
    _check(lf.factored(model), params, adapters_list, (ids,))


def test_nnx_model_and_nnx_scan_stack():
    model = tm.NnxModel(nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(2), (5, 7), 0, tm.VOCAB)
    params = lf.nnx_params(model)
    adapters_list = _adapters(params, lf.infer_layouts(model, params, ids))
    # Logits ~2e3 from a q·k product and an attend over unnormalised activations: rounding in
    # the grouped q/k down-projection reaches 2.1e-5 of the largest gradient (in float64 the
    # mixed and single gradients of this model are bitwise equal).
    _check(lf.factored(model), params, adapters_list, (ids,), grad_tol=5e-5)

    stack = cm.NnxScanLayers(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (5, cm.D))
    params = lf.nnx_params(stack)
    adapters_list = _adapters(params, lf.infer_layouts(stack, params, x))
    assert lora.factors_by_path(adapters_list[0])["blocks/up/kernel"].a.shape[0] == cm.LAYERS
    _check(lf.factored(stack), params, adapters_list, (x,))


def _zoo_llama(dtype):
    from lorax_ft.models import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        scan_layers=True, initializer_range=0.1, dtype=dtype, param_dtype=dtype,
    )  # fmt: skip
    module = LlamaForCausalLM(config)
    ids = jax.random.randint(jax.random.key(3), (5, 7), 0, 96)
    params = nn.unbox(module.init(jax.random.key(0), ids))["params"]
    layouts = lf.infer_layouts(module, params, ids)
    adapters_list = _adapters(params, layouts, r".*(_proj/kernel|embedding)")
    adapters_list = jax.tree.map(lambda f: f.astype(dtype), adapters_list)
    return lf.factored(module), params, adapters_list, (ids,)


def test_zoo_llama_three_adapters_float64():
    # In float64 the rounding of float32 (below) is out of the way: the mixed batch and its
    # gradients equal the single adapters' (measured: outputs bitwise, gradients within 6e-16).
    # Op by op: jitted, the zoo's gradients differ from op by op at float32-like levels even
    # for one plain adapter (9e-9 of the largest with the embedding alone adapted), and the
    # mixed and single programs by 5e-7; op by op nothing but float64 rounding is left.
    with jax.enable_x64(True):
        fn, params, adapters_list, inputs = _zoo_llama(jnp.float64)
        out = _check(fn, params, adapters_list, inputs, tol=1e-12, grad_tol=1e-12, jit=False)
        assert out.dtype == jnp.float32  # the zoo's logits; computed in float64 before


def test_zoo_llama_three_adapters_float32():
    # The adapters' deltas are several times the base kernels (B perturbed, scales up to 4):
    # rounding of the grouped q/k/v down-projection (another matmul width) reaches 2.7e-7 of
    # the logits after one layer and 1.4e-6 after two. Within 1e-6 the float64 test above.
    _check(*_zoo_llama(jnp.float32), tol=3e-6, grads=False)


def test_unused_adapter_gets_exactly_zero_gradient_and_index_is_traced():
    x = jax.random.normal(jax.random.key(1), (4, 12))
    params, adapters_list = _linen(Mlp(), x)
    fn = lf.factored(Mlp())
    traces = []

    @jax.jit
    def grad(adapters_list, index):
        traces.append(1)
        loss = lambda a: jnp.sum(fn(params, lf.mixed_adapters(a), x, adapter_index=index) ** 2)
        return jax.grad(loss)(adapters_list)

    g = grad(adapters_list, jnp.array([0, 2, -1, 0]))
    for leaf in jax.tree.leaves(g[1]):
        np.testing.assert_array_equal(leaf, np.zeros_like(leaf))
    assert magnitude(g[0]) > 0 and magnitude(g[2]) > 0
    g = grad(adapters_list, jnp.array([1, 1, 1, 1]))
    assert magnitude(g[1]) > 0 and magnitude(g[0]) == 0 and len(traces) == 1


def test_different_dropout_rates_run_without_rng_only():
    x = jax.random.normal(jax.random.key(1), (3, 12))
    params = Mlp().init(jax.random.key(0), x)["params"]
    adapters_list = [
        tm.nonzero(lora.init(jax.random.key(k), params, lf.Spec([(ALL, lf.LoRA(2, dropout=p))])))
        for k, p in enumerate((0.0, 0.5))
    ]
    _check(lf.factored(Mlp()), params, adapters_list, (x,), index=[1, 0, -1], grads=False)
    mixed = lf.mixed_adapters(adapters_list)
    with pytest.raises(AdapterError, match=r"'hidden/kernel' have different LoRA dropout"):
        lf.factored(Mlp())(
            params, mixed, x, adapter_index=jnp.zeros(3, int), lora_rng=jax.random.key(0)
        )


def test_equal_dropout_rates_drop_as_each_adapter_alone():
    x = jax.random.normal(jax.random.key(1), (3, 12))
    params = Mlp().init(jax.random.key(0), x)["params"]
    spec = lf.Spec([(ALL, lf.LoRA(2, dropout=0.5))])
    adapters_list = [tm.nonzero(lora.init(jax.random.key(k), params, spec)) for k in (0, 1)]
    fn, rng, index = lf.factored(Mlp()), jax.random.key(5), jnp.array([1, 0, -1])
    mixed = fn(params, lf.mixed_adapters(adapters_list), x, adapter_index=index, lora_rng=rng)
    # The dropout mask on a layer's input depends on the key, the path and the input's shape
    # only, so each adapter alone, with the same key, drops the same features.
    singles = [fn(params, a, x, lora_rng=rng) for a in adapters_list]
    expected = jnp.stack([singles[1][0], singles[0][1], fn(params, {}, x)[2]])
    assert_close(mixed, expected, tol=1e-6)
    undropped = fn(params, lf.mixed_adapters(adapters_list), x, adapter_index=index)
    assert float(jnp.abs(mixed - undropped)[:2].max()) > 1e-2 * magnitude(undropped)


def _mlp_setup():
    x = jax.random.normal(jax.random.key(1), (3, 12))
    params = Mlp().init(jax.random.key(0), x)["params"]
    return x, params, _adapters(params, None)[:2]


def test_refusals_when_building_the_set():
    _, params, (one, two) = _mlp_setup()
    with pytest.raises(AdapterError, match="no adapters"):
        lf.mixed_adapters([])
    dora = lora.init(jax.random.key(0), params, lf.Spec([(ALL, lf.LoRA(2, dora=True))]))
    with pytest.raises(AdapterError, match=r"DoRA adapter at 'hidden/kernel'"):
        lf.mixed_adapters([one, dora])
    only_out = {"out": one["out"]}
    with pytest.raises(AdapterError, match=r"adapters 0 adapts 'hidden/kernel' but adapters 1"):
        lf.mixed_adapters([one, only_out])
    # Same kernel, other layout: A (12, 2) vs (6, 2) cannot happen for a 2-D kernel, so
    # reshape one adapter's factors as another split of the kernel would give them.
    f = one["out"]["kernel"]
    other = {**one, "out": {"kernel": lf.Factors(f.a.reshape(8, 4), f.b.reshape(4, 3))}}
    with pytest.raises(AdapterError, match=r"'out/kernel' has A .* not the same kernel layout"):
        lf.mixed_adapters([one, other])
    with pytest.raises(AdapterError, match="already a mixed set"):
        lf.mixed_adapters([lf.mixed_adapters([one, two]), two])


def test_refusals_when_calling():
    x, params, (one, two) = _mlp_setup()
    fn = lf.factored(Mlp())
    mixed = lf.mixed_adapters([one, two])
    index = jnp.array([0, 1, -1])
    with pytest.raises(AdapterError, match=r"mixed set .* pass adapter_index="):
        fn(params, mixed, x)
    with pytest.raises(AdapterError, match="these adapters are plain"):
        fn(params, one, x, adapter_index=index)
    with pytest.raises(AdapterError, match="these adapters are plain"):
        fn(params, {}, x, adapter_index=index)
    with pytest.raises(AdapterError, match=r"plain adapter in a mixed set"):
        fn(params, {**mixed, "out": one["out"]}, x, adapter_index=index)
    with pytest.raises(AdapterError, match=r"holds 0\.\.2, but the mixed set has 2 adapters"):
        fn(params, mixed, x, adapter_index=jnp.array([0, 2, 1]))
    with pytest.raises(AdapterError, match="1-D int array"):
        fn(params, mixed, x, adapter_index=jnp.zeros((3,)))
    # Traced, an index out of range cannot be refused: its row is NaN, not the base model's.
    out = jax.jit(lambda i: fn(params, mixed, x, adapter_index=i))(jnp.array([0, 2, -1]))
    assert bool(jnp.isnan(out[1]).all()) and bool(jnp.isfinite(out[jnp.array([0, 2])]).all())
    # The batch is axis 0 of every adapted layer's input: 4 indices for 3 examples is refused.
    with pytest.raises(AdapterError, match=r"input has shape \(3, 12\).* batch of 4 examples"):
        fn(params, mixed, x, adapter_index=jnp.array([0, 1, -1, 0]))
    with pytest.raises(AdapterError, match="one delta per adapter"):
        lora.merge(params, mixed)
    with pytest.raises(AdapterError, match="plain function"):
        lf.factored(lambda p, x: Mlp().apply({"params": p}, x))(
            params, mixed, x, adapter_index=index
        )


def test_refuses_a_layer_whose_input_is_not_batch_first():
    class Folded(nn.Module):  # folds the batch into the tokens before the layer
        @nn.compact
        def __call__(self, x):
            return nn.Dense(6, name="proj")(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:2], 6)

    x = jax.random.normal(jax.random.key(1), (3, 4, 12))
    params, adapters_list = _linen(Folded(), x)
    mixed = lf.mixed_adapters(adapters_list)
    with pytest.raises(AdapterError, match=r"'proj/kernel'.*shape \(12, 12\).*batch of 3"):
        lf.factored(Folded())(params, mixed, x, adapter_index=jnp.array([0, 1, 2]))


def test_refuses_a_kernel_that_would_be_merged():
    class Custom(nn.Module):
        @nn.compact
        def __call__(self, x):
            dense = nn.Dense(6, name="head")
            return dense(x) + x @ dense.variables["params"]["kernel"]

    x = jax.random.normal(jax.random.key(1), (3, 12))
    params, adapters_list = _linen(Custom(), x)
    mixed = lf.mixed_adapters(adapters_list)
    with pytest.raises(AdapterError, match=r"'head/kernel'.*would have to be merged"):
        lf.factored(Custom())(params, mixed, x, adapter_index=jnp.array([0, 1, 2]))
