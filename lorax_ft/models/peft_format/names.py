"""PEFT's names and matching rules for lorax_ft's models: which HF module holds which leaf.

PEFT names a module by its dotted path in the transformers model (`model.layers.0.self_attn.q_proj`)
and selects modules with the config's `target_modules` / `modules_to_save` / patterns; these are
its rules (peft/tuners/tuners_utils.py, peft/utils/other.py) for configs lorax_ft writes and reads.

>>> is_targeted({"target_modules": ["q_proj"]}, "model.layers.0.self_attn.q_proj")
True
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Any

from lorax_ft.errors import UserError
from lorax_ft.models import checkpoint
from lorax_ft.models.families import Family, family_for_config

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's LoraModel wrapping the HF model
WEIGHTS = ("kernel", "embedding")


class PeftFormatError(UserError, ValueError):
    """A PEFT adapter that cannot be written or read exactly; the message names the file/key."""


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    """What the adapter config says about one adapted kernel."""

    rank: int
    alpha: float
    rslora: bool = False
    dora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


@dataclasses.dataclass
class Module:
    """One HF module of the model: its leaves as (lorax path, layer) by HF leaf name."""

    leaves: dict[str, tuple[str, int | None]] = dataclasses.field(default_factory=dict)
    weight: tuple[str, int | None] | None = None  # the kernel/embedding LoRA would adapt
    embedding: bool = False


def modules(flat: dict, family: Family, cfg: Any) -> dict[str, Module]:
    """`{HF module name: Module}` of a flat params dict (a scanned stack: one per layer)."""
    out: dict[str, Module] = collections.defaultdict(Module)
    for path, leaf in flat.items():
        parts = tuple(path.split("/"))
        stacked = checkpoint.is_stacked(parts, family, cfg)
        for layer in range(leaf.shape[0]) if stacked else [None]:
            module = out[checkpoint.hf_module_name(parts, family, layer)]
            for name in checkpoint.hf_leaf_names(parts[-1]):
                module.leaves.setdefault(name, (path, layer))
            if parts[-1] in WEIGHTS:
                module.weight, module.embedding = (path, layer), parts[-1] == "embedding"
    return dict(out)


def all_module_names(names) -> set[str]:
    """The modules and all their parents, as PEFT's `named_modules` lists them."""
    parts = (n.split(".") for n in names)
    return {".".join(p[:i]) for p in parts for i in range(1, len(p) + 1)}


def tied_table(module: Any) -> str | None:
    """The embedding table that is also the LM head: PEFT adapts only its lookup."""
    cfg = module.config
    if family_for_config(cfg).name == "gpt2":
        return "transformer/wte/embedding"
    if getattr(cfg, "tie_word_embeddings", False):
        return "model/embed_tokens/embedding"
    return None


def is_targeted(config: dict, key: str) -> bool:
    """`check_target_module_exists` for a config without layers_to_transform."""
    excluded = config.get("exclude_modules")
    if isinstance(excluded, str) and re.fullmatch(excluded, key):
        return False
    if isinstance(excluded, list) and any(key == e or key.endswith(f".{e}") for e in excluded):
        return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in config.get("modules_to_save") or []):
        return False
    targets = config.get("target_modules")
    if isinstance(targets, str):
        if targets == "all-linear":
            return True  # callers ask only about linear kernels other than the LM head
        return re.fullmatch(targets, key) is not None
    targets = targets or []
    return key in targets or any(key.endswith(f".{t}") for t in targets)


def pattern(patterns: dict, key: str, default: Any) -> Any:
    """`get_pattern_key`: the first pattern that matches a dotted suffix of `key`."""
    for regex, value in patterns.items():
        if re.match(rf"(.*\.)?({regex})$", key):
            return value
    return default


def saved_whole(config: dict, key: str) -> bool:
    """`_set_trainable`'s test for `modules_to_save` (a plain `endswith`)."""
    return any(key.endswith(m) for m in config.get("modules_to_save") or [])
