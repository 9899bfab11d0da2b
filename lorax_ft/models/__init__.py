"""Model zoo: Llama-family decoders, GPT-2, BERT; Hugging Face loading/export; generation."""

from lorax_ft.models.abstract import abstract_params, logical_axes
from lorax_ft.models.attention import RopeConfig
from lorax_ft.models.bert import BertConfig, BertForSequenceClassification, BertModel, EncoderOutput
from lorax_ft.models.export import save_pretrained
from lorax_ft.models.generate import Sampling, generate, left_pad
from lorax_ft.models.gpt2 import Gpt2Config, Gpt2LMHeadModel
from lorax_ft.models.llama import LlamaConfig, LlamaForCausalLM
from lorax_ft.models.loading import load_pretrained
from lorax_ft.models.lora_targets import LORA_TARGETS, is_target, lora_targets
from lorax_ft.models.peft_format import LoadedAdapters, PeftFormatError, load_peft, save_peft
from lorax_ft.models.presets import PRESETS
from lorax_ft.models.stack import stack_layers, unstack_layers

__all__ = [
    "LORA_TARGETS",
    "PRESETS",
    "BertConfig",
    "BertForSequenceClassification",
    "BertModel",
    "EncoderOutput",
    "Gpt2Config",
    "Gpt2LMHeadModel",
    "LlamaConfig",
    "LlamaForCausalLM",
    "LoadedAdapters",
    "PeftFormatError",
    "RopeConfig",
    "Sampling",
    "abstract_params",
    "generate",
    "is_target",
    "left_pad",
    "load_peft",
    "load_pretrained",
    "logical_axes",
    "lora_targets",
    "save_peft",
    "save_pretrained",
    "stack_layers",
    "unstack_layers",
]
