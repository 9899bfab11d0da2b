"""DoRA (`LoRA(dora=True)`): exact to PEFT's `use_dora`, computed factored.

* against PEFT on a tiny Hugging Face Llama: initial magnitudes, logits with non-zero factors
  (plain and `nn.scan`-stacked), and a 20-step AdamW trajectory;
* the factored output and the gradients with respect to A, B and the magnitude against an
  explicit implementation (the kernel m·(W + s·A·B)/‖W + s·A·B‖, the norm under stop_gradient)
  on a linen model whose DoRA and plain adapters share one down-projection, an `nn.scan` stack
  and an NNX `nnx.vmap`/`nnx.scan` stack, with no "computed merged" warning;
* merge, the factored norm and the initial magnitudes against float64 numpy;
* the optimizer groups (LoRA+ and weight decay), the shardings of the magnitudes, and a sharded
  DoRA step against the one-device step;
* the refusals.
"""

from __future__ import annotations

import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import lorax_ft as lf
from lorax_ft.models import LlamaConfig, LlamaForCausalLM, load_pretrained, logical_axes
from lorax_ft.parallel import mesh as mesh_lib
from lorax_ft.parallel import sharding
from lorax_ft.parallel.sharded_step import init_train_state, make_sharded_train_step
from lorax_ft.training import optim
from lorax_ft.transform import factored as factored_lib
from lorax_ft.transform import lora
from lorax_ft.transform.layer_calls import AdapterError
from tests import conformance_models as cm
from tests import toy_models as tm
from tests.tolerance import assert_close

HIGHEST = jax.lax.Precision.HIGHEST
TARGETS = r".*(q|k|v|o|gate|up|down)_proj/kernel"


def _explicit_kernel(w, f: lf.Factors):
    """The DoRA kernel written out: m · (W + s·A·B) / stop_gradient(‖W + s·A·B‖), per column."""
    stack = f.a.shape[:-2]
    v = w.reshape((*stack, f.a.shape[-2], f.b.shape[-1]))
    v = v + f.scale * jnp.einsum("...ir,...ro->...io", f.a, f.b, precision=HIGHEST)
    norm = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(v * v, axis=-2, keepdims=True)))
    if f.magnitude is None:
        return v.reshape(w.shape)
    return (f.magnitude[..., None, :] * v / norm).reshape(w.shape)


def _explicit_params(params, adapters):
    factors = lora.factors_by_path(adapters)
    return lf.paths.map_with_path(
        lambda p, w: _explicit_kernel(w, factors[p]) if p in factors else w, params
    )


def _nonzero(adapters, seed=7):
    """Factors away from PEFT's init (B zero, m = ‖W‖), so that every DoRA term matters."""
    return tm.nonzero(adapters, seed)


def _check_against_explicit(fact, plain, params, adapters, *inputs):
    """Factored == explicit == merged outputs; factored gradients == explicit gradients."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a "computed merged" warning fails the test
        out = jax.jit(fact)(params, adapters, *inputs)
    expected = plain(_explicit_params(params, adapters), *inputs)
    base = plain(params, *inputs)
    assert np.abs(np.asarray(expected - base)).max() > 1e-2 * np.abs(np.asarray(base)).max()
    assert_close(out, expected, tol=1e-5)
    assert_close(plain(lora.merge(params, adapters), *inputs), expected, tol=1e-5)

    cot = jax.random.normal(jax.random.key(5), out.shape)
    grads = jax.jit(jax.grad(lambda ad: jnp.sum(fact(params, ad, *inputs) * cot)))(adapters)
    ref = jax.grad(lambda ad: jnp.sum(plain(_explicit_params(params, ad), *inputs) * cot))(adapters)
    assert_close(grads, ref, tol=1e-5)
    for path, f in lora.factors_by_path(ref).items():
        if f.magnitude is not None:
            assert np.abs(np.asarray(f.magnitude)).max() > 0, path
    return grads, ref


# ------------------------------------------------------------------------------------------------
# Against PEFT on a tiny Hugging Face Llama


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        initializer_range=0.1, tie_word_embeddings=False,
    )  # fmt: skip
    config._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


RANK, ALPHA = 4, 8
IDS = np.random.default_rng(0).integers(0, 64, size=(3, 10))


def _peft_model(path):
    torch, transformers = pytest.importorskip("torch"), pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    config = peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, use_dora=True,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )  # fmt: skip
    return torch, peft.get_peft_model(hf, config).eval()


def _peft_layer(model, path):
    # model/layers_0/self_attn/q_proj/kernel -> base_model.model.model.layers.0.self_attn.q_proj
    _, layer, *rest, _ = path.split("/")
    name = f"base_model.model.model.layers.{layer.split('_')[1]}.{'.'.join(rest)}"
    return model.get_submodule(name)


def _load_adapters_into_peft(torch, model, adapters):
    with torch.no_grad():
        for path, f in lora.factors_by_path(adapters).items():
            layer = _peft_layer(model, path)
            layer.lora_A["default"].weight.copy_(torch.tensor(np.asarray(f.a).T))
            layer.lora_B["default"].weight.copy_(torch.tensor(np.asarray(f.b).T))
            layer.lora_magnitude_vector["default"].weight.copy_(
                torch.tensor(np.asarray(f.magnitude))
            )


@functools.cache
def _ours(path, scan_layers=False):
    module, params, _, _ = load_pretrained(path, scan_layers=scan_layers)
    spec = lf.Spec([(TARGETS, lf.LoRA(rank=RANK, alpha=ALPHA, dora=True))])
    layouts = lf.infer_layouts(module, params, IDS)
    return module, params, spec, lora.init(jax.random.key(1), params, spec, layouts)


def _stacked(adapters):
    """Unscanned adapters (layers_0, layers_1, ...) as those of the nn.scan-ed model."""
    flat = lora.factors_by_path(adapters)
    layers = sorted({p.split("/")[1] for p in flat}, key=lambda s: int(s.split("_")[1]))
    out = {}
    for path in flat:
        if path.split("/")[1] != layers[0]:
            continue
        members = [flat[path.replace(layers[0], name, 1)] for name in layers]
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *members)
        out[path.replace(layers[0], "layers", 1)] = stacked
    return lf.paths.unflatten(out)


def test_initial_magnitudes_equal_peft(hf_llama):
    _, model = _peft_model(hf_llama)
    _, params, _, adapters = _ours(hf_llama)
    factors = lora.factors_by_path(adapters)
    assert len(factors) == 14
    for path, f in factors.items():
        theirs = _peft_layer(model, path).lora_magnitude_vector["default"].weight
        assert f.magnitude.dtype == jnp.float32
        assert_close(f.magnitude, theirs.detach().numpy(), tol=1e-6)
        # and the column norms of W, computed here in float64
        w = np.asarray(lf.paths.flatten(params)[path], np.float64)
        assert_close(f.magnitude, np.linalg.norm(w, axis=0), tol=1e-6)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_logits_equal_peft(hf_llama, scan_layers):
    torch, model = _peft_model(hf_llama)
    _, _, _, adapters = _ours(hf_llama)
    adapters = _nonzero(adapters)
    _load_adapters_into_peft(torch, model, adapters)
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(IDS)).logits.numpy()
    module, params, _, _ = _ours(hf_llama, scan_layers)
    ours_adapters = _stacked(adapters) if scan_layers else adapters
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # computed factored: no "computed merged" warning
        fact = lf.factored(module, unsupported="error")
        ours = np.asarray(jax.jit(fact)(params, ours_adapters, IDS))
    assert_close(ours, theirs, tol=1e-5)
    # The DoRA rescaling matters: plain LoRA with the same A and B gives other logits.
    plain = jax.tree.map(lambda f: f.replace(magnitude=None), ours_adapters,
                         is_leaf=lambda x: isinstance(x, lf.Factors))  # fmt: skip
    assert np.abs(np.asarray(fact(params, plain, IDS)) - theirs).max() > 1e-2 * np.abs(theirs).max()


STEPS, LR, WD = 20, 5e-3, 0.01


def test_adamw_trajectory_equals_peft(hf_llama):
    torch, model = _peft_model(hf_llama)
    _, _, _, adapters = _ours(hf_llama)
    adapters = _nonzero(adapters)
    _load_adapters_into_peft(torch, model, adapters)
    ids = np.random.default_rng(1).integers(0, 64, size=(4, 12))

    # PEFT: torch AdamW; the magnitudes undecayed, as lorax_ft's default decay mask leaves them.
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 3 * 14
    magnitudes = [p for n, p in trainable if "lora_magnitude_vector" in n]
    matrices = [p for n, p in trainable if "lora_magnitude_vector" not in n]
    opt = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": WD}, {"params": magnitudes, "weight_decay": 0.0}],
        lr=LR, betas=(0.9, 0.999), eps=1e-8,
    )  # fmt: skip
    model.train()
    theirs = []
    inputs, targets = torch.tensor(ids[:, :-1]), torch.tensor(ids[:, 1:])
    for _ in range(STEPS):
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), targets.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        theirs.append(loss.item())

    # Ours: make_optimizer's AdamW over the labels of {"params", "lora"}.
    module, params, spec, _ = _ours(hf_llama)
    labels = lf.variable_labels(params, adapters, spec)
    config = ml_collections.ConfigDict(
        {"optim": optim.default_optim_config(), "schedule": optim.default_schedule_config()}
    )
    config.optim.update(name="adamw", b1=0.9, b2=0.999, eps=1e-8, weight_decay=WD, clip_norm=0.0)
    config.schedule.update(name="constant", lr=LR)
    tx = optim.make_optimizer(config, labels)
    frozen, trainable_vars = lf.split({"params": params, "lora": adapters}, labels)
    fact = lf.factored(module, unsupported="error")

    def loss_fn(t):
        v = lf.combine(frozen, t)
        logits = fact(v["params"], v["lora"], ids[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    @jax.jit
    def step(t, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(t)
        updates, opt_state = tx.update(grads, opt_state, t)
        return optax.apply_updates(t, updates), opt_state, loss

    opt_state, ours = tx.init(trainable_vars), []
    for _ in range(STEPS):
        trainable_vars, opt_state, loss = step(trainable_vars, opt_state)
        ours.append(float(loss))
    assert ours[-1] < ours[0] - 0.1
    assert_close(ours, theirs, tol=1e-4)
    # The trained magnitudes too, on the scale of the steps Adam took (tests/tolerance.py).
    for path, f in lora.factors_by_path(trainable_vars["lora"]).items():
        theirs_m = _peft_layer(model, path).lora_magnitude_vector["default"].weight
        assert_close(f.magnitude, theirs_m.detach().numpy(), tol=1e-2, scale=LR * STEPS)


# ------------------------------------------------------------------------------------------------
# Factored against explicit: linen (grouped), nn.scan, NNX


class SharedInput(nn.Module):
    """Three projections of one input: DoRA with bias, DoRA multi-axis, plain LoRA no bias."""

    @nn.compact
    def __call__(self, x):
        q = nn.Dense(12, name="q")(x)
        k = nn.DenseGeneral((2, 3), name="k")(x).reshape((*x.shape[:-1], 6))
        v = nn.Dense(6, use_bias=False, name="v")(x)
        return jnp.concatenate([q, jnp.tanh(k) * v], axis=-1)


GROUPED = lf.Spec(
    [
        (r"(q|k)/kernel", lf.LoRA(rank=3, alpha=6, dora=True)),
        (r"v/kernel", lf.LoRA(rank=2, alpha=2)),
    ]
)


def _biased(params):
    # Non-zero biases, so subtracting the bias before the rescaling is tested.
    return lf.paths.map_with_path(lambda p, x: x + 0.3 if p.endswith("bias") else x, params)


def test_linen_shared_input_dora_and_lora_grouped():
    model = SharedInput()
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    params = _biased(model.init(jax.random.key(1), x)["params"])
    layouts = lf.infer_layouts(model, params, x)
    adapters = _nonzero(lora.init(jax.random.key(2), params, GROUPED, layouts))
    factors = lora.factors_by_path(adapters)
    assert factors["k/kernel"].magnitude.shape == (6,) and factors["v/kernel"].magnitude is None
    # The three adapters read the same x: one x·[A_q A_k A_v] serves them all.
    run = factored_lib._runner(model)
    discovery, elsewhere = factored_lib._discover(run, params, factors, (x,), {})
    assert not elsewhere
    assert set(discovery.groups_found()) == {"q/kernel", "k/kernel", "v/kernel"}
    plain = lambda p, x: model.apply({"params": p}, x)
    _check_against_explicit(lf.factored(model, unsupported="error"), plain, params, adapters, x)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.gelu(nn.Dense(16, name="up")(x))
        return x + nn.Dense(8, name="down")(h), None


class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        x, _ = stack(name="layers")(x, None)
        return nn.Dense(4, name="head")(x)


def test_linen_scan_stack():
    model = Stack()
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    params = _biased(model.init(jax.random.key(1), x)["params"])
    layouts = lf.infer_layouts(model, params, x)
    spec = lf.Spec([(r".*/kernel", lf.LoRA(rank=2, alpha=4, dora=True))])
    adapters = _nonzero(lora.init(jax.random.key(2), params, spec, layouts))
    assert lora.factors_by_path(adapters)["layers/up/kernel"].magnitude.shape == (3, 16)
    plain = lambda p, x: model.apply({"params": p}, x)
    _check_against_explicit(lf.factored(model, unsupported="error"), plain, params, adapters, x)


def test_nnx_scan_stack():
    model = cm.NnxScanLayers(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, cm.D))
    params = _biased(lf.nnx_params(model))
    layouts = lf.infer_layouts(model, params, x)
    spec = lf.Spec([(r".*kernel", lf.LoRA(rank=2, alpha=4, dora=True))])
    adapters = _nonzero(lora.init(jax.random.key(2), params, spec, layouts))
    assert lora.factors_by_path(adapters)["blocks/up/kernel"].magnitude.shape == (
        cm.LAYERS,
        cm.HIDDEN,
    )
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    plain = lambda p, x: nnx.merge(graphdef, p, rest)(x)
    _check_against_explicit(lf.factored(model, unsupported="error"), plain, params, adapters, x)


def test_zero_b_at_init_is_the_base_model():
    """m = ‖W‖ and B = 0: m/n is 1, so the DoRA model starts as the base model."""
    model = SharedInput()
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    params = _biased(model.init(jax.random.key(1), x)["params"])
    adapters = lora.init(jax.random.key(2), params, GROUPED, lf.infer_layouts(model, params, x))
    out = lf.factored(model)(params, adapters, x)
    assert_close(out, model.apply({"params": params}, x), tol=1e-6)


# ------------------------------------------------------------------------------------------------
# merge, the factored norm and the initial magnitudes against float64 numpy


def _numpy_dora(w, a, b, m, s):
    w, a, b, m = (np.asarray(t, np.float64) for t in (w, a, b, m))
    v = w + s * a @ b
    return m[..., None, :] * v / np.linalg.norm(v, axis=-2, keepdims=True)


def test_merge_and_norm_equal_the_formula():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((2, 6, 5)).astype(np.float32)  # a stack of two (6 in, 5 out) kernels
    params = {"k": jnp.asarray(w)}
    layouts = {"k": lf.KernelLayout(stack=1, inputs=1)}
    spec = lf.Spec([("k", lf.LoRA(rank=3, alpha=2, dora=True))])
    f = lora.init(jax.random.key(0), params, spec, layouts)["k"]
    assert_close(f.magnitude, np.linalg.norm(w.astype(np.float64), axis=-2), tol=1e-6)
    f = f.replace(
        b=jnp.asarray(rng.standard_normal(f.b.shape), jnp.float32),
        magnitude=f.magnitude * jnp.asarray(rng.uniform(0.5, 1.5, (2, 5)), jnp.float32),
    )
    expected = _numpy_dora(w, f.a, f.b, f.magnitude, f.scale)
    merged = lora.merge(params, {"k": f})["k"]
    assert merged.shape == w.shape and merged.dtype == jnp.float32
    assert_close(merged, expected, tol=1e-6)
    v = w.astype(np.float64) + f.scale * np.asarray(f.a, np.float64) @ np.asarray(f.b, np.float64)
    assert_close(lora.dora_norm(params["k"], f), np.linalg.norm(v, axis=-2), tol=1e-6)
    # A multi-axis kernel (8 in, 2 × 3 out) merges per flattened output feature.
    w2 = rng.standard_normal((8, 2, 3)).astype(np.float32)
    spec2 = lf.Spec([("k", lf.LoRA(rank=2, dora=True))])
    f2 = lora.init(jax.random.key(1), {"k": w2}, spec2, {"k": lf.KernelLayout(0, 1)})["k"]
    f2 = f2.replace(b=jnp.ones_like(f2.b))
    expected2 = _numpy_dora(w2.reshape(8, 6), f2.a, f2.b, f2.magnitude, f2.scale)
    assert_close(lora.merge({"k": w2}, {"k": f2})["k"], expected2.reshape(8, 2, 3), tol=1e-6)


# ------------------------------------------------------------------------------------------------
# Training: optimizer groups, shardings, a sharded step


def _optim_config(**optim_kw):
    config = ml_collections.ConfigDict(
        {"optim": optim.default_optim_config(), "schedule": optim.default_schedule_config()}
    )
    config.optim.update(clip_norm=0.0, **optim_kw)
    config.schedule.update(name="constant", lr=0.1)
    return config


def test_magnitude_is_trained_in_loraplus_b_group_without_decay():
    params = {"layers": {"k": {"kernel": jnp.ones((3, 6, 5))}}}
    spec = lf.Spec([(".*kernel", lf.LoRA(rank=2, dora=True))])
    adapters = lora.init(jax.random.key(0), params, spec, {"layers/k/kernel": lf.KernelLayout(1)})
    labels = lf.variable_labels(params, adapters, spec)
    assert lora.factors_by_path(labels["lora"])["layers/k/kernel"].magnitude == "lora"
    groups = optim.leaf_groups(_optim_config(loraplus_lr_ratio=16.0).optim, labels)
    assert groups["lora/layers/k/kernel/magnitude"] == optim.Group("lora_b", 16.0)
    assert groups["lora/layers/k/kernel/b"] == optim.Group("lora_b", 16.0)
    assert groups["lora/layers/k/kernel/a"] == optim.Group("lora", 1.0)
    # Weight decay alone (zero gradients): A decays; the (3, 5) stacked magnitude, like a norm
    # scale, does not.
    tx = optim.make_optimizer(_optim_config(name="adamw", weight_decay=0.5), labels)
    variables = {"params": params, "lora": adapters}
    _, trainable = lf.split(variables, labels)
    zeros = jax.tree.map(jnp.zeros_like, trainable)
    updates, _ = tx.update(zeros, tx.init(trainable), trainable)
    f = lora.factors_by_path(updates["lora"])["layers/k/kernel"]
    np.testing.assert_array_equal(f.magnitude, 0.0)
    a = lora.factors_by_path(adapters)["layers/k/kernel"].a
    assert_close(f.a, -0.1 * 0.5 * a, tol=1e-6)


SHARD_CONFIG = LlamaConfig(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, scan_layers=True,
)  # fmt: skip
SHARD_SPEC = lf.Spec([(TARGETS, lf.LoRA(rank=4, alpha=8, dora=True))])
EXAMPLE = jnp.zeros((1, 8), jnp.int32)
BATCH = jax.random.randint(jax.random.key(9), (8, 17), 0, SHARD_CONFIG.vocab_size)


def _lm_loss(model, batch, rng):
    del rng
    logits = model(batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean(), {}


def test_sharded_dora_step_equals_one_device_step():
    module = LlamaForCausalLM(SHARD_CONFIG)

    def init_variables(rng):
        params = nn.unbox(module.init(jax.random.fold_in(rng, 0), EXAMPLE))["params"]
        adapters = lora.init(
            jax.random.fold_in(rng, 1),
            params,
            SHARD_SPEC,
            lf.infer_layouts(module, params, EXAMPLE),
        )
        # B away from zero, so that the norm's cross terms are in the step.
        adapters = jax.tree.map(
            lambda f: f.replace(b=f.b + 0.05), adapters, is_leaf=lambda x: isinstance(x, lf.Factors)
        )
        return {"params": params, "lora": adapters}

    abstract = jax.eval_shape(init_variables, jax.random.key(0))
    labels = lf.variable_labels(abstract["params"], abstract["lora"], SHARD_SPEC)
    config = _optim_config(name="adamw", weight_decay=0.01, loraplus_lr_ratio=4.0)
    config.schedule.lr = 1e-3
    tx = optim.make_optimizer(config, labels)

    init = lambda rng: lf.init_state(init_variables(rng), labels, tx, jax.random.key(2))
    state = jax.jit(init)(jax.random.key(0))
    step = jax.jit(lf.make_train_step(lf.factored(module, unsupported="error"), _lm_loss, tx))
    ref_losses = []
    for _ in range(2):
        state, metrics = step(state, BATCH)
        ref_losses.append(float(metrics["loss"]))
    ref = jax.tree.map(np.asarray, state.trainable)

    mesh = mesh_lib.make_mesh(mesh_lib.fsdp_tensor(tensor=2))
    shard = functools.partial(
        sharding.variable_shardings, mesh=mesh, logical_axes=logical_axes(module)
    )
    sstate, shardings = init_train_state(
        init_variables, jax.random.key(0), labels=labels, tx=tx, rng=jax.random.key(2),
        mesh=mesh, shard_variables=shard,
    )  # fmt: skip
    # Magnitudes are placed like B's output axis (and so like the kernel's output axis).
    frozen = lf.paths.flatten(sstate.frozen["params"])
    for path, f in lora.factors_by_path(sstate.trainable["lora"]).items():
        b_spec = f.b.sharding.spec
        assert f.magnitude.sharding.spec == P(b_spec[0], b_spec[2]), path
        assert f.magnitude.sharding.spec[1] == frozen[path].sharding.spec[2], path
    q = lora.factors_by_path(sstate.trainable["lora"])["model/layers/self_attn/q_proj/kernel"]
    assert q.magnitude.sharding.spec == P(None, "tensor")
    sstep = make_sharded_train_step(
        lf.factored(module, unsupported="error"), _lm_loss, tx, shardings, mesh
    )
    losses = []
    for _ in range(2):
        sstate, metrics = sstep(sstate, BATCH)
        losses.append(float(metrics["loss"]))
    assert_close(losses, ref_losses, tol=2e-6)
    assert_close(jax.tree.map(np.asarray, sstate.trainable), ref, tol=3e-3, scale=2e-3)


# ------------------------------------------------------------------------------------------------
# Refusals


def test_spec_refusals():
    with pytest.raises(lf.SpecError, match="dropout"):
        lf.LoRA(rank=2, dora=True, dropout=0.1)
    with pytest.raises(lf.SpecError, match="dora must be True or False"):
        lf.LoRA(rank=2, dora=1)
    params = {"embed": {"embedding": jnp.ones((10, 4))}}
    spec = lf.Spec([(".*", lf.LoRA(rank=2, dora=True))])
    with pytest.raises(lf.SpecError, match="embedding table 'embed/embedding'"):
        lora.init(jax.random.key(0), params, spec)


@pytest.mark.parametrize(
    "model, x, pattern",
    [
        (tm.ConvNet(), jnp.ones((1, 6, 6, 3)), r"conv1/kernel"),
        (tm.EinsumBlock(), jnp.ones((1, 3, tm.HIDDEN)), r"qkv/kernel"),
        (tm.TiedEmbedLM(), jnp.ones((1, 3), jnp.int32), r"embed/embedding"),
    ],
)
def test_dora_at_conv_einsum_and_embedding_layers_is_refused(model, x, pattern):
    params = model.init(jax.random.key(0), x)["params"]
    layouts = lf.infer_layouts(model, params, x)
    if isinstance(model, tm.TiedEmbedLM):
        # lora.init refuses DoRA on an embedding layout; with a plain (in, out) layout it passes,
        # and the layer call (a lookup, then `attend`) is what refuses.
        layouts[pattern] = lf.KernelLayout(0, 1)
    spec = lf.Spec([(pattern, lf.LoRA(rank=1, dora=True))])
    adapters = lora.init(jax.random.key(1), params, spec, layouts)
    with pytest.raises(
        AdapterError, match=rf"DoRA adapter '{pattern}': its layer is a '(conv|einsum|embed)' layer"
    ):
        lf.factored(model)(params, adapters, x)


def test_unmerge_and_bad_magnitude_refusals():
    params = {"k": jnp.ones((4, 3))}
    adapters = lora.init(jax.random.key(0), params, lf.Spec([("k", lf.LoRA(rank=1, dora=True))]))
    with pytest.raises(ValueError, match=r"cannot unmerge the DoRA adapters \['k'\]"):
        lora.unmerge(lora.merge(params, adapters), adapters)
    model = nn.Dense(3)
    x = jnp.ones((2, 4))
    dense = model.init(jax.random.key(0), x)["params"]
    spec = lf.Spec([("kernel", lf.LoRA(rank=1, dora=True))])
    bad = lora.init(jax.random.key(0), dense, spec)
    bad["kernel"] = bad["kernel"].replace(magnitude=jnp.ones(4))
    with pytest.raises(AdapterError, match=r"DoRA adapter 'kernel': magnitude \(4,\)"):
        lf.factored(model)(dense, bad, x)
