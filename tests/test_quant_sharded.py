"""QLoRA on a mesh: a quantized frozen base trains sharded exactly as on one device.

A tiny Llama (lorax_ft.models) with its linear kernels quantized (NF4, int8) and LoRA on every
one of them trains a few AdamW steps on 8 simulated CPU devices, FSDP and tensor parallelism
together (data=2 × fsdp=2 × tensor=2), with and without a scanned layer stack. The references
are the same steps under plain `jax.jit` on one device, and the float model run on
`lorax_ft.quant.dequantize(params)`.
"""

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
from lorax_ft import quant
from lorax_ft.models import LlamaConfig, LlamaForCausalLM, logical_axes
from lorax_ft.parallel import mesh as mesh_lib
from lorax_ft.parallel import sharding
from lorax_ft.parallel.sharded_step import (
    init_train_state,
    make_sharded_eval_step,
    make_sharded_train_step,
)
from lorax_ft.training import optim
from lorax_ft.transform import lora, paths
from tests.tolerance import assert_close

FAST = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
STEPS = 3
LR = 1e-3
MESH = {"data": 2, "fsdp": 2, "tensor": 2}
# Every kernel's input axis (64 or 128) is a multiple of NF4's block of 64; every feature axis
# divides over the mesh (kv = 2 heads × 16 = 32).
CONFIG = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4,
    num_key_value_heads=2,
)  # fmt: skip
SPEC = lf.Spec([(r".*_proj/kernel", lf.LoRA(rank=4, alpha=8))])  # every linear layer's kernel
EXAMPLE = jnp.zeros((1, 8), jnp.int32)
BATCH = jax.random.randint(jax.random.key(9), (8, 17), 0, CONFIG["vocab_size"])
CASES = [("nf4", True), ("nf4", False), ("int8", True)]


def _lm_loss(model, batch, rng):
    del rng
    logits = model(batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean(), {}


@functools.cache
def _setup(method, scan):
    # Unrolled layers compile one by one: one layer keeps the unscanned case quick.
    config = LlamaConfig(**CONFIG, num_hidden_layers=2 if scan else 1, scan_layers=scan)
    module = LlamaForCausalLM(config)

    def init_variables(rng):
        # Quantized inside the (sharded) initialisation: every device codes its own shard.
        params = nn.unbox(module.init(jax.random.fold_in(rng, 0), EXAMPLE))["params"]
        layouts = lf.infer_layouts(module, params, EXAMPLE)
        params = quant.quantize(params, method, layouts)
        adapters = lora.init(jax.random.fold_in(rng, 1), params, SPEC, layouts)
        return {"params": params, "lora": adapters}

    abstract = jax.eval_shape(init_variables, jax.random.key(0))
    labels = lf.variable_labels(abstract["params"], abstract["lora"], SPEC)
    config = ml_collections.ConfigDict(
        {"optim": optim.default_optim_config(), "schedule": optim.default_schedule_config()}
    )
    config.optim.update(eps=1e-6, weight_decay=0.01)
    config.schedule.update(name="constant", lr=LR)
    return module, init_variables, labels, optim.make_optimizer(config, labels)


def _train(step, state):
    losses = []
    for _ in range(STEPS):
        state, metrics = step(state, BATCH)
        losses.append(float(metrics["loss"]))
    return state, losses


@functools.cache
def _reference(method, scan):
    """One device: `lf.init_state` and `lf.make_train_step` under plain jit."""
    module, init_variables, labels, tx = _setup(method, scan)
    init = lambda rng: lf.init_state(init_variables(rng), labels, tx, jax.random.key(2))
    state = jax.jit(init, compiler_options=FAST)(jax.random.key(0))
    step = lf.make_train_step(lf.factored(module), _lm_loss, tx)
    state, losses = _train(jax.jit(step, donate_argnums=0, compiler_options=FAST), state)
    return jax.device_get(state), losses


@functools.cache
def _sharded(method, scan):
    module, init_variables, labels, tx = _setup(method, scan)
    mesh = mesh_lib.make_mesh(MESH)
    shard = functools.partial(
        sharding.variable_shardings, mesh=mesh, logical_axes=logical_axes(module)
    )
    state, shardings = init_train_state(
        init_variables, jax.random.key(0), labels=labels, tx=tx, rng=jax.random.key(2),
        mesh=mesh, shard_variables=shard, compiler_options=FAST,
    )  # fmt: skip
    step = make_sharded_train_step(
        lf.factored(module), _lm_loss, tx, shardings, mesh, compiler_options=FAST
    )
    state, losses = _train(step, state)
    return module, mesh, state, shardings, losses


@pytest.mark.parametrize("method, scan", CASES)
def test_sharded_qlora_equals_one_device(method, scan):
    ref_state, ref_losses = _reference(method, scan)
    module, mesh, state, shardings, losses = _sharded(method, scan)
    print(f"{method} scan={scan}: losses {losses} vs {ref_losses}")
    assert_close(losses, ref_losses, tol=2e-6)  # losses near 4.85: 1e-5 of absolute error
    assert losses[-1] < losses[0]
    # The base is coded in place on each device: the same codes as on one device, and scales
    # (absmax / level, a division XLA may fuse otherwise on a mesh) within an ulp.
    frozen = jax.device_get(paths.flatten(state.frozen["params"]))
    ref_frozen = paths.flatten(ref_state.frozen["params"])
    kernels = [p for p, v in frozen.items() if quant.is_quantized(v)]
    assert len(kernels) == 7 + 1  # 7 projections (a stack of 2, or 1 layer) and lm_head
    for path in kernels:
        np.testing.assert_array_equal(frozen[path].values, ref_frozen[path].values)
    assert_close(frozen, ref_frozen, tol=2e-7)
    # Adam turns float noise in near-cancelling gradient sums into differences on the scale of
    # its steps (tests/tolerance.py): the factors are compared on lr × steps.
    adapters = jax.device_get(state.trainable["lora"])
    assert_close(adapters, ref_state.trainable["lora"], tol=1e-3, scale=LR * STEPS)
    assert_close(jax.device_get(state.opt_state), ref_state.opt_state, tol=1e-4)
    # Every leaf lives where the shardings say, quantized arrays included.
    leaves, expected = jax.tree.leaves(state), jax.tree.leaves(shardings)
    assert len(leaves) == len(expected)
    for leaf, want in zip(leaves, expected, strict=True):
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim)

    # The trained adapters on the quantized base (through the sharded eval step) compute what
    # they compute on the float base the codes stand for, run as a float model.
    def both(state, batch):
        params, adapters = state.frozen["params"], state.trainable["lora"]
        apply = lf.factored(module)
        return apply(params, adapters, batch), apply(quant.dequantize(params), adapters, batch)

    quantized, floats = make_sharded_eval_step(both, shardings, mesh)(state, BATCH)
    assert_close(quantized, floats, tol=1e-5)


@pytest.mark.parametrize("method, scan", CASES[:2])
def test_quantized_arrays_are_split_like_their_kernels(method, scan):
    _, _, state, *_ = _sharded(method, scan)
    frozen = paths.flatten(state.frozen["params"])
    layer = "model/layers" if scan else "model/layers_0"
    stack = (None,) if scan else ()
    up = frozen[f"{layer}/mlp/up_proj/kernel"]  # (*stack, embed=64, mlp=128): (fsdp, tensor)
    down = frozen[f"{layer}/mlp/down_proj/kernel"]  # (*stack, mlp=128, embed=64): (tensor, fsdp)
    # Codes (*stack, 32, 128) and (*stack, 64, 64): both axes split, 1/4 of the codes a device.
    assert up.values.sharding.spec == P(*stack, "fsdp", "tensor")
    assert down.values.sharding.spec == P(*stack, "tensor", "fsdp")
    assert up.values.addressable_shards[0].data.size == up.values.size // 4
    # NF4 block scales (*stack, 1, 128) and (*stack, 2, 64): a blocked axis of 1 stays whole.
    assert up.scales.sharding.spec == P(*stack, None, "tensor")
    assert down.scales.sharding.spec == P(*stack, "tensor", "fsdp")
    # The factors follow the float kernel's spec: A (*stack, in, r), B (*stack, r, out).
    factors = lora.factors_by_path(state.trainable["lora"])[f"{layer}/mlp/down_proj/kernel"]
    assert factors.a.sharding.spec == P(*stack, "tensor", None)
    assert factors.b.sharding.spec == P(*stack, None, "fsdp")


def test_quantized_specs_drop_axes_that_do_not_divide():
    """Shapes only: int8's one scale per output, double quantization's arrays, path rules."""
    mesh = mesh_lib.make_mesh(MESH)
    kernel = jax.ShapeDtypeStruct((2, 256, 96), jnp.float32)  # (layers, in, out)
    make = lambda method, **kw: jax.eval_shape(
        lambda w: quant.quantize_kernel(w, method, stack=1, **kw), kernel
    )
    spec = P(None, "fsdp", "tensor")
    int8 = sharding.quantized_specs(make("int8"), spec, mesh)
    assert (int8.values, int8.scales) == (spec, P(None, None, "tensor"))
    nf4 = sharding.quantized_specs(make("nf4", double_quant=True), spec, mesh)
    # codes (2, 128, 96), scale codes (2, 4, 96); one scale per group of 4 × 32 scale codes
    # (2, 1, 3): 3 does not divide over tensor=2; means (2, 1, 1)
    assert nf4.values == nf4.scale_codes == spec
    assert nf4.scales is None
    assert nf4.scale_scales == nf4.scale_mean == P(None, None, None)
    # A quantized leaf takes a path rule as its float kernel would, and a QuantizedKernel of
    # shardings; `follow_quantized` places a quantized tree from the float one's shardings.
    params = {"w": {"kernel": make("nf4")}, "b": jax.ShapeDtypeStruct((96,), jnp.float32)}
    rules = [("w/kernel", spec), ("b", P("tensor"))]
    placed = sharding.param_shardings(params, mesh, path_rules=rules)
    assert placed["w"]["kernel"].values.spec == spec
    assert placed["w"]["kernel"].scales.spec == P(None, "fsdp", "tensor")  # 4 blocks of 64
    assert sharding.kernel_spec(placed["w"]["kernel"]) == spec
    floats = {"w": {"kernel": kernel}, "b": params["b"]}
    followed = sharding.follow_quantized(
        sharding.param_shardings(floats, mesh, path_rules=rules), params
    )
    assert jax.tree.map(lambda s: s.spec, followed) == jax.tree.map(lambda s: s.spec, placed)


def test_a_dropped_mesh_axis_moves_to_an_output_axis_that_divides():
    """SmolLM2's NF4 block scales (9, 576) under 8-way FSDP: 9 blocks do not divide over 8,
    so the scales split their 576 outputs instead of being whole on every device."""
    mesh = mesh_lib.make_mesh({"fsdp": 8})
    for shape, spec, scales in [
        ((576, 576), P("fsdp", None), P(None, "fsdp")),
        ((3, 576, 1536), P(None, "fsdp", None), P(None, None, "fsdp")),  # never the layer axis
    ]:
        kernel = jax.ShapeDtypeStruct(shape, jnp.float32)
        stack = len(shape) - 2
        q = jax.eval_shape(
            lambda w, stack=stack: quant.quantize_kernel(w, "nf4", stack=stack), kernel
        )
        specs = sharding.quantized_specs(q, spec, mesh)
        assert (specs.values, specs.scales) == (spec, scales)
