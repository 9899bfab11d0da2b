"""LoRA target presets: regexes over `/`-joined parameter paths, as plain data.

Each pattern is anchored (`^...$`) and matches 2-D Dense kernels only, in looped (`layers_3`) and
scanned (`layers`) stacks alike, with any path prefix (so `bert/...` under a classifier works).
No preset touches embeddings, norms, biases, the LM head, the pooler or a classifier.
GPT-2 fuses q, k and v into one `c_attn` kernel, so its "attention-qv" adapts `c_attn` (the
usual PEFT choice for GPT-2).

Example:
    >>> patterns = lora_targets("llama", "attention-qv")
    >>> is_target("model/layers_0/self_attn/q_proj/kernel", patterns)
    True
"""

from typing import Any

from lorax_ft.models.families import MODEL_TYPES, family_for_config
from lorax_ft.transform.rules import Rules


def _under(stack: str, body: str) -> str:
    return rf"^(.*/)?{stack}(_\d+)?/{body}/kernel$"


LORA_TARGETS: dict[str, dict[str, tuple[str, ...]]] = {
    "llama": {
        "attention-qv": (_under("layers", "self_attn/(q_proj|v_proj)"),),
        "attention-all": (_under("layers", "self_attn/(q_proj|k_proj|v_proj|o_proj)"),),
        "all-linear": (
            _under("layers", "self_attn/(q_proj|k_proj|v_proj|o_proj)"),
            _under("layers", "mlp/(gate_proj|up_proj|down_proj)"),
        ),
    },
    "gpt2": {
        "attention-qv": (_under("h", "attn/c_attn"),),
        "attention-all": (_under("h", "attn/(c_attn|c_proj)"),),
        "all-linear": (_under("h", "attn/(c_attn|c_proj)"), _under("h", "mlp/(c_fc|c_proj)")),
    },
    "bert": {
        "attention-qv": (_under("layer", "attention/self/(query|value)"),),
        "attention-all": (
            _under("layer", "attention/self/(query|key|value)"),
            _under("layer", "attention/output/dense"),
        ),
        "all-linear": (
            _under("layer", "attention/self/(query|key|value)"),
            _under("layer", "attention/output/dense"),
            _under("layer", "(intermediate|output)/dense"),
        ),
    },
}


def lora_targets(family: str | Any, preset: str) -> tuple[str, ...]:
    """Regexes selecting the kernels a LoRA preset adapts.

    Args:
      family: "llama", "gpt2", "bert", a HF model_type ("qwen2", "mistral", ...) or a model config.
      preset: "attention-qv", "attention-all" or "all-linear".

    Returns:
      Anchored patterns; a path is a target when any of them matches it.
    """
    if not isinstance(family, str):
        family = family_for_config(family).name
    family = MODEL_TYPES[family].name if family in MODEL_TYPES else family
    if family not in LORA_TARGETS:
        raise ValueError(f"unknown model family {family!r}; valid: {sorted(LORA_TARGETS)}")
    presets = LORA_TARGETS[family]
    if preset not in presets:
        raise ValueError(f"unknown LoRA preset {preset!r}; valid: {sorted(presets)}")
    return presets[preset]


def is_target(path: str, patterns: tuple[str, ...]) -> bool:
    """Whether the `/`-joined parameter path matches any of `patterns` (fully, as every rule)."""
    return Rules([(p, True) for p in patterns], what="LoRA targets").index(path) is not None
