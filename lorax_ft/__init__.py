"""lorax_ft: fine-tuning for JAX/Flax models, fully or with LoRA, as pure pytree transforms."""

from lorax_ft import quant
from lorax_ft.parallel import mesh, sharded_step, sharding
from lorax_ft.quant import QuantizedKernel
from lorax_ft.training import optim
from lorax_ft.training.train_step import TrainState, init_state, make_train_step
from lorax_ft.transform import lora, partition, paths
from lorax_ft.transform.adapt import Adapted, adapt
from lorax_ft.transform.combine import combine_adapters
from lorax_ft.transform.factored import factored, infer_layouts, model_state, nnx_params
from lorax_ft.transform.lora import Factors, KernelLayout
from lorax_ft.transform.mixed import MixedFactors, mixed_adapters
from lorax_ft.transform.partition import combine, split, variable_labels
from lorax_ft.transform.spec import FULL_FINETUNE, Freeze, LoRA, Spec, SpecError, Train

__all__ = [
    "FULL_FINETUNE",
    "Adapted",
    "Factors",
    "Freeze",
    "KernelLayout",
    "LoRA",
    "MixedFactors",
    "QuantizedKernel",
    "Spec",
    "SpecError",
    "Train",
    "TrainState",
    "adapt",
    "combine",
    "combine_adapters",
    "factored",
    "infer_layouts",
    "init_state",
    "lora",
    "make_train_step",
    "mesh",
    "mixed_adapters",
    "model_state",
    "nnx_params",
    "optim",
    "partition",
    "paths",
    "quant",
    "sharded_step",
    "sharding",
    "split",
    "variable_labels",
]
