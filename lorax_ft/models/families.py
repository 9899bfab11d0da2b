"""The supported model families: how each one is built, configured and named in checkpoints.

Example:
    >>> family_for_model_type("qwen2").name
    'llama'
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn

from lorax_ft.models import hf_config
from lorax_ft.models.bert import BertConfig, BertForSequenceClassification, BertModel
from lorax_ft.models.gpt2 import Gpt2Config, Gpt2LMHeadModel
from lorax_ft.models.llama import LlamaConfig, LlamaForCausalLM


@dataclasses.dataclass(frozen=True)
class Family:
    """Everything the loader and exporter need to know about one architecture.

    Attributes:
      name: "llama", "gpt2" or "bert".
      config_cls: the config dataclass.
      stack_name: name of the layer stack (`layers_N` / `h_N` / `layer_N`, or scanned `layers`...).
      base_prefixes: first path components HF may or may not put in front of base-model tensors.
      transpose_kernels: HF stores `nn.Linear` weights `(out, in)`; GPT-2's Conv1D is already `(in, out)`.
      from_hf: config.json dict (+ runtime overrides) -> config.
      to_hf: (config, module) -> config.json dict.
      build: (config, config.json dict) -> module, picking the head from `architectures`.
    """

    name: str
    config_cls: type
    stack_name: str
    base_prefixes: tuple[str, ...]
    transpose_kernels: bool
    from_hf: Callable[..., Any]
    to_hf: Callable[[Any, nn.Module], dict]
    build: Callable[[Any, dict], nn.Module]


def _bert_module(cfg: BertConfig, hf: dict) -> nn.Module:
    archs = hf.get("architectures") or []
    if "BertForSequenceClassification" in archs:
        return BertForSequenceClassification(cfg)
    return BertModel(cfg)


LLAMA = Family(
    name="llama",
    config_cls=LlamaConfig,
    stack_name="layers",
    base_prefixes=("model",),
    transpose_kernels=True,
    from_hf=hf_config.llama_from_hf,
    to_hf=lambda cfg, module: hf_config.llama_to_hf(cfg),
    build=lambda cfg, hf: LlamaForCausalLM(cfg),
)
GPT2 = Family(
    name="gpt2",
    config_cls=Gpt2Config,
    stack_name="h",
    base_prefixes=("transformer",),
    transpose_kernels=False,
    from_hf=hf_config.gpt2_from_hf,
    to_hf=lambda cfg, module: hf_config.gpt2_to_hf(cfg),
    build=lambda cfg, hf: Gpt2LMHeadModel(cfg),
)
BERT = Family(
    name="bert",
    config_cls=BertConfig,
    stack_name="layer",
    base_prefixes=("bert",),
    transpose_kernels=True,
    from_hf=hf_config.bert_from_hf,
    to_hf=lambda cfg, module: hf_config.bert_to_hf(
        cfg, classifier=isinstance(module, BertForSequenceClassification)
    ),
    build=_bert_module,
)

MODEL_TYPES = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "gpt2": GPT2, "bert": BERT}


def family_for_model_type(model_type: str) -> Family:
    """The family of a config.json `model_type`; a one-line error names the valid ones."""
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"unknown model_type {model_type!r}; valid: {', '.join(sorted(MODEL_TYPES))}"
        )
    return MODEL_TYPES[model_type]


def family_for_config(cfg: Any) -> Family:
    """The family whose config class `cfg` is."""
    for family in (LLAMA, GPT2, BERT):
        if isinstance(cfg, family.config_cls):
            return family
    raise TypeError(f"not a model config: {type(cfg).__name__}")
