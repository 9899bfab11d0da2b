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

from lorax_ft.models import BertForSequenceClassification, abstract_params, load_pretrained
from lorax_ft.models.generate import max_positions
from lorax_ft.run.config import ConfigError

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


def build(config, num_labels: int | None = None, *, place=None, read_weights: bool = True) -> Task:
    """The task a config describes (`num_labels` is needed for classification).

    Args:
      config: the experiment config.
      num_labels: classes, for classification.
      place: optional `module -> shardings of its params` (e.g. from logical axes on a mesh);
        weights are read straight into those shardings and a new head is created in them.
      read_weights: False builds the task with `jax.ShapeDtypeStruct` params (shapes and
        shardings only, nothing read or allocated), for planning.

    Raises:
      ConfigError: `data.max_length` (or, for a causal LM, `train.max_new_tokens`) beyond the
        model's positions; too few labels.
    """
    model = config.model
    overrides = {
        "dtype": _DTYPES[model.dtype],
        "param_dtype": _DTYPES[model.param_dtype],
        "scan_layers": model.scan_layers,
        "remat": model.remat,
    }
    source = model.preset or model.path
    if model.task == "causal_lm":
        if model.quantize == "gguf":  # the file's quantized blocks as they are stored
            overrides["gguf_blocks"] = True
        module, params, model_config, tokenizer = load_pretrained(
            source, shardings=place, read_weights=read_weights, **overrides
        )
        check_lengths(config, model_config)
        return _causal_lm(module, params, model_config, tokenizer)
    if num_labels is None or num_labels < 2:
        raise ConfigError(f"classification needs at least 2 labels, the data has {num_labels}")
    _, _, encoder_config, _ = load_pretrained(source, read_weights=False, **overrides)
    check_lengths(config, encoder_config)
    model_config = dataclasses.replace(
        encoder_config,
        num_labels=num_labels,
        classifier_pooling=model.classifier_pooling,
        classifier_dropout=model.classifier_dropout,
    )
    module = BertForSequenceClassification(model_config)
    placed = place(module) if place is not None else None

    def encoder_shardings(loaded):
        # The loaded checkpoint is an encoder, or a classifier with a head of its own.
        if placed is None:
            return None
        if isinstance(loaded, BertForSequenceClassification):
            return {**place(loaded), "bert": placed["bert"]}
        return placed["bert"]

    _, params, _, tokenizer = load_pretrained(
        source, shardings=encoder_shardings, read_weights=read_weights, **overrides
    )
    if "bert" in params and "classifier" in params:
        params = params["bert"]
    return _classification(config, module, params, model_config, tokenizer, placed, read_weights)


def check_lengths(config, model_config) -> None:
    """Refuses lengths past the model's positions: `data.max_length` (NaN or a huge allocation
    otherwise) and, for a causal LM, `train.max_new_tokens` (prompts need a position too)."""
    limit = max_positions(model_config)
    if limit is None:
        return
    model = config.model.preset or config.model.path
    length = config.data.max_length
    if length > limit:
        raise ConfigError(
            f"data.max_length={length} exceeds the {limit} positions of model {model!r}; use "
            f"data.max_length <= {limit}"
        )
    new_tokens = config.train.max_new_tokens
    if config.model.task == "causal_lm" and not 1 <= new_tokens < limit:
        raise ConfigError(
            f"train.max_new_tokens={new_tokens} must be in 1..{limit - 1}: model {model!r} takes "
            f"{limit} positions, the prompt included"
        )


def _classification(config, module, encoder, model_config, tokenizer, placed, read_weights):
    num_labels = model_config.num_labels
    example = (jnp.zeros((1, 8), jnp.int32),)
    shapes = abstract_params(module)
    _check_same_shapes(shapes["bert"], encoder)
    # A fresh head on the pretrained encoder: everything but the encoder from the model's init
    # (the unused encoder init is dead code to XLA), created in its shardings.
    head_shapes = {k: v for k, v in shapes.items() if k != "bert"}
    head_shardings = None if placed is None else {k: placed[k] for k in head_shapes}
    if read_weights:

        def init_head(key):
            fresh = nn.unbox(module.init(key, *example))["params"]
            return {k: v for k, v in fresh.items() if k != "bert"}

        head = jax.jit(init_head, out_shardings=head_shardings)(jax.random.key(config.train.seed))
    elif head_shardings is None:
        head = head_shapes
    else:
        head = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            head_shapes,
            head_shardings,
        )
    params = {**head, "bert": encoder}

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
