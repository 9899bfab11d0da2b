"""Scanned and rematerialised layer stacks compute the same loss and gradients as a plain loop."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lorax_ft.models import LlamaConfig, LlamaForCausalLM, abstract_params
from lorax_ft.models.stack import stack_layers, unstack_layers
from tests.tolerance import assert_close

CFG = LlamaConfig(
    vocab_size=32,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
)


def _loss_and_grads(cfg, params, ids):
    module = LlamaForCausalLM(cfg)

    def loss(p):
        logits = module.apply({"params": p}, ids[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1))

    return jax.jit(jax.value_and_grad(loss))(params)


def test_scan_and_remat_match_loop():
    rng = np.random.default_rng(0)
    looped = jax.tree.map(
        lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape, np.float32)),
        abstract_params(LlamaForCausalLM(CFG)),
    )
    ids = jnp.asarray(rng.integers(0, 32, size=(2, 6)))
    loss, grads = _loss_and_grads(CFG, looped, ids)
    scanned_cfg = dataclasses.replace(CFG, scan_layers=True, remat="dots")
    scanned = stack_layers(looped, "layers")
    assert scanned["model"]["layers"]["mlp"]["up_proj"]["kernel"].shape == (2, 16, 32)
    loss2, grads2 = _loss_and_grads(scanned_cfg, scanned, ids)
    assert_close(loss2, loss, tol=1e-6)
    assert_close(unstack_layers(grads2, "layers", 2), grads, tol=1e-6)
