"""Sharding: meshes, placement rules, and sharded training that equals unsharded training.

A tiny scanned Llama (lorax_ft.models) trains for a few steps on 8 simulated CPU devices under four
meshes, with LoRA and fully; the reference is the plain single-device `jax.jit` of the same step.
"""

import collections
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import lorax_ft as lf
from lorax_ft.models import LlamaConfig, LlamaForCausalLM, logical_axes
from lorax_ft.parallel import mesh as mesh_lib
from lorax_ft.parallel import sharding
from lorax_ft.parallel.mesh import split_over_batch
from lorax_ft.parallel.sharded_step import init_train_state, make_sharded_train_step
from lorax_ft.training import optim
from lorax_ft.transform import lora
from lorax_ft.transform.rules import RuleError
from tests import toy_models as tm
from tests.tolerance import assert_close

# Compile time dominates these tests: XLA:CPU without its fusion emitters and LLVM optimisation
# compiles 3-4x faster. The reference and the sharded runs use the same options.
FAST = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
STEPS = 3
LR = 1e-3
CONFIG = LlamaConfig(
    vocab_size=128,
    hidden_size=64,  # embed: divides over 8 fsdp devices
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # kv = 2 × 16 = 32: divides over 4 tensor devices
    scan_layers=True,  # stacked (layers, in, out) kernels and (layers, in, r) factors
)
MESHES = {
    "data": mesh_lib.data_parallel(),
    "fsdp": mesh_lib.fsdp(),
    "tensor": {"data": 2, "fsdp": 1, "tensor": 4},
    "fsdp_tensor": mesh_lib.fsdp_tensor(tensor=2),
}
SPECS = {
    "lora": lf.Spec(
        [(r".*_proj/kernel", lf.LoRA(rank=4, alpha=8)), (r".*layernorm/scale", lf.Train())]
    ),
    "full": lf.FULL_FINETUNE,
}
EXAMPLE = jnp.zeros((1, 8), jnp.int32)
BATCH = jax.random.randint(jax.random.key(9), (8, 17), 0, CONFIG.vocab_size)


def _lm_loss(model, batch, rng):
    del rng
    logits = model(batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean(), {}


@functools.cache
def _setup(mode):
    module, spec = LlamaForCausalLM(CONFIG), SPECS[mode]

    def init_variables(rng):
        params = nn.unbox(module.init(jax.random.fold_in(rng, 0), EXAMPLE))["params"]
        layouts = lf.infer_layouts(module, params, EXAMPLE)
        adapters = lora.init(jax.random.fold_in(rng, 1), params, spec, layouts)
        return {"params": params, "lora": adapters}

    abstract = jax.eval_shape(init_variables, jax.random.key(0))
    labels = lf.variable_labels(abstract["params"], abstract["lora"], spec)
    config = ml_collections.ConfigDict(
        {"optim": optim.default_optim_config(), "schedule": optim.default_schedule_config()}
    )
    config.optim.update(eps=1e-6, weight_decay=0.01)
    config.schedule.update(name="constant", lr=LR)
    return module, init_variables, labels, optim.make_optimizer(config, labels)


def _host(state):
    return jax.tree.map(np.asarray, (state.frozen, state.trainable, state.opt_state))


@functools.cache
def _reference(mode):
    """Unsharded: `lf.init_state` and `lf.make_train_step` under plain jit, on one device."""
    module, init_variables, labels, tx = _setup(mode)
    init = lambda rng: lf.init_state(init_variables(rng), labels, tx, jax.random.key(2))
    state = jax.jit(init, compiler_options=FAST)(jax.random.key(0))
    initial = _host(state)
    step = jax.jit(
        lf.make_train_step(lf.factored(module), _lm_loss, tx),
        donate_argnums=0,
        compiler_options=FAST,
    )
    losses = []
    for _ in range(STEPS):
        state, metrics = step(state, BATCH)
        losses.append(float(metrics["loss"]))
    return initial, _host(state), losses


@functools.cache
def _sharded(mode, mesh_name):
    module, init_variables, labels, tx = _setup(mode)
    mesh = mesh_lib.make_mesh(MESHES[mesh_name])
    shard = functools.partial(
        sharding.variable_shardings, mesh=mesh, logical_axes=logical_axes(module)
    )
    state, shardings = init_train_state(
        init_variables, jax.random.key(0), labels=labels, tx=tx, rng=jax.random.key(2),
        mesh=mesh, shard_variables=shard, compiler_options=FAST,
    )  # fmt: skip
    initial = _host(state)
    step = make_sharded_train_step(
        lf.factored(module), _lm_loss, tx, shardings, mesh, compiler_options=FAST
    )
    losses = []
    for _ in range(STEPS):
        state, metrics = step(state, BATCH)
        losses.append(float(metrics["loss"]))
    return initial, state, losses, shardings, step


# ------------------------------------------------------------------------------------------------
# Meshes and rules (no compilation)


def test_make_mesh_sizes_and_presets():
    shape = lambda config: dict(mesh_lib.make_mesh(config).shape)
    assert shape(mesh_lib.data_parallel()) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert shape(mesh_lib.fsdp()) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert shape(mesh_lib.fsdp_tensor(2)) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert shape({"data": 2, "fsdp": -1}) == {"data": 2, "fsdp": 4, "tensor": 1}
    mesh = mesh_lib.make_mesh(mesh_lib.fsdp())
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 3


@pytest.mark.parametrize(
    "config, message",
    [
        ({"data": 3, "fsdp": 1, "tensor": 1}, r"data=3 × fsdp=1 × tensor=1 does not fit the 8"),
        ({"data": -1, "fsdp": 3, "tensor": 1}, r"does not fit the 8 devices"),
        ({"data": -1, "fsdp": -1}, r"at most one axis"),
        ({"data": 8, "model": 1}, r"\['model'\] are unknown"),
        ({"data": 0}, r"mesh.data=0 must be a positive integer or -1"),
    ],
)
def test_make_mesh_errors_are_one_line(config, message):
    with pytest.raises(ValueError, match=message) as error:
        mesh_lib.make_mesh(config)
    assert "\n" not in str(error.value)


def test_logical_rules():
    mesh = mesh_lib.make_mesh(mesh_lib.fsdp_tensor(2))  # fsdp=4, tensor=2
    spec = lambda shape, names, rules=sharding.DEFAULT_RULES: sharding.logical_to_spec(
        shape, P(*names), rules, mesh
    )
    assert spec((64, 128), ("embed", "mlp")) == P("fsdp", "tensor")
    assert spec((2, 128, 64), ("layers", "mlp", "embed")) == P(None, "tensor", "fsdp")
    assert spec((128, 64), ("vocab", "embed")) == P("tensor", "fsdp")
    assert spec((64, 5), ("embed", "labels")) == P("fsdp", None)
    assert spec((6, 128), ("embed", "mlp")) == P(None, "tensor")  # 6 % 4: replicated
    assert spec((64, 3), ("embed", "heads")) == P("fsdp", None)  # 3 % 2: replicated
    assert spec((64,), ("unnamed_axis",)) == P(None)
    # An axis already used by this parameter is skipped; a later rule for the name may fit.
    rules = (("embed", "fsdp"), ("mlp", "fsdp"), ("mlp", "tensor"))
    assert spec((64, 128), ("embed", "mlp"), rules) == P("fsdp", "tensor")
    assert spec((64, 128), ("embed", "mlp"), (("embed", ("fsdp", "tensor")),)) == P(
        ("fsdp", "tensor"), None
    )
    # Mesh axes of size 1 are dropped: on a data-parallel mesh everything is replicated.
    data = mesh_lib.make_mesh(mesh_lib.data_parallel())
    assert sharding.logical_to_spec(
        (64, 128), P("embed", "mlp"), sharding.DEFAULT_RULES, data
    ) == P(None, None)
    with pytest.raises(ValueError, match="names mesh axes \\['model'\\]"):
        spec((64, 128), ("embed", "mlp"), (("embed", "model"),))


def test_path_rules_and_lora_factors_of_multi_axis_kernels():
    """An unannotated model (tests/toy_models.py): regex rules, first full match wins."""
    mesh = mesh_lib.make_mesh(mesh_lib.fsdp_tensor(2))  # fsdp=4, tensor=2
    model, ids = tm.TinyLlama(layers=1), jnp.zeros((1, 4), jnp.int32)
    spec = lf.Spec([(r".*(q|o)_proj/kernel", lf.LoRA(rank=2)), (r"embed_tokens/.*", lf.LoRA(2))])
    layouts = {}

    def init(rng):  # shapes only: nothing is computed
        params = model.init(rng, ids)["params"]
        layouts.update(lf.infer_layouts(model, params, ids))
        return {"params": params, "lora": lora.init(rng, params, spec, layouts)}

    variables = jax.eval_shape(init, jax.random.key(0))
    params, adapters = variables["params"], variables["lora"]
    path_rules = [
        (r".*/o_proj/kernel", P("tensor", None, "fsdp")),  # (heads, head_dim, d)
        (r".*/kernel", P("fsdp", "tensor")),  # q/k/v (d, heads, head_dim), mlp, lm_head
        (r"embed_tokens/embedding", P("fsdp", "tensor")),  # (vocab=50, d): 50 % 4 -> replicated
    ]
    shardings = sharding.variable_shardings(
        {"params": params, "lora": adapters}, mesh, layouts=layouts, path_rules=path_rules
    )
    specs = {p: s.spec for p, s in lf.paths.flatten(shardings).items()}
    assert specs["params/layers_0/attn/o_proj/kernel"] == P("tensor", None, "fsdp")
    assert specs["params/layers_0/attn/q_proj/kernel"] == P("fsdp", "tensor", None)
    assert specs["params/layers_0/mlp/up_proj/kernel"] == P("fsdp", "tensor")
    assert specs["params/embed_tokens/embedding"] == P(None, "tensor")
    assert specs["params/layers_0/attn_norm/scale"] == P()  # no rule: replicated
    # Factors: A (in, r) keeps the flattened input axes' sharding, B (r, out) the outputs'.
    assert specs["lora/layers_0/attn/q_proj/kernel/a"] == P("fsdp", None)
    assert specs["lora/layers_0/attn/q_proj/kernel/b"] == P(None, "tensor")  # (heads·head_dim)
    assert specs["lora/layers_0/attn/o_proj/kernel/a"] == P("tensor", None)
    assert specs["lora/layers_0/attn/o_proj/kernel/b"] == P(None, "fsdp")
    assert specs["lora/embed_tokens/embedding/a"] == P(None, None)
    assert specs["lora/embed_tokens/embedding/b"] == P(None, "tensor")
    # Without layouts the factors' shapes tell the same split.
    again = sharding.variable_shardings(
        {"params": params, "lora": adapters}, mesh, path_rules=path_rules
    )
    assert jax.tree.map(lambda s: s.spec, again) == jax.tree.map(lambda s: s.spec, shardings)


def test_path_rule_matching_no_parameter_is_an_error():
    mesh = mesh_lib.make_mesh(mesh_lib.fsdp_tensor(2))  # fsdp=4, tensor=2
    params = {"dense": {"kernel": jax.ShapeDtypeStruct((8, 8), jnp.float32)}}
    path_rules = [(r"dense/kernel", P("fsdp")), (r"lm_head/kernel", P(None, "tensor"))]
    with pytest.raises(
        RuleError,
        match=r"^sharding.path_rules: rule 'lm_head/kernel' matches no parameter .*"
        r"closest paths: \['dense/kernel'\]",
    ):
        sharding.param_specs(params, mesh, path_rules=path_rules)
    # A table shared by several models may opt out of the check.
    specs = sharding.param_specs(params, mesh, path_rules=path_rules, check_path_rules=False)
    assert specs == {"dense": {"kernel": P("fsdp", None)}}


# ------------------------------------------------------------------------------------------------
# Sharded training


@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_sharded_training_equals_unsharded(mode, mesh_name):
    ref_initial, ref_final, ref_losses = _reference(mode)
    initial, state, losses, shardings, _ = _sharded(mode, mesh_name)
    # The same values are created in place (partitionable threefry makes them layout-independent).
    jax.tree.map(np.testing.assert_array_equal, initial, ref_initial)
    assert_close(losses, ref_losses, tol=2e-6)  # losses near 4.85: 1e-5 of absolute error
    assert losses[-1] < losses[0]
    # Adam turns float noise in near-cancelling gradient sums into differences on the scale of
    # its steps (tests/tolerance.py): the weights are compared on lr × steps, not on their own
    # magnitudes; the optimizer's moments leaf by leaf.
    *variables, opt_state = _host(state)
    *ref_variables, ref_opt_state = ref_final
    assert_close(variables, ref_variables, tol=3e-3, scale=LR * STEPS)
    assert_close(opt_state, ref_opt_state, tol=1e-4)
    # Every leaf lives where the shardings say, after the steps as before them.
    leaves = jax.tree.leaves(state)
    expected = jax.tree.leaves(shardings)
    assert len(leaves) == len(expected)
    for leaf, want in zip(leaves, expected, strict=True):
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim)
    assert int(state.step) == STEPS


def _bytes_per_device(tree) -> dict:
    out = collections.Counter()
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] += shard.data.nbytes
    return out


def _replicated_bytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree) if x.sharding.is_fully_replicated)


def test_fsdp_splits_full_mode_params_and_optimizer_state_over_8_devices():
    _, state, *_ = _sharded("full", "fsdp")
    assert lora.nbytes(state.frozen) == 0
    for name, tree in [("params", state.trainable), ("opt_state", state.opt_state)]:
        total, whole = lora.nbytes(tree), _replicated_bytes(tree)
        per_device = _bytes_per_device(tree)
        print(
            f"full/fsdp {name}: {total} B, replicated {whole} B, per device {set(per_device.values())}"
        )
        assert len(per_device) == 8
        # Every device holds an eighth of the split leaves, plus the replicated step counts.
        assert set(per_device.values()) == {(total - whole) // 8 + whole}, name
        assert whole <= 64, name
        assert (total - whole) % 8 == 0
    assert _replicated_bytes(state.trainable) == 0  # every parameter has an `embed` axis


def test_fsdp_splits_lora_mode_base_over_8_devices():
    _, state, *_ = _sharded("lora", "fsdp")
    total = lora.nbytes(state.frozen)
    per_device = _bytes_per_device(state.frozen)
    print(f"lora/fsdp frozen base: {total} B, per device {set(per_device.values())}")
    assert set(per_device.values()) == {total // 8}
    # Under FSDP alone kernels are split on their input (embed) axis, so B (r, out) factors are
    # replicated and A (in, r) factors split: each device holds less than the whole trainable set.
    trainable, whole = lora.nbytes(state.trainable), _replicated_bytes(state.trainable)
    per_device = _bytes_per_device(state.trainable)
    print(
        f"lora/fsdp trainable: {trainable} B, replicated {whole} B, per device {set(per_device.values())}"
    )
    assert set(per_device.values()) == {(trainable - whole) // 8 + whole}
    assert 0 < whole < trainable


def test_lora_factors_follow_their_kernels():
    _, state, *_ = _sharded("lora", "fsdp_tensor")
    mesh_size = {"fsdp": 4, "tensor": 2}
    frozen = lf.paths.flatten(state.frozen["params"])
    factors = lora.factors_by_path(state.trainable["lora"])
    assert len(factors) == 7  # q, k, v, o, gate, up, down
    expected = {  # kernel (layers, in, out)  ->  A (layers, in, r), B (layers, r, out)
        "model/layers/self_attn/q_proj/kernel": (("fsdp", "tensor"), ("fsdp", None), (None, "tensor")),
        "model/layers/self_attn/k_proj/kernel": (("fsdp", "tensor"), ("fsdp", None), (None, "tensor")),
        "model/layers/self_attn/o_proj/kernel": (("tensor", "fsdp"), ("tensor", None), (None, "fsdp")),
        "model/layers/mlp/up_proj/kernel": (("fsdp", "tensor"), ("fsdp", None), (None, "tensor")),
        "model/layers/mlp/down_proj/kernel": (("tensor", "fsdp"), ("tensor", None), (None, "fsdp")),
    }  # fmt: skip
    for path, (kernel, a, b) in expected.items():
        assert frozen[path].sharding.spec == P(None, *kernel), path
        assert factors[path].a.sharding.spec == P(None, *a), path
        assert factors[path].b.sharding.spec == P(None, *b), path
        shard_a = factors[path].a.addressable_shards[0].data.shape
        assert shard_a == (2, factors[path].a.shape[1] // mesh_size[a[0]], 4), path
    for path, f in factors.items():  # and the general rule, for every adapted kernel
        k = frozen[path].sharding.spec
        assert f.a.sharding.spec == P(k[0], k[1], None), path
        assert f.b.sharding.spec == P(k[0], None, k[2]), path
    # Adam's moments of a factor sit with the factor.
    mu = [
        leaf
        for leaf in jax.tree.leaves(state.opt_state)
        if leaf.shape == factors["model/layers/mlp/down_proj/kernel"].a.shape
    ]
    assert mu and all(m.sharding.spec == P(None, "tensor", None) for m in mu)


def test_batch_that_does_not_divide_is_an_error():
    *_, step = _sharded("lora", "fsdp_tensor")  # data × fsdp = 4
    with pytest.raises(ValueError, match="batch size 6 does not divide over the 4 batch devices"):
        step(None, BATCH[:6])


def test_layer_outputs_stay_split_over_the_batch_axes():
    """Traced on an FSDP mesh, an adapted model's layer outputs are split over `fsdp` on their
    batch axis; the same function traced without a mesh leaves XLA free (here: no split)."""
    mesh = mesh_lib.make_mesh(mesh_lib.fsdp())
    x = jnp.ones((8, 4, 16))
    replicated = jax.sharding.NamedSharding(mesh, P())

    def placed(use_mesh: bool):
        def fn(x):
            if not use_mesh:
                return split_over_batch(x * 2)
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                return split_over_batch(x * 2)

        return jax.jit(fn, in_shardings=replicated)(x).sharding

    assert placed(True).is_equivalent_to(jax.sharding.NamedSharding(mesh, P("fsdp")), 3)
    assert placed(False).is_fully_replicated
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # a batch of 6 does not divide by 8
        assert split_over_batch(jnp.ones((6, 3))).shape == (6, 3)
