"""Benchmark: one train step of a Llama-style decoder, full fine-tuning versus LoRA, DoRA, QLoRA.

    python -m experiments.bench_step [--rounds 7] [--small]

Measures, after compilation and alternating the modes in one process (this machine is shared and
noisy, so ratios of medians are the figures to trust):

* full: full fine-tuning (every weight trained, AdamW);
* lora: LoRA r=8, alpha=16 on q,k,v,o,gate,up,down, computed factored;
* lora_merged: the same adapters through the merged path (W + s·A·B materialised);
* dora: DoRA on the same targets with the same rank and alpha, computed factored (its column
  norms from ‖W‖² and Wᵀ·A, never W + s·A·B);
* qlora_nf4, qlora_int8: the LoRA adapters on a quantized frozen base (`lorax_ft.quant`:
  every linear kernel, lm_head included, as NF4 codes in blocks of 64 or int8 per output
  feature; the embedding stays float32), each kernel dequantized inside its layer call;
* floor: forward plus backward to the embedding output with every weight frozen and no
  optimizer: no LoRA step can be cheaper.

Beside the times, each step's compiled memory (`memory_analysis()`: argument and temporary
bytes) and, for the quantized bases, the bytes their kernels hold against the same kernels in
float32 (NF4: 0.5625 of 4 bytes a parameter, 0.14).

Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

import lorax_ft as lf
from lorax_ft import quant
from lorax_ft.models import LlamaConfig, LlamaForCausalLM
from lorax_ft.training import optim
from lorax_ft.transform import lora

LORA_TARGETS = r".*(q|k|v|o|gate|up|down)_proj/kernel"


def model_config(small: bool) -> LlamaConfig:
    if small:  # a seconds-long variant, to check the script itself
        return LlamaConfig(
            vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=256,
        )  # fmt: skip
    return LlamaConfig(
        vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=2,
        num_attention_heads=16, max_position_embeddings=256,
    )  # fmt: skip


def optimizer_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(
        {"optim": optim.default_optim_config(), "schedule": optim.default_schedule_config()}
    )
    config.optim.weight_decay = 0.01
    config.schedule.update(name="constant", lr=1e-4)
    return config


def lm_loss(model, batch, rng):
    del rng
    logits = model(batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean(), {}


def build(module, params, spec, apply_fn, layouts):
    """A compiled, donating train step and its initial state for one mode."""
    adapters = lora.init(jax.random.key(1), params, spec, layouts)
    labels = lf.variable_labels(params, adapters, spec)
    tx = optim.make_optimizer(optimizer_config(), labels)
    variables = jax.tree.map(jnp.copy, {"params": params, "lora": adapters})
    state = lf.init_state(variables, labels, tx, jax.random.key(2))
    step = jax.jit(lf.make_train_step(apply_fn, lm_loss, tx), donate_argnums=0)
    return state, step


def floor_step(module):
    """Forward + backward to the embedding output; all weights frozen, no optimizer."""

    def grad_at_embedding(params, batch):
        def loss(h0):
            def add_h0(next_fun, args, kwargs, context):
                out = next_fun(*args, **kwargs)
                is_embed = isinstance(context.module, nn.Embed)
                return out + h0 if is_embed and context.method_name == "__call__" else out

            with nn.intercept_methods(add_h0):
                logits = module.apply({"params": params}, batch[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

        b, s = batch.shape
        return jax.grad(loss)(jnp.zeros((b, s - 1, module.config.hidden_size)))

    return jax.jit(grad_at_embedding)


def quantized_bytes(params) -> tuple[int, int]:
    """(bytes the quantized kernels of `params` hold, the same kernels' float32 bytes)."""
    kernels = [x for x in lf.paths.flatten(params).values() if quant.is_quantized(x)]
    held = sum(q.nbytes for q in kernels)
    return held, sum(math.prod(q.shape) * 4 for q in kernels)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args(argv)

    cfg = model_config(args.small)
    module = LlamaForCausalLM(cfg)
    batch = jax.random.randint(jax.random.key(0), (8, 129), 0, cfg.vocab_size)
    params = nn.unbox(module.init(jax.random.key(0), batch[:, :-1]))["params"]
    layouts = lf.infer_layouts(module, params, batch[:, :-1])
    lora_spec = lf.Spec([(LORA_TARGETS, lf.LoRA(rank=8, alpha=16))])
    dora_spec = lf.Spec([(LORA_TARGETS, lf.LoRA(rank=8, alpha=16, dora=True))])
    merged_apply = lf.factored(lambda p, x: module.apply({"params": p}, x))
    quantized = {m: quant.quantize(params, m, layouts) for m in ("nf4", "int8")}

    modes = {
        "full": build(module, params, lf.FULL_FINETUNE, lf.factored(module), layouts),
        "lora": build(module, params, lora_spec, lf.factored(module), layouts),
        "lora_merged": build(module, params, lora_spec, merged_apply, layouts),
        "dora": build(module, params, dora_spec, lf.factored(module), layouts),
        "qlora_nf4": build(module, quantized["nf4"], lora_spec, lf.factored(module), layouts),
        "qlora_int8": build(module, quantized["int8"], lora_spec, lf.factored(module), layouts),
    }
    floor = floor_step(module)
    report = {}
    for name, (state, step) in modes.items():
        compiled = step.lower(state, batch).compile()
        memory = compiled.memory_analysis()
        report[name] = {
            "flops": compiled.cost_analysis()["flops"],
            "argument_bytes": memory.argument_size_in_bytes,
            "temp_bytes": memory.temp_size_in_bytes,
            "state_bytes": lora.nbytes(state),
        }
    floor_compiled = floor.lower(params, batch).compile()
    report["floor"] = {"flops": floor_compiled.cost_analysis()["flops"]}

    def run_floor():
        jax.block_until_ready(floor(params, batch))

    runners = {"floor": run_floor}
    states = {name: state for name, (state, _) in modes.items()}
    for name, (_, step) in modes.items():

        def run(name=name, step=step):
            states[name], metrics = step(states[name], batch)
            jax.block_until_ready(metrics["loss"])

        runners[name] = run
    for run in runners.values():  # warm up (compile, first-touch allocations)
        run()
    times = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}

    total = lora.count(params)
    trainable = lora.count(states["lora"].trainable)
    print(
        f"{'mode':<12} {'median s':>9} {'GFLOP':>9} {'state MB':>9} {'args MB':>9} {'temp MB':>9}"
    )
    for name in ("full", "lora", "lora_merged", "dora", "qlora_nf4", "qlora_int8", "floor"):
        r = report[name]
        print(
            f"{name:<12} {medians[name]:9.4f} {r['flops'] / 1e9:9.2f} "
            f"{r.get('state_bytes', 0) / 2**20:9.1f} {r.get('argument_bytes', 0) / 2**20:9.1f} "
            f"{r.get('temp_bytes', 0) / 2**20:9.1f}"
        )
    print(f"trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    kernel_bytes = {m: quantized_bytes(q) for m, q in quantized.items()}
    for m, (held, floats) in kernel_bytes.items():
        print(f"{m} kernels: {held / 2**20:.1f} MB, {held / floats:.4f} of float32's")
    result = {
        "full_step_s": medians["full"],
        "lora_step_s": medians["lora"],
        "lora_merged_step_s": medians["lora_merged"],
        "floor_step_s": medians["floor"],
        "lora_over_full": medians["lora"] / medians["full"],
        "lora_over_floor": medians["lora"] / medians["floor"],
        "dora_step_s": medians["dora"],
        "dora_over_lora": medians["dora"] / medians["lora"],
        "dora_flops": report["dora"]["flops"],
        "dora_flops_over_lora": report["dora"]["flops"] / report["lora"]["flops"],
        "dora_temp_bytes": report["dora"]["temp_bytes"],
        "full_flops": report["full"]["flops"],
        "lora_flops": report["lora"]["flops"],
        "lora_merged_flops": report["lora_merged"]["flops"],
        "floor_flops": report["floor"]["flops"],
        "full_state_bytes": report["full"]["state_bytes"],
        "lora_state_bytes": report["lora"]["state_bytes"],
        "full_temp_bytes": report["full"]["temp_bytes"],
        "lora_temp_bytes": report["lora"]["temp_bytes"],
        "full_argument_bytes": report["full"]["argument_bytes"],
        "lora_argument_bytes": report["lora"]["argument_bytes"],
        "trainable_params": trainable,
        "total_params": total,
        "rounds": args.rounds,
        "backend": jax.default_backend(),
    }
    for m, (held, floats) in kernel_bytes.items():
        name = f"qlora_{m}"
        result.update({
            f"{name}_step_s": medians[name],
            f"{name}_over_lora": medians[name] / medians["lora"],
            f"{name}_flops": report[name]["flops"],
            f"{name}_argument_bytes": report[name]["argument_bytes"],
            f"{name}_argument_over_lora": (
                report[name]["argument_bytes"] / report["lora"]["argument_bytes"]
            ),
            f"{name}_temp_bytes": report[name]["temp_bytes"],
            f"{name}_temp_over_lora": report[name]["temp_bytes"] / report["lora"]["temp_bytes"],
            f"{name}_state_bytes": report[name]["state_bytes"],
            f"{m}_kernel_bytes": held,
            f"{m}_kernel_float32_bytes": floats,
            f"{m}_kernel_bytes_ratio": held / floats,
        })  # fmt: skip
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
