"""The factored forward pass against the merged one and against explicitly merged kernels."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lorax_ft as lf
from lorax_ft.transform import lora
from tests import toy_models as tm
from tests.tolerance import assert_close

ALL_KERNELS = lf.Spec([(r".*(kernel|embedding)", lf.LoRA(rank=4, alpha=8))])


def _merged_by_hand(params, adapters):
    """W + s·A@B for every adapted kernel, in numpy, independently of `lora.merge`."""
    flat = lf.paths.flatten(params)
    for path, f in lora.factors_by_path(adapters).items():
        w = np.asarray(flat[path], np.float64)
        delta = np.matmul(np.asarray(f.a, np.float64), np.asarray(f.b, np.float64))
        flat[path] = jnp.asarray(w + f.scale * delta.reshape(w.shape), jnp.float32)
    return flat


def _check_linen(model, x, spec=ALL_KERNELS, expected_paths=None):
    params = model.init(jax.random.key(0), x)["params"]
    layouts = lf.infer_layouts(model, params, x)
    adapters = tm.nonzero(lora.init(jax.random.key(1), params, spec, layouts))
    if expected_paths is not None:
        assert set(lora.factors_by_path(adapters)) == set(expected_paths)

    factored = jax.jit(lf.factored(model))(params, adapters, x)
    merged_fn = lf.factored(lambda p, x: model.apply({"params": p}, x))
    with pytest.warns(UserWarning, match="merged"):
        merged = jax.jit(merged_fn)(params, adapters, x)
    flat = _merged_by_hand(params, adapters)
    by_hand = model.apply({"params": lf.paths.unflatten(flat)}, x)

    assert_close(factored, by_hand, tol=1e-5)
    assert_close(merged, by_hand, tol=1e-5)
    # The adapters matter: the adapted output is far from the base output.
    base = model.apply({"params": params}, x)
    assert float(jnp.abs(by_hand - base).max()) > 1e-2
    return params, adapters


def test_linen_llama_block_factored_equals_merged():
    ids = jax.random.randint(jax.random.key(3), (2, 6), 0, tm.VOCAB)
    spec = lf.Spec([(r".*(q|k|v|o|gate|up|down)_proj/kernel", lf.LoRA(rank=4, alpha=8))])
    _check_linen(tm.TinyLlama(), ids, spec)


def test_scanned_stack_gets_stacked_factors():
    ids = jax.random.randint(jax.random.key(3), (2, 6), 0, tm.VOCAB)
    spec = lf.Spec([(r"layers/.*_proj/kernel", lf.LoRA(rank=4, alpha=8))])
    _, adapters = _check_linen(tm.TinyLlama(layers=3, scan=True), ids, spec)
    factors = lora.factors_by_path(adapters)
    # q_proj kernel (3, d, heads, head_dim): stacked over layers, inputs = d only.
    q = factors["layers/attn/q_proj/kernel"]
    assert q.a.shape == (3, tm.HIDDEN, 4) and q.b.shape == (3, 4, tm.HEADS * tm.HEAD_DIM)
    o = factors["layers/attn/o_proj/kernel"]
    assert o.a.shape == (3, tm.HEADS * tm.HEAD_DIM, 4) and o.b.shape == (3, 4, tm.HIDDEN)


def test_einsum_conv_and_embedding_models():
    x = jax.random.normal(jax.random.key(4), (2, 5, tm.HIDDEN))
    _check_linen(tm.EinsumBlock(), x)
    image = jax.random.normal(jax.random.key(5), (2, 9, 9, 3))
    _, adapters = _check_linen(tm.ConvNet(), image)
    conv2 = lora.factors_by_path(adapters)["conv2/kernel"]
    assert conv2.a.shape == (3 * 3 * 8, 4) and conv2.b.shape == (4, 16)
    ids = jax.random.randint(jax.random.key(6), (2, 7), 0, tm.VOCAB)
    _check_linen(tm.TiedEmbedLM(), ids)


def test_nnx_model_factored_equals_merged():
    model = tm.NnxModel(nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(6), (2, 7), 0, tm.VOCAB)
    params = lf.nnx_params(model)
    layouts = lf.infer_layouts(model, params, ids)
    assert layouts["q/kernel"] == lora.KernelLayout(stack=0, inputs=1, kernel_shape=(32, 4, 8))
    adapters = tm.nonzero(lora.init(jax.random.key(1), params, ALL_KERNELS, layouts))
    assert lora.factors_by_path(adapters)["q/kernel"].b.shape == (4, tm.HEADS * tm.HEAD_DIM)

    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    run = lambda p, ids: nnx.merge(graphdef, p, rest)(ids)
    factored = jax.jit(lf.factored(model))(params, adapters, ids)
    with pytest.warns(UserWarning, match="merged"):
        merged = lf.factored(run)(params, adapters, ids)
    flat = _merged_by_hand(params, adapters)
    by_hand = run(lf.paths.unflatten(flat), ids)
    assert_close(factored, by_hand, tol=1e-5)
    assert_close(merged, by_hand, tol=1e-5)


def test_zero_b_is_exactly_the_base_model():
    ids = jax.random.randint(jax.random.key(3), (2, 6), 0, tm.VOCAB)
    model = tm.TinyLlama(scan=True)
    params = model.init(jax.random.key(0), ids)["params"]
    spec = lf.Spec([(r".*_proj/kernel", lf.LoRA(rank=4))])
    adapters = lora.init(jax.random.key(1), params, spec, lf.infer_layouts(model, params, ids))
    out = jax.jit(lf.factored(model))(params, adapters, ids)
    np.testing.assert_array_equal(out, jax.jit(model.apply)({"params": params}, ids))


def test_unsupported_layer_falls_back_to_merged_with_warning():
    class Custom(nn.Module):
        @nn.compact
        def __call__(self, x):
            w = self.param("w", nn.initializers.normal(), (x.shape[-1], 6))
            return nn.Dense(3, name="head")(x @ w)

    x = jax.random.normal(jax.random.key(0), (2, 5))
    model = Custom()
    params = model.init(jax.random.key(0), x)["params"]
    spec = lf.Spec([(r"w|head/kernel", lf.LoRA(rank=2))])
    adapters = tm.nonzero(lora.init(jax.random.key(1), params, spec))
    with pytest.warns(UserWarning, match=r"merged .* for w: .*read outside a supported layer"):
        out = lf.factored(model)(params, adapters, x)
    by_hand = model.apply({"params": lf.paths.unflatten(_merged_by_hand(params, adapters))}, x)
    assert_close(out, by_hand, tol=1e-5)


def test_siblings_reading_one_input_share_the_down_projection():
    ids = jax.random.randint(jax.random.key(3), (2, 6), 0, tm.VOCAB)
    model = tm.TinyLlama(layers=1)
    params = model.init(jax.random.key(0), ids)["params"]
    spec = lf.Spec([(r".*(q|k|v|gate|up)_proj/kernel", lf.LoRA(rank=4))])
    layouts = lf.infer_layouts(model, params, ids)
    adapters = lora.init(jax.random.key(1), params, spec, layouts)
    hlo = jax.jit(lf.factored(model)).lower(params, adapters, ids).as_text()
    base_hlo = jax.jit(model.apply).lower({"params": params}, ids).as_text()
    # Five adapters in two groups (q,k,v and gate,up): 2 shared down + 5 up matmuls.
    assert hlo.count("dot_general") - base_hlo.count("dot_general") == 2 + 5


def test_lora_dropout_changes_training_outputs_only_with_rng():
    x = jax.random.normal(jax.random.key(0), (4, 16))
    model = nn.Dense(8)
    params = model.init(jax.random.key(0), x)["params"]
    spec = lf.Spec([("kernel", lf.LoRA(rank=4, dropout=0.5))])
    adapters = tm.nonzero(lora.init(jax.random.key(1), params, spec))
    fn = lf.factored(model)
    deterministic = fn(params, adapters, x)
    dropped = fn(params, adapters, x, lora_rng=jax.random.key(2))
    assert float(jnp.abs(dropped - deterministic).max()) > 1e-3
    np.testing.assert_array_equal(deterministic, fn(params, adapters, x))


@pytest.mark.parametrize("remat", ["none", "full"])
def test_model_zoo_llama_scanned_with_remat_and_tied_embedding(remat):
    from lorax_ft.models import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        scan_layers=True, remat=remat,
    )  # fmt: skip
    ids = jax.random.randint(jax.random.key(3), (2, 7), 0, 64)
    module = LlamaForCausalLM(config)
    # LoRA on the tied table too: lookup and LM head must both see the adapted table.
    spec = lf.Spec(
        [(r".*_proj/kernel", lf.LoRA(rank=4, alpha=8)), (r".*embedding", lf.LoRA(rank=4))]
    )
    params = nn.unbox(module.init(jax.random.key(0), ids))["params"]
    layouts = lf.infer_layouts(module, params, ids)
    adapters = tm.nonzero(lora.init(jax.random.key(1), params, spec, layouts))
    assert lora.factors_by_path(adapters)["model/layers/self_attn/k_proj/kernel"].a.shape == (
        2, 32, 4,
    )  # fmt: skip
    factored = jax.jit(lf.factored(module))(params, adapters, ids)
    by_hand = module.apply({"params": lf.paths.unflatten(_merged_by_hand(params, adapters))}, ids)
    assert_close(factored, by_hand, tol=1e-5)


def test_only_siblings_share_a_down_projection():
    class Branch(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(8, name="proj")(x)

    class Model(nn.Module):  # left/proj and right/proj read the same x but are not siblings
        @nn.compact
        def __call__(self, x):
            return Branch(name="left")(x) + Branch(name="right")(x)

    x = jax.random.normal(jax.random.key(0), (3, 8))
    model = Model()
    params = model.init(jax.random.key(0), x)["params"]
    adapters = tm.nonzero(lora.init(jax.random.key(1), params, lf.Spec([(".*kernel", lf.LoRA(2))])))
    out = jax.jit(lf.factored(model))(params, adapters, x)
    by_hand = model.apply({"params": lf.paths.unflatten(_merged_by_hand(params, adapters))}, x)
    assert_close(out, by_hand, tol=1e-5)
