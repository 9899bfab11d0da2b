"""Exact or refused: inputs that used to give a wrong answer or a deep traceback now stop with
one line naming the parameter path (the model-by-model equalities are in test_conformance)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import lorax_ft as lf
from lorax_ft.transform import lora
from lorax_ft.transform.factored import UnsupportedLayerError
from lorax_ft.transform.layer_calls import AdapterError
from tests.tolerance import assert_close


class Heads(nn.Module):
    """A (d, heads, head_dim) projection and a scanned stack: kernels with more than 2 axes."""

    @nn.compact
    def __call__(self, x):
        h = nn.DenseGeneral((4, 8), name="qkv")(x)
        return nn.Dense(16, name="out")(h.reshape(*x.shape[:-1], 32))


X = jnp.ones((2, 5, 16))


def _setup():
    model = Heads()
    params = model.init(jax.random.key(0), X)["params"]
    return model, params, lf.Spec([(".*kernel", lf.LoRA(rank=2))])


def _one_line(message: str) -> bool:
    return "\n" not in message.strip()


def test_multi_axis_kernel_without_layouts_is_refused_not_guessed():
    model, params, spec = _setup()
    with pytest.raises(lf.SpecError, match="'qkv/kernel' has shape \\(16, 4, 8\\)") as e:
        lora.init(jax.random.key(1), params, spec)
    assert _one_line(str(e.value)) and "infer_layouts" in str(e.value)
    # With the model's layouts the factors are PEFT's: 16 in, 4·8 out.
    adapters = lora.init(jax.random.key(1), params, spec, lf.infer_layouts(model, params, X))
    assert adapters["qkv"]["kernel"].a.shape == (16, 2)
    assert adapters["qkv"]["kernel"].b.shape == (2, 32)


def test_layouts_from_another_model_are_refused():
    model, params, spec = _setup()
    other = Heads().init(jax.random.key(0), jnp.ones((2, 5, 8)))["params"]  # 8 input features
    other_layouts = lf.infer_layouts(model, other, jnp.ones((2, 5, 8)))
    with pytest.raises(lf.SpecError, match="layout for 'qkv/kernel' was inferred for"):
        lora.init(jax.random.key(1), params, spec, other_layouts)
    with pytest.raises(lf.SpecError, match="not params of this model"):
        lora.init(jax.random.key(1), params, spec, {"decoder/kernel": lf.KernelLayout()})


def test_adapters_that_do_not_fit_the_params_are_refused_with_the_path():
    model, params, spec = _setup()
    layouts = lf.infer_layouts(model, params, X)
    adapters = lora.init(jax.random.key(1), params, spec, layouts)
    small = Heads().init(jax.random.key(0), jnp.ones((2, 5, 8)))["params"]
    with pytest.raises(AdapterError, match=r"adapter 'qkv/kernel'.*do not fit its kernel") as e:
        lf.factored(model)(small, adapters, jnp.ones((2, 5, 8)))
    assert _one_line(str(e.value))
    # Factors that fit the kernel's size but split it otherwise than its layer computes it:
    # (16·4) × 8 instead of 16 × (4·8).
    wrong_split = lora.init(
        jax.random.key(1), params, lf.Spec([("qkv/kernel", lf.LoRA(rank=2, in_axes=2))])
    )
    with pytest.raises(AdapterError, match=r"adapter 'qkv/kernel'.*16 in × 32 out") as e:
        lf.factored(model)(params, wrong_split, X)
    assert _one_line(str(e.value))
    with pytest.raises(AdapterError, match="adapter 'nope/kernel' has no kernel in params"):
        bogus = {"nope": {"kernel": adapters["out"]["kernel"]}}
        lf.factored(model)(params, bogus, X)


def test_infer_layouts_on_a_plain_function_says_what_to_do():
    model, params, _ = _setup()
    with pytest.raises(TypeError, match="in_axes") as e:
        lf.infer_layouts(lambda p, x: model.apply({"params": p}, x), params, X)
    assert _one_line(str(e.value))


def test_a_kernel_read_outside_its_layer_is_merged_with_a_warning_or_refused():
    class HandTied(nn.Module):
        @nn.compact
        def __call__(self, x):
            enc = nn.Dense(8, name="enc")
            h = enc(x)
            return h @ enc.variables["params"]["kernel"].T  # decoder tied by hand

    model, x = HandTied(), jnp.ones((3, 16))
    params = model.init(jax.random.key(0), x)["params"]
    spec = lf.Spec([(".*kernel", lf.LoRA(rank=2))])
    adapters = lora.init(jax.random.key(1), params, spec)
    adapters = jax.tree.map(lambda a: a + 0.1, adapters)
    with pytest.warns(UserWarning, match="merged .* for enc/kernel"):
        out = lf.factored(model)(params, adapters, x)
    assert_close(out, model.apply({"params": lora.merge(params, adapters)}, x), tol=1e-5)
    with pytest.raises(UnsupportedLayerError, match="enc/kernel"):
        lf.factored(model, unsupported="error")(params, adapters, x)


def test_forward_mode_autodiff_is_refused_with_a_clear_message():
    model, params, spec = _setup()
    adapters = lora.init(jax.random.key(1), params, spec, lf.infer_layouts(model, params, X))
    fn = lf.factored(model)
    with pytest.raises(TypeError, match=r"jax\.jvp/jacfwd through a factored LoRA model"):
        jax.jvp(lambda x: fn(params, adapters, x), (X,), (X,))
    # Reverse mode works.
    jax.grad(lambda x: fn(params, adapters, x).sum())(X)
