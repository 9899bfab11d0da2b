"""PiSSA/OLoRA inits through `lora.initialize`: the base becomes the residual, the adapted model
starts at the base model, merge gives back W + ΔW, and the rank-2r conversion applied by PEFT to
the ORIGINAL base gives lorax_ft's logits."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_ft as lf
from lorax_ft.transform import inits, lora, paths
from lorax_ft.transform.factored import factored, infer_layouts
from lorax_ft.transform.spec import LoRA, Spec, SpecError
from tests.tolerance import assert_close

INITS = ["pissa", "pissa_niter_3", "olora"]


class ScannedMlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        class Block(nn.Module):
            @nn.compact
            def __call__(self, h, _):
                return h + nn.tanh(nn.Dense(16, name="proj")(h)), None

        stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        h, _ = stack(name="layers")(nn.Dense(16, name="embed")(x), None)
        return nn.Dense(4, name="head")(h)


def _trained(adapters, seed=0):
    """The adapters moved as a few steps of training would (a visible change)."""
    rng = np.random.default_rng(seed)
    move = lambda x: x + 0.2 * jnp.asarray(rng.standard_normal(x.shape), x.dtype)
    return jax.tree.map(move, adapters)


@pytest.mark.parametrize("init", INITS)
def test_initialize_starts_at_the_base_model_and_merges_to_w_plus_delta(init):
    model, x = ScannedMlp(), jax.random.normal(jax.random.key(0), (5, 8))
    params = model.init(jax.random.key(1), x)["params"]
    spec = Spec([(r".*/kernel", LoRA(4, alpha=8.0, init=init))])
    layouts = infer_layouts(model, params, x)
    base, adapters = lora.initialize(jax.random.key(2), params, spec, layouts)
    flat, residual = paths.flatten(params), paths.flatten(base)
    for path in flat:  # every kernel moved into its adapter, nothing else changed
        moved = float(jnp.abs(residual[path] - flat[path]).max())
        assert (moved > 0.1) == path.endswith("kernel"), (path, moved)
    reference = model.apply({"params": params}, x)
    assert_close(factored(model)(base, adapters, x), reference, tol=1e-5)

    trained = _trained(adapters)
    merged = paths.flatten(lora.merge(base, trained))
    for path, f in lora.factors_by_path(trained).items():
        # W + ΔW, with ΔW = s·(A·B − A0·B0) what training added to the initial factors.
        a0, b0 = lora.factors_by_path(adapters)[path].a, lora.factors_by_path(adapters)[path].b
        delta = f.scale * (f.a @ f.b - a0 @ b0)
        assert_close(merged[path], flat[path] + delta.reshape(flat[path].shape), tol=1e-5)
    out = factored(model)(base, trained, x)
    assert_close(out, model.apply({"params": lora.merge(base, trained)}, x), tol=1e-5)
    assert float(jnp.abs(out - reference).max()) > 0.1 * float(jnp.abs(reference).max())


def test_inits_that_change_the_base_need_initialize():
    params = {"dense": {"kernel": jnp.ones((8, 4))}, "embed": {"embedding": jnp.ones((10, 4))}}
    with pytest.raises(SpecError, match=r"'dense/kernel' changes the base kernel.*initialize"):
        lora.init(jax.random.key(0), params, Spec([("dense/kernel", LoRA(2, init="olora"))]))
    with pytest.raises(SpecError, match=r"embedding table 'embed/embedding'.*PiSSA and OLoRA"):
        lora.initialize(jax.random.key(0), params, Spec([(".*", LoRA(2, init="pissa"))]))
    with pytest.raises(SpecError, match=r"init must be one of .*pissa_niter_<N>, olora"):
        LoRA(2, init="pissa_niter_")


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_the_converted_adapter_on_the_original_base_equals_lorax_in_peft(init, tmp_path):
    """PEFT's conversion (rank 2r, lora_alpha 2·alpha) on the unchanged base model."""
    pytest.importorskip("peft")
    from lorax_ft.models.peft_format import save_peft
    from tests.test_peft_format import IDS, _hf, _llama, _logits, _peft_load, _random_params

    module = _llama()
    params = _random_params(module)
    spec = Spec([(r".*/(q_proj|v_proj|up_proj)/kernel", LoRA(4, alpha=8.0, init=init))])
    layouts = infer_layouts(module, params, IDS)
    base, initial = lora.initialize(jax.random.key(3), params, spec, layouts)
    trained = _trained(initial, seed=1)
    converted = {}
    for path, f in lora.factors_by_path(trained).items():
        f0 = lora.factors_by_path(initial)[path]
        a, b = inits.residual_to_lora(f0.a, f0.b, f.a, f.b)
        converted[path] = f.replace(a=a, b=b)
    save_peft(str(tmp_path / "adapter"), module, params, paths.unflatten(converted))

    hf = _hf(module, params, tmp_path)  # the ORIGINAL base
    base_logits = _logits(hf)  # before PEFT injects its layers into hf
    peft_logits = _logits(_peft_load(hf, str(tmp_path / "adapter")))
    lorax_logits = np.asarray(factored(module)(base, trained, IDS))  # trained on the residual
    assert_close(peft_logits, lorax_logits, tol=1e-5)
    assert float(np.abs(lorax_logits - base_logits).max()) > 0.1


def test_a_pissa_rule_in_lf_adapt():
    """`lf.adapt` runs on the residual base it made; the user's params are not changed."""
    model, x = ScannedMlp(), jax.random.normal(jax.random.key(0), (5, 8))
    variables = model.init(jax.random.key(1), x)
    spec = Spec([(r".*/kernel", LoRA(4, init="pissa"))])
    adapted = lf.adapt(model, spec, x, variables=variables)
    assert_close(adapted(x), model.apply(variables, x), tol=1e-5)
    kernel = variables["params"]["layers"]["proj"]["kernel"]
    assert float(jnp.abs(adapted.params["layers"]["proj"]["kernel"] - kernel).max()) > 0.1
