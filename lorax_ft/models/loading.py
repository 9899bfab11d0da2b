"""`load_pretrained`: a Hugging Face directory, a GGUF file or a preset name -> module + params.

Example:
    >>> module, params, cfg, tokenizer = load_pretrained("/models/smollm2", dtype=jnp.bfloat16,
    ...                                                  scan_layers=True)
    >>> logits = module.apply({"params": params}, input_ids)
"""

import os
from typing import Any

import jax.numpy as jnp
from tokenizers import Tokenizer

from lorax_ft.models import presets
from lorax_ft.models.checkpoint import ModelFileError, SafetensorsDir, load_params, read_json
from lorax_ft.models.families import BERT, family_for_model_type
from lorax_ft.models.gguf_llama import GGUF_MAGIC, load_gguf


def load_pretrained(
    name_or_path: str,
    dtype: Any = jnp.float32,
    shardings: Any = None,
    read_weights: bool = True,
    **overrides: Any,
) -> tuple[Any, Any, Any, Tokenizer | None]:
    """Loads a model from a HF directory (config.json + safetensors), a GGUF file or a preset name.

    Args:
      name_or_path: a directory holding config.json and model.safetensors (or a sharded
        model.safetensors.index.json), a llama-architecture .gguf file, or a name in
        `presets.PRESETS`.
      dtype: computation dtype and, unless `param_dtype=` is given in `overrides`, parameter
        dtype (e.g. `dtype=jnp.bfloat16, param_dtype=jnp.float32` keeps float32 weights).
      shardings: optional pytree of `jax.sharding.Sharding` shaped like the params (see
        `abstract.logical_axes`), or a function `module -> that pytree`; each tensor is placed
        as it is read, so the whole model never sits on one device.
      read_weights: False reads no tensor and returns the params as `jax.ShapeDtypeStruct`s
        (with their shardings): the model's shapes, for planning memory.
      **overrides: runtime config fields, e.g. `scan_layers=True`, `remat="full"`.

    Returns:
      `(module, params, config, tokenizer)`: apply with `module.apply({"params": params}, ...)`;
      tokenizer is a `tokenizers.Tokenizer` from tokenizer.json, or None when there is none.

    Raises:
      FileNotFoundError: the path, config.json or the weights are missing.
      ModelFileError: a damaged file (named), a tensor missing or with a shape that disagrees
        with the config.
      ValueError: unknown model_type or unsupported option.
    """
    overrides = {"dtype": dtype, "param_dtype": dtype, **overrides}
    kwargs = {"shardings": shardings, "read_weights": read_weights, **overrides}
    path = presets.preset_path(name_or_path) if name_or_path in presets.PRESETS else name_or_path
    if os.path.isdir(path):
        return load_hf_directory(path, **kwargs)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is neither a model directory, a GGUF file nor a preset name "
            f"({', '.join(sorted(presets.PRESETS))})"
        )
    with open(path, "rb") as f:
        if f.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
            raise ModelFileError(
                f"{path} is a file but not a GGUF file; give a .gguf file or a Hugging Face "
                "model directory (config.json + safetensors)"
            )
    return load_gguf(path, **kwargs)


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
    if family is BERT and not any("pooler" in k.split(".") for k in store.file_of):
        # config.json does not record add_pooling_layer; the checkpoint's tensors do.
        overrides = {"add_pooling_layer": False, **overrides}
    cfg = family.from_hf(hf, **overrides)
    module = family.build(cfg, hf)
    params = load_params(store, module, family, cfg, shardings, read_weights)
    tokenizer_path = os.path.join(directory, "tokenizer.json")
    tokenizer = Tokenizer.from_file(tokenizer_path) if os.path.exists(tokenizer_path) else None
    return module, params, cfg, tokenizer
