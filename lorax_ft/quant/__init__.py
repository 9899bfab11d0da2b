"""A quantized frozen base (QLoRA): int8, NF4 and GGUF blocks as pytree leaves.

`kernel` (the data type) is imported eagerly: `lorax_ft.transform.paths` needs it to name a
quantized kernel as one leaf. The functions that quantize read the transform package in turn,
so they are imported on first use (PEP 562) to keep that cycle out of import time.
"""

import importlib

from lorax_ft.quant.kernel import FORMATS, QuantizedKernel, is_quantized

_LAZY = {
    "METHODS": "methods",
    "QuantizeError": "methods",
    "bytes_per_param": "methods",
    "dequantize": "methods",
    "quantize": "methods",
    "quantize_kernel": "methods",
    "quantized_paths": "methods",
    "block_format": "gguf",
    "kernel_from_gguf": "gguf",
}

__all__ = ["FORMATS", "QuantizedKernel", "is_quantized", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"lorax_ft.quant.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'lorax_ft.quant' has no attribute {name!r}")
