"""Greedy text completions from trained variables: what `lorax-ft generate` and the trainer's
`samples.json` print.

The adapters are merged into the base params in one compiled program, then the task's module
decodes greedily (`lorax_ft.models.generate`).

>>> params = merged_params(state.variables)   # doctest: +SKIP
>>> generate_texts(task, params, ["Once upon a time"], max_new_tokens=16)   # doctest: +SKIP
"""

from __future__ import annotations

import jax
import numpy as np

from lorax_ft import quant
from lorax_ft.transform import lora


@jax.jit
def merged_params(variables):
    """`{"params", "lora"}` -> params with every adapter merged in: one compiled program, so the
    merged kernels stay where (and sharded as) their base kernels are.

    A quantized base (`model.quantize`) is dequantized first, to its kernels' dtype (the run's
    `model.param_dtype`): the merged params are float, W_q dequantized + s·A·B, what the
    trained model computes (its codes cannot hold the merge).
    """
    return lora.merge(quant.dequantize(variables["params"]), variables["lora"])


def generate_texts(task, params, prompts, max_new_tokens) -> list[str]:
    """Greedy continuations of `prompts` (plain text) with the task's tokenizer.

    Args:
      task: a causal-LM `lorax_ft.run.tasks.Task` (its module, tokenizer and model config).
      params: the params to decode with, e.g. `merged_params(state.variables)`.
      prompts: plain-text prompts, one continuation each.
      max_new_tokens: tokens generated per prompt at most (fewer at an end-of-sequence token).

    Returns:
      The decoded new tokens of each prompt.
    """
    from lorax_ft.models.generate import Sampling
    from lorax_ft.models.generate import generate as generate_tokens

    params = _one_copy_if_replicated(params)
    ids = [task.tokenizer.encode(p).ids for p in prompts]
    stops = tuple(getattr(task.model_config, "eos_token_ids", ()) or ())
    sampling = Sampling(max_new_tokens=max_new_tokens, stop_tokens=stops)
    out = generate_tokens(task.module, params, ids, sampling)
    return [task.tokenizer.decode(list(np.asarray(row))) for row in out]


def _one_copy_if_replicated(params):
    """Params every device holds whole (data parallelism) -> one device's copy (no copy is made):
    decoding one batch of prompts on identical replicas would only repeat the work."""
    leaves = jax.tree.leaves(params)
    if all(x.is_fully_addressable and x.sharding.is_fully_replicated for x in leaves):
        return jax.tree.map(lambda x: x.addressable_shards[0].data, params)
    return params
