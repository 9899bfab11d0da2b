"""Export parameters as a Hugging Face model directory (config.json + model.safetensors).

The result loads with `transformers.AutoModelForCausalLM.from_pretrained` (or `AutoModel` /
`BertForSequenceClassification` for BERT) and with `load_pretrained`.

transformers' `BertForSequenceClassification` always classifies the pooler output. A classifier
that pools otherwise (`classifier_pooling` "mean" or "cls") is written as the encoder, a
`BertModel`, with its head beside it: `classifier.safetensors` (`weight` (num_labels, hidden),
`bias`) and `classifier.json` (`pooling`, `num_labels`, and a `note` on how to apply them).
transformers ignores those two files; `load_pretrained` reads them back as the classifier.

Example:
    >>> save_pretrained("/tmp/out", module, params, tokenizer=tokenizer)  # doctest: +SKIP
"""

import json
import os
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from lorax_ft.models.bert import BertForSequenceClassification, BertModel
from lorax_ft.models.checkpoint import to_hf_tensors
from lorax_ft.models.families import family_for_config

HEAD_CONFIG = "classifier.json"
HEAD_WEIGHTS = "classifier.safetensors"
HEAD_POOLINGS = ("mean", "cls")
_HEAD_NOTES = {
    "mean": "logits = x @ weight.T + bias, where x is the mean of the encoder's "
    "last_hidden_state over the tokens whose attention_mask is 1.",
    "cls": "logits = x @ weight.T + bias, where x is the encoder's last_hidden_state at the "
    "first (CLS) token.",
}


def has_separate_head(module: Any) -> bool:
    """Whether `module`'s classifier cannot be transformers' (it pools other than "pooler")."""
    return (
        isinstance(module, BertForSequenceClassification)
        and module.config.classifier_pooling != "pooler"
    )


def remove_classifier_head(directory: str) -> None:
    """Removes classifier.json/classifier.safetensors, so a stale head is never read back."""
    for name in (HEAD_CONFIG, HEAD_WEIGHTS):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            os.remove(path)


def write_classifier_head(
    directory: str, config: Any, kernel: Any, bias: Any, dtype: Any = None
) -> dict:
    """Writes classifier.json and classifier.safetensors for a "mean"/"cls"-pooled head.

    Args:
      directory: an existing directory.
      config: the classifier's `BertConfig` (its pooling and number of labels).
      kernel: the head's kernel in lorax layout, (hidden, num_labels); written transposed.
      bias: (num_labels,).
      dtype: tensor dtype on disk; default: their own.

    Returns:
      The classifier.json written.
    """
    tensors = {
        "weight": np.ascontiguousarray(np.asarray(kernel).T),
        "bias": np.ascontiguousarray(np.asarray(bias)),
    }
    if dtype is not None:
        tensors = {k: v.astype(dtype) for k, v in tensors.items()}
    head = {
        "pooling": config.classifier_pooling,
        "num_labels": config.num_labels,
        "note": _HEAD_NOTES[config.classifier_pooling],
    }
    save_file(tensors, os.path.join(directory, HEAD_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(directory, HEAD_CONFIG), "w") as f:
        json.dump(head, f, indent=2)
    return head


def save_pretrained(
    directory: str,
    module: Any,
    params: Any,
    tokenizer: Any = None,
    dtype: Any = None,
) -> None:
    """Writes `module`/`params` as a HF directory.

    Args:
      directory: created if missing; existing config.json/model.safetensors are overwritten
        (and a stale model.safetensors.index.json or classifier head removed).
      module: a model from this package (its `config` decides the HF architecture); a BERT
        classifier with `classifier_pooling` "mean"/"cls" is written as a `BertModel` plus
        classifier.json/classifier.safetensors (see the module docstring).
      params: the parameter pytree (not the `{"params": ...}` variables dict), scanned or not.
      tokenizer: optional `tokenizers.Tokenizer`, saved as tokenizer.json.
      dtype: tensor dtype on disk (e.g. `jnp.bfloat16`); default: the parameters' own dtype.
    """
    cfg = module.config
    family = family_for_config(cfg)
    head = None
    if has_separate_head(module):
        head = params["classifier"]
        module, params = BertModel(cfg), params["bert"]
    tensors = to_hf_tensors(params, family, cfg)
    if dtype is not None:
        tensors = {k: v.astype(dtype) for k, v in tensors.items()}
    hf = family.to_hf(cfg, module)
    hf["torch_dtype"] = str(np.dtype(next(iter(tensors.values())).dtype))
    os.makedirs(directory, exist_ok=True)
    # A stale index would be read instead of the model.safetensors written here.
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        os.remove(index)
    # transformers refuses safetensors files whose metadata lacks the framework tag.
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    if head is None:
        remove_classifier_head(directory)
    else:
        write_classifier_head(directory, cfg, head["kernel"], head["bias"], dtype)
    if tokenizer is not None:
        tokenizer.save(os.path.join(directory, "tokenizer.json"))
