"""What a fine-tune optimises and measures: sequence classification and causal language modelling.

A `Task` bundles the Flax module, its base params (pretrained weights, plus a freshly initialised
head for classification), the tokenizer, the training loss and the evaluation. The trainer is
the same for every task.

Batches are dicts of arrays from `lorax_ft.data`: `input_ids`, `attention_mask` (and
`token_type_ids`, `label` for classification; `labels`, `loss_mask` for language modelling), plus
`weights`, which is 0 on the rows that pad the last eval batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lorax_ft.models import BertForSequenceClassification, load_pretrained

PyTree = Any
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class Task:
    """A model with its weights and how to train and evaluate it."""

    kind: str
    module: nn.Module
    params: PyTree
    model_config: Any
    tokenizer: Any
    example_inputs: tuple
    loss_fn: Callable  # (model, batch, rng) -> (loss, metrics)
    eval_fn: Callable  # (model, batch) -> dict of summed statistics
    summarize: Callable[[dict], dict]  # summed statistics -> eval metrics
    data_kwargs: dict = dataclasses.field(default_factory=dict)  # special tokens for the data


def build(config, num_labels: int | None = None) -> Task:
    """The task a config describes (`num_labels` is needed for classification)."""
    model = config.model
    overrides = {
        "dtype": _DTYPES[model.dtype],
        "param_dtype": _DTYPES[model.param_dtype],
        "scan_layers": model.scan_layers,
        "remat": model.remat,
    }
    module, params, model_config, tokenizer = load_pretrained(
        model.preset or model.path, **overrides
    )
    if model.task == "classification":
        return _classification(config, module, params, model_config, tokenizer, num_labels)
    return _causal_lm(module, params, model_config, tokenizer)


def _classification(config, encoder, params, model_config, tokenizer, num_labels) -> Task:
    if num_labels is None or num_labels < 2:
        raise ValueError(f"classification needs at least 2 labels, the data has {num_labels}")
    if isinstance(encoder, BertForSequenceClassification):
        params = params["bert"]
    model_config = dataclasses.replace(
        model_config,
        num_labels=num_labels,
        classifier_pooling=config.model.classifier_pooling,
        classifier_dropout=config.model.classifier_dropout,
    )
    module = BertForSequenceClassification(model_config)
    example = (jnp.zeros((1, 8), jnp.int32),)
    # A fresh head on the pretrained encoder: initialise everything, keep only the new leaves.
    fresh = nn.unbox(jax.jit(module.init)(jax.random.key(config.train.seed), *example))["params"]
    _check_same_shapes(fresh["bert"], params)
    params = {**fresh, "bert": params}

    def forward(model, batch, rng=None):
        kwargs = {"rngs": {"dropout": rng}, "deterministic": False} if rng is not None else {}
        return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], **kwargs)

    def loss_fn(model, batch, rng):
        logits = forward(model, batch, rng)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        accuracy = (logits.argmax(-1) == batch["label"]).mean()
        return losses.mean(), {"accuracy": accuracy}

    def eval_fn(model, batch):
        logits = forward(model, batch)
        weights = batch["weights"].astype(jnp.float32)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        predicted = logits.argmax(-1)
        # confusion[true, predicted], weighted so that padding rows count for nothing
        confusion = jnp.zeros((num_labels, num_labels)).at[batch["label"], predicted].add(weights)
        return {
            "loss_sum": (losses * weights).sum(),
            "count": weights.sum(),
            "confusion": confusion,
        }

    return Task(
        "classification", module, params, model_config, tokenizer, example, loss_fn, eval_fn,
        _classification_metrics,
    )  # fmt: skip


def _classification_metrics(stats: dict) -> dict:
    confusion = np.asarray(stats["confusion"], np.float64)
    true_positive = np.diag(confusion)
    precision = true_positive / np.maximum(confusion.sum(0), 1e-12)
    recall = true_positive / np.maximum(confusion.sum(1), 1e-12)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return {
        "eval_loss": float(stats["loss_sum"] / stats["count"]),
        "eval_accuracy": float(true_positive.sum() / confusion.sum()),
        "eval_macro_f1": float(f1.mean()),
    }


def _causal_lm(module, params, model_config, tokenizer) -> Task:
    example = (jnp.zeros((1, 8), jnp.int32),)

    def token_losses(model, batch):
        logits = model(batch["input_ids"], batch["attention_mask"])
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
        return losses, batch["loss_mask"].astype(jnp.float32)

    def loss_fn(model, batch, rng):
        del rng
        losses, mask = token_losses(model, batch)
        return (losses * mask).sum() / jnp.maximum(mask.sum(), 1.0), {"tokens": mask.sum()}

    def eval_fn(model, batch):
        losses, mask = token_losses(model, batch)
        mask = mask * batch["weights"][:, None]
        return {"loss_sum": (losses * mask).sum(), "count": mask.sum()}

    def summarize(stats):
        loss = float(stats["loss_sum"] / stats["count"])
        return {"eval_loss": loss, "eval_perplexity": float(np.exp(min(loss, 50.0)))}

    eos = tuple(getattr(model_config, "eos_token_ids", ()) or ())
    pad = getattr(model_config, "pad_token_id", None)
    data_kwargs = {"eos_id": eos[0] if eos else None, "pad_id": pad if pad is not None else None}
    return Task(
        "causal_lm", module, params, model_config, tokenizer, example, loss_fn, eval_fn, summarize,
        data_kwargs,
    )  # fmt: skip


def _check_same_shapes(expected: PyTree, loaded: PyTree) -> None:
    shapes = lambda tree: jax.tree.map(lambda x: tuple(x.shape), tree)
    if shapes(expected) != shapes(loaded):
        raise ValueError(
            "the pretrained encoder's parameters do not fit the classifier's encoder "
            f"({len(jax.tree.leaves(loaded))} loaded vs {len(jax.tree.leaves(expected))} expected)"
        )
