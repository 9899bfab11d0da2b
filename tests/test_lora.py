"""LoRA factors: PEFT's initialisation, and merge/unmerge against explicit arithmetic."""

import jax
import jax.numpy as jnp
import numpy as np

import lorax_ft as lf
from lorax_ft.transform import lora
from tests.tolerance import assert_close, magnitude


def test_peft_initialisation():
    params = {
        "dense": {"kernel": jnp.zeros((256, 64))},
        "embed": {"embedding": jnp.zeros((100, 32))},
    }
    spec = lf.Spec([(".*", lf.LoRA(rank=8, alpha=16))])
    f = lora.factors_by_path(lora.init(jax.random.key(0), params, spec))
    dense, embed = f["dense/kernel"], f["embed/embedding"]
    # kaiming_uniform(a=√5) on torch's (r, in) weight is U(±1/√in); B starts at zero.
    bound = 1 / np.sqrt(256)
    assert dense.a.shape == (256, 8) and float(jnp.abs(dense.a).max()) <= bound
    assert float(jnp.abs(dense.a).max()) > 0.9 * bound
    np.testing.assert_allclose(float(jnp.std(dense.a)), bound / np.sqrt(3), rtol=0.05)
    assert not jnp.any(dense.b) and dense.scale == 2.0
    # Embeddings the other way round: A zero, B standard normal.
    assert not jnp.any(embed.a)
    np.testing.assert_allclose(float(jnp.std(embed.b)), 1.0, rtol=0.1)

    gauss = lf.Spec([(".*kernel", lf.LoRA(rank=8, init="gaussian"))])
    g = lora.factors_by_path(lora.init(jax.random.key(0), params, gauss))["dense/kernel"]
    np.testing.assert_allclose(float(jnp.std(g.a)), 1 / 8, rtol=0.05)


def test_merge_matches_explicit_arithmetic_and_unmerge_restores():
    rng = np.random.default_rng(0)
    params = {
        "proj": {"kernel": jnp.asarray(rng.normal(size=(12, 3, 4)), jnp.float32)},
        "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 5, 7)), jnp.float32)},
    }
    layouts = {
        "proj/kernel": lf.KernelLayout(stack=0, inputs=1),
        "conv/kernel": lf.KernelLayout(stack=0, inputs=3),
    }
    spec = lf.Spec([(".*kernel", lf.LoRA(rank=2, alpha=3))])
    adapters = lora.init(jax.random.key(0), params, spec, layouts)
    adapters = jax.tree.map(lambda x: x + jnp.asarray(rng.normal(size=x.shape), x.dtype), adapters)
    merged = jax.jit(lora.merge)(params, adapters)

    f = lora.factors_by_path(adapters)
    a, b = np.asarray(f["proj/kernel"].a), np.asarray(f["proj/kernel"].b)
    expected = np.asarray(params["proj"]["kernel"]) + 1.5 * (a @ b).reshape(12, 3, 4)
    assert_close(merged["proj"]["kernel"], expected, tol=1e-5)
    # Conv: A over (kh·kw·in), B per output channel.
    a, b = np.asarray(f["conv/kernel"].a), np.asarray(f["conv/kernel"].b)
    assert a.shape == (45, 2) and b.shape == (2, 7)
    expected = np.asarray(params["conv"]["kernel"]) + 1.5 * (a @ b).reshape(3, 3, 5, 7)
    assert_close(merged["conv"]["kernel"], expected, tol=1e-5)

    # W + ΔW - ΔW: the rounding error is that of the merged kernels' magnitude.
    unmerged = jax.jit(lora.unmerge)(merged, adapters)
    for name in params:
        assert_close(unmerged[name], params[name], tol=1e-6, scale=magnitude(merged[name]))


def test_merge_keeps_dtype_and_computes_in_float32():
    w = jnp.full((64, 64), 1.0, jnp.bfloat16)
    f = lora.Factors(a=jnp.full((64, 1), 1e-2), b=jnp.full((1, 64), 1e-2), scale=1.0)
    merged = lora.merge({"d": {"kernel": w}}, {"d": {"kernel": f}})["d"]["kernel"]
    assert merged.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(merged, np.float32), 1.0001, rtol=1e-2)


def test_merge_of_stacked_factors():
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.normal(size=(3, 8, 6)), jnp.float32)
    a = jnp.asarray(rng.normal(size=(3, 8, 2)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(3, 2, 6)), jnp.float32)
    merged = lora.merge({"k": w}, {"k": lora.Factors(a=a, b=b, scale=0.5)})["k"]
    for layer in range(3):
        assert_close(merged[layer], w[layer] + 0.5 * a[layer] @ b[layer], tol=1e-5)
