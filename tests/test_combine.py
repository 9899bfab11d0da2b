"""Combining adapters, against PEFT's add_weighted_adapter and explicit arithmetic.

Layouts: lorax_ft's A (in, r) = lora_A.weightᵀ, B (r, out) = lora_B.weightᵀ, and a delta
(in, out) is PEFT's get_delta_weight transposed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

import lorax_ft as lf
from lorax_ft.transform.combine import combine_adapters
from lorax_ft.transform.lora import Factors
from tests.tolerance import assert_close

SHAPES = {"q": (10, 8), "v": (8, 6)}  # kernel (in, out) per adapted layer
WEIGHTS = [0.7, -0.4]


class _Two(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(*SHAPES["q"])
        self.v = torch.nn.Linear(*SHAPES["v"])

    def forward(self, x):
        return self.v(self.q(x))


def _random_adapter(rng, rank, alpha, stack=(), rslora=False):
    scale = alpha / (np.sqrt(rank) if rslora else rank)
    tree = {}
    for name, (fan_in, fan_out) in SHAPES.items():
        a = rng.normal(size=(*stack, fan_in, rank)).astype(np.float32)
        b = rng.normal(size=(*stack, rank, fan_out)).astype(np.float32)
        tree[name] = {"kernel": Factors(jnp.asarray(a), jnp.asarray(b), scale=float(scale))}
    return tree


def _peft_combine(adapters, configs, weights, method, rank=None):
    """PEFT's add_weighted_adapter on the same factors: {name: (A, B, delta)} and the scaling."""
    model = _Two()
    names = [f"ad{i}" for i in range(len(adapters))]
    peft_model = get_peft_model(model, configs[0], adapter_name=names[0])
    for name, config in zip(names[1:], configs[1:], strict=True):
        peft_model.add_adapter(name, config)
    with torch.no_grad():
        for name, tree in zip(names, adapters, strict=True):
            for layer_name in SHAPES:
                layer = getattr(peft_model.base_model.model, layer_name)
                f = tree[layer_name]["kernel"]
                assert layer.scaling[name] == pytest.approx(f.scale)
                layer.lora_A[name].weight.copy_(torch.from_numpy(np.asarray(f.a).T.copy()))
                layer.lora_B[name].weight.copy_(torch.from_numpy(np.asarray(f.b).T.copy()))
    peft_model.add_weighted_adapter(names, weights, "mixed", combination_type=method, svd_rank=rank)
    out, scalings = {}, set()
    for layer_name in SHAPES:
        layer = getattr(peft_model.base_model.model, layer_name)
        a = layer.lora_A["mixed"].weight.detach().numpy().T
        b = layer.lora_B["mixed"].weight.detach().numpy().T
        delta = layer.get_delta_weight("mixed").detach().numpy().T
        out[layer_name] = (a, b, delta)
        scalings.add(layer.scaling["mixed"])
    (scaling,) = scalings
    return out, scaling


def _config(rank, alpha, rslora=False):
    return LoraConfig(r=rank, lora_alpha=alpha, use_rslora=rslora, target_modules=["q", "v"])


def _exact(adapters, weights, name):
    """Σ wᵢ·sᵢ·Aᵢ@Bᵢ in float64, from the factors."""
    total = 0.0
    for tree, weight in zip(adapters, weights, strict=True):
        f = tree[name]["kernel"]
        total = total + weight * f.scale * np.asarray(f.a, np.float64) @ np.asarray(f.b, np.float64)
    return total


def _delta(f):
    return f.scale * np.asarray(f.a, np.float64) @ np.asarray(f.b, np.float64)


def _align_signs(a, b, a_ref):
    signs = np.sign(np.sum(a * a_ref, axis=-2, keepdims=True))
    return a * signs, b * np.swapaxes(signs, -1, -2)


@pytest.mark.parametrize(
    ("method", "ranks", "svd_rank"),
    [("linear", (3, 3), None), ("cat", (2, 3), None), ("svd", (2, 3), None), ("svd", (2, 4), 2)],
)
def test_matches_peft(method, ranks, svd_rank):
    rng = np.random.default_rng(0)
    alphas = (4, 9)
    adapters = [_random_adapter(rng, r, alpha) for r, alpha in zip(ranks, alphas, strict=True)]
    configs = [_config(r, alpha) for r, alpha in zip(ranks, alphas, strict=True)]
    want, scaling = _peft_combine(adapters, configs, WEIGHTS, method, svd_rank)
    got, report = combine_adapters(adapters, WEIGHTS, method, rank=svd_rank)
    # PEFT: lora_alpha = r for the new adapter, scales folded into the factors.
    assert scaling == 1.0
    expected_rank = {"linear": 3, "cat": 5, "svd": svd_rank or max(ranks)}[method]
    for name in SHAPES:
        f = got[name]["kernel"]
        pa, pb, pdelta = want[name]
        assert f.scale == 1.0 and f.rank == expected_rank == pa.shape[1]
        assert f.a.dtype == jnp.float32 and report[f"{name}/kernel"].shape == ()
        assert_close(_delta(f), pdelta, tol=1e-5)
        a, b = np.asarray(f.a), np.asarray(f.b)
        if method == "svd":  # singular vectors are unique up to sign
            a, b = _align_signs(a, b, pa)
        assert_close(a, pa, tol=1e-5)
        assert_close(b, pb, tol=1e-5)


def test_cat_is_the_exact_weighted_sum():
    rng = np.random.default_rng(1)
    adapters = [_random_adapter(rng, 2, 4), _random_adapter(rng, 3, 3), _random_adapter(rng, 1, 2)]
    weights = [0.5, -1.5, 2.0]
    got, report = combine_adapters(adapters, weights, "cat")
    for name in SHAPES:
        assert got[name]["kernel"].rank == 6
        exact = _exact(adapters, weights, name)
        assert_close(_delta(got[name]["kernel"]), exact, tol=1e-5)
        assert float(report[f"{name}/kernel"]) == 0.0


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_svd_error_from_the_singular_values_left_out(rank):
    rng = np.random.default_rng(2)
    adapters = [_random_adapter(rng, 2, 4), _random_adapter(rng, 3, 6)]
    got, report = combine_adapters(adapters, WEIGHTS, "svd", rank=rank)
    for name in SHAPES:
        exact = _exact(adapters, WEIGHTS, name)
        s = np.linalg.svd(exact, compute_uv=False)
        from_singular_values = np.sqrt(np.sum(s[rank:] ** 2) / np.sum(s**2))
        direct = np.linalg.norm(_delta(got[name]["kernel"]) - exact) / np.linalg.norm(exact)
        assert from_singular_values > 0.01  # a real truncation: ΔW has rank 5
        np.testing.assert_allclose(float(report[f"{name}/kernel"]), from_singular_values, rtol=1e-4)
        np.testing.assert_allclose(direct, from_singular_values, rtol=1e-4)
    # At the full rank of ΔW (2 + 3) nothing is left out.
    _, full = combine_adapters(adapters, WEIGHTS, "svd", rank=5)
    for name in SHAPES:
        assert float(full[f"{name}/kernel"]) < 1e-3


def test_linear_error_is_the_cross_terms():
    rng = np.random.default_rng(3)
    adapters = [_random_adapter(rng, 3, 4), _random_adapter(rng, 3, 6)]
    got, report = combine_adapters(adapters, WEIGHTS, "linear")
    for name in SHAPES:
        exact = _exact(adapters, WEIGHTS, name)
        error = np.linalg.norm(_delta(got[name]["kernel"]) - exact) / np.linalg.norm(exact)
        assert error > 0.1  # generic adapters: the cross terms are not small
        np.testing.assert_allclose(float(report[f"{name}/kernel"]), error, rtol=1e-4)

    # Exact for one adapter (weights and scale folded into the factors) ...
    single, single_report = combine_adapters(adapters[:1], [-0.7], "linear")
    for name in SHAPES:
        assert_close(_delta(single[name]["kernel"]), _exact(adapters[:1], [-0.7], name), tol=1e-5)
        assert float(single_report[f"{name}/kernel"]) < 1e-6
    # ... and for adapters in disjoint rank slots (A₁B₂ = A₂B₁ = 0).
    slots = []
    for keep in (slice(0, 1), slice(1, 3)):
        tree = {}
        for name, node in adapters[0].items():
            f = node["kernel"]
            mask = np.zeros(3, np.float32)
            mask[keep] = 1
            tree[name] = {"kernel": Factors(f.a * mask, f.b * mask[:, None], scale=f.scale)}
        slots.append(tree)
    disjoint, disjoint_report = combine_adapters(slots, WEIGHTS, "linear")
    for name in SHAPES:
        assert_close(_delta(disjoint[name]["kernel"]), _exact(slots, WEIGHTS, name), tol=1e-5)
        assert float(disjoint_report[f"{name}/kernel"]) < 1e-6


@pytest.mark.parametrize(
    ("method", "ranks"), [("linear", (2, 2)), ("cat", (2, 3)), ("svd", (2, 3))]
)
def test_stacked_equals_per_layer(method, ranks):
    rng = np.random.default_rng(4)
    stacked = [_random_adapter(rng, r, 2 * r, stack=(3,)) for r in ranks]
    got, report = combine_adapters(stacked, WEIGHTS, method)
    for layer in range(3):
        # Slicing keeps each Factors' static scale.
        per_layer = [jax.tree.map(lambda x, i=layer: x[i], tree) for tree in stacked]
        want, want_report = combine_adapters(per_layer, WEIGHTS, method)
        for name in SHAPES:
            assert report[f"{name}/kernel"].shape == (3,)
            assert_close(
                _delta(jax.tree.map(lambda x, i=layer: x[i], got[name]["kernel"])),
                _delta(want[name]["kernel"]),
                tol=1e-5,
            )
            np.testing.assert_allclose(
                float(report[f"{name}/kernel"][layer]),
                float(want_report[f"{name}/kernel"]),
                rtol=1e-4,
                atol=1e-6,
            )


def test_under_jit():
    rng = np.random.default_rng(5)
    adapters = [_random_adapter(rng, 2, 4), _random_adapter(rng, 3, 6)]
    jitted = jax.jit(lambda ads: combine_adapters(ads, WEIGHTS, "svd", rank=2))
    got, report = jitted(adapters)
    want, want_report = combine_adapters(adapters, WEIGHTS, "svd", rank=2)
    for name in SHAPES:
        assert_close(_delta(got[name]["kernel"]), _delta(want[name]["kernel"]), tol=1e-5)
        assert_close(report[f"{name}/kernel"], want_report[f"{name}/kernel"], tol=1e-5)


def test_rslora_peft_scales_the_combined_delta_by_sqrt_rank():
    """PEFT keeps use_rslora on the combined adapter: alpha = r gives scaling √r, so its delta is
    √r × the weighted sum. Ours (scale 1) is the weighted sum; exported to PEFT with rsLoRA it
    needs lora_alpha = √r."""
    rng = np.random.default_rng(6)
    adapters = [_random_adapter(rng, 2, 4, rslora=True), _random_adapter(rng, 3, 6, rslora=True)]
    configs = [_config(2, 4, rslora=True), _config(3, 6, rslora=True)]
    want, scaling = _peft_combine(adapters, configs, WEIGHTS, "cat")
    assert scaling == pytest.approx(np.sqrt(5))
    got, _ = combine_adapters(adapters, WEIGHTS, "cat")
    for name in SHAPES:
        exact = _exact(adapters, WEIGHTS, name)
        assert_close(_delta(got[name]["kernel"]), exact, tol=1e-5)
        assert_close(want[name][2], np.sqrt(5) * exact, tol=1e-5)


def test_refusals():
    rng = np.random.default_rng(7)
    one, two = _random_adapter(rng, 2, 4), _random_adapter(rng, 3, 6)
    partial = {"q": two["q"]}
    with pytest.raises(ValueError, match="adapters 0 adapts 'v/kernel' but adapters 1 does not"):
        combine_adapters([one, partial], WEIGHTS, "cat")
    with pytest.raises(ValueError, match="adapters 1 adapts 'v/kernel' but adapters 0 does not"):
        combine_adapters([partial, one], WEIGHTS, "cat")
    with pytest.raises(
        ValueError, match=r"'linear' needs equal ranks, 'q/kernel' has ranks \[2, 3\]"
    ):
        combine_adapters([one, two], WEIGHTS, "linear")
    with pytest.raises(ValueError, match="2 weights for 3 adapters"):
        combine_adapters([one, two, one], WEIGHTS, "cat")
    with pytest.raises(ValueError, match="not one of"):
        combine_adapters([one, two], WEIGHTS, "ties")
    with pytest.raises(ValueError, match=r"rank 9 for 'q/kernel' must be an int in \[1, 8\]"):
        combine_adapters([one, two], WEIGHTS, "svd", rank=9)
    with pytest.raises(ValueError, match="is for method 'svd'"):
        combine_adapters([one, two], WEIGHTS, "cat", rank=2)
    with pytest.raises(ValueError, match="PEFT ignores svd_rank"):
        combine_adapters([two], [1.0], "svd", rank=2)
    other = {**two, "v": {"kernel": Factors(jnp.zeros((8, 3)), jnp.zeros((3, 5)))}}
    with pytest.raises(ValueError, match=r"'v/kernel' has A .* not the same kernel layout"):
        combine_adapters([two, other], WEIGHTS, "cat")
    f = one["q"]["kernel"]
    dora = {**one, "q": {"kernel": f.replace(magnitude=jnp.ones(8))}}
    with pytest.raises(ValueError, match="DoRA"):
        combine_adapters([dora, two], WEIGHTS, "cat")
    mixed = lf.mixed_adapters([one, two])  # several adapters already: combine their list
    with pytest.raises(ValueError, match="adapters 0 is already a mixed set"):
        combine_adapters([mixed, two], WEIGHTS, "cat")
