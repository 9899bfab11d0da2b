"""Demo: the same fine-tune done twice, with LoRA and fully, through one code path.

    python -m experiments.demo_lora_vs_full

A small Llama-style decoder is first trained on a synthetic language (each token is the previous
one plus 3, modulo the vocabulary), standing in for a pretrained model. It is then fine-tuned to
a related language (plus 5) twice with the same budget: with LoRA (rank 8 on every projection)
and fully. The two runs differ only in their `Spec`. Prints, side by side, the trainable
parameters, optimizer-state bytes, median step time, and next-token accuracy before and after.
"""

from __future__ import annotations

import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

import lorax_ft as lf
from lorax_ft.models import LlamaConfig, LlamaForCausalLM
from lorax_ft.training import optim
from lorax_ft.transform import lora

VOCAB, SEQ, BATCH = 64, 32, 32
CONFIG = LlamaConfig(
    vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=SEQ,
)  # fmt: skip
LORA = lf.Spec([(r".*(q|k|v|o|gate|up|down)_proj/kernel", lf.LoRA(rank=8, alpha=16))])


def language(rng, shift: int, batch: int = BATCH):
    """Sequences whose every token is the previous one plus `shift` (mod VOCAB)."""
    start = jax.random.randint(rng, (batch, 1), 0, VOCAB)
    return (start + shift * jnp.arange(SEQ + 1)) % VOCAB


def lm_loss(model, batch, rng):
    del rng
    logits = model(batch[:, :-1])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
    return loss, {"accuracy": (logits.argmax(-1) == batch[:, 1:]).mean()}


def train(module, params, spec, shift, steps, lr, seed):
    """Fine-tunes `params` on the `shift` language; returns (variables, report)."""
    ids = language(jax.random.key(0), shift)[:, :-1]
    adapters = lora.init(jax.random.key(seed), params, spec, lf.infer_layouts(module, params, ids))
    labels = lf.variable_labels(params, adapters, spec)
    config = ml_collections.ConfigDict(
        {"optim": optim.default_optim_config(), "schedule": optim.default_schedule_config()}
    )
    config.schedule.update(lr=lr, warmup_steps=steps // 10, total_steps=steps)
    tx = optim.make_optimizer(config, labels)
    variables = jax.tree.map(jnp.copy, {"params": params, "lora": adapters})
    state = lf.init_state(variables, labels, tx, jax.random.key(seed))
    step = jax.jit(lf.make_train_step(lf.factored(module), lm_loss, tx), donate_argnums=0)
    times = []
    for i in range(steps):
        batch = language(jax.random.fold_in(jax.random.key(seed), i), shift)
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - start)
    report = {
        "trainable": lora.count(state.trainable),
        "opt_bytes": lora.nbytes(state.opt_state),
        "step_ms": 1e3 * statistics.median(times[1:]),
    }
    return state.variables, report


def accuracy(module, variables, shift) -> float:
    batch = language(jax.random.key(12345), shift, batch=256)
    model = lambda x: lf.factored(module)(variables["params"], variables["lora"], x)
    return float(lm_loss(model, batch, None)[1]["accuracy"])


def main():
    start = time.perf_counter()
    module = LlamaForCausalLM(CONFIG)
    init_ids = jnp.zeros((1, SEQ), jnp.int32)
    params = nn.unbox(module.init(jax.random.key(0), init_ids))["params"]
    print("pretraining the base model on the +3 language ...")
    base, _ = train(module, params, lf.FULL_FINETUNE, shift=3, steps=300, lr=3e-3, seed=1)
    base_params = base["params"]
    total = lora.count(base_params)
    before = accuracy(module, {"params": base_params, "lora": {}}, shift=5)
    print(f"base model: +3 accuracy {accuracy(module, base, 3):.3f}, +5 accuracy {before:.3f}")

    rows = {}
    for name, spec, lr in (("LoRA r=8", LORA, 3e-3), ("full", lf.FULL_FINETUNE, 1e-3)):
        print(f"fine-tuning on the +5 language: {name} ...")
        variables, report = train(module, base_params, spec, shift=5, steps=150, lr=lr, seed=2)
        report["after"] = accuracy(module, variables, shift=5)
        rows[name] = report

    print()
    print(f"{'':<28}" + "".join(f"{name:>16}" for name in rows))
    lines = [
        ("trainable params", lambda r: f"{r['trainable']:,}"),
        ("trainable % of total", lambda r: f"{100 * r['trainable'] / total:.2f}%"),
        ("optimizer state (KiB)", lambda r: f"{r['opt_bytes'] / 1024:,.0f}"),
        ("median step (ms)", lambda r: f"{r['step_ms']:.1f}"),
        ("+5 accuracy before", lambda r: f"{before:.3f}"),
        ("+5 accuracy after", lambda r: f"{r['after']:.3f}"),
    ]
    for label, cell in lines:
        print(f"{label:<28}" + "".join(f"{cell(r):>16}" for r in rows.values()))
    print(f"\nwall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
