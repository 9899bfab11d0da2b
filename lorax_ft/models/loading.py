"""`load_pretrained`: a Hugging Face directory, a GGUF file or a preset name -> module + params.

Example:
    >>> module, params, cfg, tokenizer = load_pretrained(  # doctest: +SKIP
    ...     "/models/smollm2", dtype=jnp.bfloat16, scan_layers=True)
    >>> logits = module.apply({"params": params}, input_ids)  # doctest: +SKIP
"""

import dataclasses
import os
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer

from lorax_ft.models import presets
from lorax_ft.models.bert import BertForSequenceClassification
from lorax_ft.models.checkpoint import ModelFileError, SafetensorsDir, load_params, read_json
from lorax_ft.models.export import HEAD_CONFIG, HEAD_POOLINGS, HEAD_WEIGHTS
from lorax_ft.models.families import BERT, family_for_model_type
from lorax_ft.models.gguf_llama import GGUF_MAGIC, load_gguf


def load_pretrained(
    name_or_path: str,
    dtype: Any = jnp.float32,
    shardings: Any = None,
    read_weights: bool = True,
    gguf_blocks: bool = False,
    **overrides: Any,
) -> tuple[Any, Any, Any, Tokenizer | None]:
    """Loads a model from a HF directory (config.json + safetensors), a GGUF file or a preset name.

    Args:
      name_or_path: a directory holding config.json and model.safetensors (or a sharded
        model.safetensors.index.json), a llama-architecture .gguf file, or a name in
        `presets.PRESETS`. A BERT directory with classifier.json/classifier.safetensors (what
        `save_pretrained` writes for a "mean"/"cls"-pooled classifier) loads as that
        classifier.
      dtype: computation dtype and, unless `param_dtype=` is given in `overrides`, parameter
        dtype (e.g. `dtype=jnp.bfloat16, param_dtype=jnp.float32` keeps float32 weights).
      shardings: optional pytree of `jax.sharding.Sharding` shaped like the params (see
        `abstract.logical_axes`), or a function `module -> that pytree`; each tensor is placed
        as it is read, so the whole model never sits on one device.
      read_weights: False reads no tensor and returns the params as `jax.ShapeDtypeStruct`s
        (with their shardings): the model's shapes, for planning memory.
      gguf_blocks: a GGUF file's Q4_0/Q4_1/Q8_0 linear kernels load as
        `lorax_ft.quant.QuantizedKernel`s of the file's own blocks (`model.quantize='gguf'`);
        other tensors and the embedding table load as float (see `gguf_llama.load_gguf`).
      **overrides: runtime config fields, e.g. `scan_layers=True`, `remat="full"`.

    Returns:
      `(module, params, config, tokenizer)`: apply with `module.apply({"params": params}, ...)`;
      tokenizer is a `tokenizers.Tokenizer` from tokenizer.json, or None when there is none.

    Raises:
      FileNotFoundError: the path, config.json or the weights are missing.
      ModelFileError: a damaged file (named), a tensor missing or with a shape that disagrees
        with the config, `gguf_blocks=True` for a source that is not a GGUF file.
      ValueError: unknown model_type or unsupported option.
    """
    overrides = {"dtype": dtype, "param_dtype": dtype, **overrides}
    kwargs = {"shardings": shardings, "read_weights": read_weights, **overrides}
    path = presets.preset_path(name_or_path) if name_or_path in presets.PRESETS else name_or_path
    not_gguf = f"model.quantize='gguf' needs a .gguf file; {path} is not one"
    if os.path.isdir(path):
        if gguf_blocks:
            raise ModelFileError(not_gguf)
        return load_hf_directory(path, **kwargs)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is neither a model directory, a GGUF file nor a preset name "
            f"({', '.join(sorted(presets.PRESETS))})"
        )
    with open(path, "rb") as f:
        if f.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
            if gguf_blocks:
                raise ModelFileError(not_gguf)
            raise ModelFileError(
                f"{path} is a file but not a GGUF file; give a .gguf file or a Hugging Face "
                "model directory (config.json + safetensors)"
            )
    return load_gguf(path, gguf_blocks=gguf_blocks, **kwargs)


def load_hf_directory(
    directory: str, shardings: Any = None, read_weights: bool = True, **overrides: Any
):
    """`load_pretrained` for a directory; `overrides` are config fields (dtype included)."""
    config_path = os.path.join(directory, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"missing {config_path}")
    hf = read_json(config_path)
    family = family_for_model_type(hf.get("model_type"))
    store = SafetensorsDir(directory)
    head = read_classifier_head(directory)
    if head is not None:
        _check_head_directory(directory, hf, family, store, head, overrides)
        store = _WithHead(store, head)
    if family is BERT and not any("pooler" in k.split(".") for k in store.file_of):
        # config.json does not record add_pooling_layer; the checkpoint's tensors do.
        overrides = {"add_pooling_layer": False, **overrides}
    cfg = family.from_hf(hf, **overrides)
    if head is None:
        module = family.build(cfg, hf)
    else:
        cfg = dataclasses.replace(cfg, num_labels=head.num_labels, classifier_pooling=head.pooling)
        module = BertForSequenceClassification(cfg)
    params = load_params(store, module, family, cfg, shardings, read_weights)
    tokenizer_path = os.path.join(directory, "tokenizer.json")
    tokenizer = Tokenizer.from_file(tokenizer_path) if os.path.exists(tokenizer_path) else None
    return module, params, cfg, tokenizer


@dataclasses.dataclass(frozen=True)
class ClassifierHead:
    """A classifier head stored beside an encoder (classifier.json + classifier.safetensors).

    Attributes:
      pooling: "mean" or "cls" (`BertConfig.classifier_pooling`).
      num_labels: outputs.
      weight: (num_labels, hidden), HF layout (the lorax kernel transposed).
      bias: (num_labels,).
      weights_file: the classifier.safetensors it was read from.
    """

    pooling: str
    num_labels: int
    weight: np.ndarray
    bias: np.ndarray
    weights_file: str


def read_classifier_head(directory: str) -> ClassifierHead | None:
    """The head `export.write_classifier_head` wrote in `directory`, or None if there is none.

    Raises:
      ModelFileError: one of the two files without the other, a damaged or unknown form
        (another pooling, other tensors, shapes that disagree with num_labels).
    """
    config_file = os.path.join(directory, HEAD_CONFIG)
    weights_file = os.path.join(directory, HEAD_WEIGHTS)
    if not os.path.exists(config_file):
        if os.path.exists(weights_file):
            raise ModelFileError(f"{directory}: has {HEAD_WEIGHTS} but no {HEAD_CONFIG}")
        return None
    if not os.path.exists(weights_file):
        raise ModelFileError(f"{directory}: has {HEAD_CONFIG} but no {HEAD_WEIGHTS}")
    head = read_json(config_file)
    if not isinstance(head, dict) or head.get("pooling") not in HEAD_POOLINGS:
        pooling = head.get("pooling") if isinstance(head, dict) else None
        raise ModelFileError(
            f"{config_file}: pooling {pooling!r}, lorax_ft reads {' or '.join(HEAD_POOLINGS)}"
        )
    num_labels = head.get("num_labels")
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise ModelFileError(f"{config_file}: num_labels {num_labels!r} is not a positive int")
    try:
        with safe_open(weights_file, framework="numpy") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise ModelFileError(f"{weights_file} is not a readable safetensors file ({e})") from e
    if sorted(tensors) != ["bias", "weight"]:
        raise ModelFileError(
            f"{weights_file}: tensors {sorted(tensors)}, a classifier head is 'weight' and 'bias'"
        )
    weight, bias = tensors["weight"], tensors["bias"]
    if weight.ndim != 2 or weight.shape[0] != num_labels or bias.shape != (num_labels,):
        raise ModelFileError(
            f"{weights_file}: weight {weight.shape} and bias {bias.shape} do not fit "
            f"num_labels={num_labels} ((num_labels, hidden) and (num_labels,))"
        )
    return ClassifierHead(head["pooling"], num_labels, weight, bias, weights_file)


def _check_head_directory(directory, hf, family, store, head, overrides) -> None:
    """A head beside an encoder: the directory must hold nothing that contradicts it."""
    archs = hf.get("architectures") or []
    if family is not BERT or archs not in ([], ["BertModel"]):
        raise ModelFileError(
            f"{directory}: {HEAD_CONFIG} is a head for a BERT encoder, but config.json "
            f"describes {archs or hf.get('model_type')}; remove one of them"
        )
    if any(k.split(".")[0] == "classifier" for k in store.file_of):
        raise ModelFileError(
            f"{directory}: both the checkpoint and {HEAD_WEIGHTS} hold a classifier; remove one"
        )
    pooling = overrides.get("classifier_pooling", head.pooling)
    if pooling != head.pooling:
        raise ValueError(
            f"{directory}: classifier_pooling={pooling!r}, but its head was trained on "
            f"{head.pooling!r} pooling ({HEAD_CONFIG})"
        )


class _WithHead:
    """A checkpoint store plus the head's tensors, named as the classifier's own (`classifier.*`)."""

    def __init__(self, store: Any, head: ClassifierHead):
        self._store = store
        self._head = {"classifier.weight": head.weight, "classifier.bias": head.bias}
        self.name = store.name
        self.file_of = {**store.file_of, **dict.fromkeys(self._head, head.weights_file)}

    def get(self, key: str) -> np.ndarray:
        return self._head[key] if key in self._head else self._store.get(key)
