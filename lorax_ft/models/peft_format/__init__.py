"""Hugging Face PEFT LoRA adapters (`adapter_config.json` + `adapter_model.safetensors`), both ways.

`save_peft` writes what PEFT's `save_pretrained` writes for the same adapters, so
`peft.PeftModel.from_pretrained(hf_model, directory)` computes lorax_ft's factored forward;
`load_peft` reads such a directory back into `Factors` in lorax layout. What PEFT would compute
differently from lorax_ft is a `PeftFormatError` naming the file or key.

Example:
    >>> save_peft("/tmp/adapter", module, params, adapters)      # doctest: +SKIP
    >>> loaded = load_peft("/tmp/adapter", module, params)        # doctest: +SKIP
    >>> logits = factored(module)(params, loaded.adapters, ids)   # doctest: +SKIP
"""

from lorax_ft.models.peft_format.load import LoadedAdapters, load_peft
from lorax_ft.models.peft_format.names import AdapterInfo, PeftFormatError
from lorax_ft.models.peft_format.save import save_peft

__all__ = ["AdapterInfo", "LoadedAdapters", "PeftFormatError", "load_peft", "save_peft"]
