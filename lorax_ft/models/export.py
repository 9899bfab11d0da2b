"""Export parameters as a Hugging Face model directory (config.json + model.safetensors).

The result loads with `transformers.AutoModelForCausalLM.from_pretrained` (or `AutoModel` /
`BertForSequenceClassification` for BERT) and with `load_pretrained`.

Example:
    >>> save_pretrained("/tmp/out", module, params, tokenizer=tokenizer)
"""

import json
import os
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from lorax_ft.models.checkpoint import to_hf_tensors
from lorax_ft.models.families import family_for_config


def save_pretrained(
    directory: str,
    module: Any,
    params: Any,
    tokenizer: Any = None,
    dtype: Any = None,
) -> None:
    """Writes `module`/`params` as a HF directory.

    Args:
      directory: created if missing; existing config.json/model.safetensors are overwritten.
      module: a model from this package (its `config` decides the HF architecture).
      params: the parameter pytree (not the `{"params": ...}` variables dict), scanned or not.
      tokenizer: optional `tokenizers.Tokenizer`, saved as tokenizer.json.
      dtype: tensor dtype on disk (e.g. `jnp.bfloat16`); default: the parameters' own dtype.
    """
    cfg = module.config
    family = family_for_config(cfg)
    tensors = to_hf_tensors(params, family, cfg)
    if dtype is not None:
        tensors = {k: v.astype(dtype) for k, v in tensors.items()}
    hf = family.to_hf(cfg, module)
    hf["torch_dtype"] = str(np.dtype(next(iter(tensors.values())).dtype))
    os.makedirs(directory, exist_ok=True)
    # transformers refuses safetensors files whose metadata lacks the framework tag.
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    if tokenizer is not None:
        tokenizer.save(os.path.join(directory, "tokenizer.json"))
