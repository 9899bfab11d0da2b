"""Parameter-carrying building blocks shared by the model families.

Every parameter is created through `nn.with_logical_partitioning`, so `nn.get_partition_spec` on the
initialised (boxed) variables yields logical axis names that a mesh rule table maps to devices. The
names used across the zoo:

    vocab   token vocabulary            embed   model width (d_model)
    heads   query heads x head_dim      kv      key/value heads x head_dim
    mlp     feed-forward width          layers  stacked layer axis (scan_layers=True only)
    labels  classifier outputs          None    never sharded (positions, token types)

Dense kernels are always 2-D `(in, out)`, i.e. a Hugging Face `nn.Linear.weight` transposed, so that a
LoRA adapter sees one plain matrix per projection.

Example:
    >>> proj = dense(64, ("embed", "heads"), name="q_proj", dtype=jnp.float32)
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

REMAT_POLICIES = {
    # "full" saves nothing and recomputes the whole layer in the backward pass.
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "nothing": jax.checkpoint_policies.nothing_saveable,
}


def dense(
    features: int,
    axes: Sequence[str | None],
    *,
    name: str,
    use_bias: bool = False,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    init_std: float = 0.02,
) -> nn.Dense:
    """A `nn.Dense` whose kernel `(in, out)` and bias `(out,)` carry logical axis names.

    Args:
      features: output width.
      axes: logical names of the kernel's (input, output) axes.
      name: submodule name; becomes a component of the parameter path.
      use_bias: whether the projection has a bias.
      dtype: computation dtype.
      param_dtype: parameter dtype.
      init_std: standard deviation of the normal kernel initialiser (HF `initializer_range`).

    Returns:
      An unbound `nn.Dense`.

    Example:
      >>> dense(128, ("embed", "mlp"), name="up_proj")
    """
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(init_std), tuple(axes)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[-1],)),
        name=name,
    )


def embed(
    num: int,
    features: int,
    axes: Sequence[str | None],
    *,
    name: str,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    init_std: float = 0.02,
) -> nn.Embed:
    """A `nn.Embed` table `(num, features)` with logical axis names, e.g. `("vocab", "embed")`."""
    return nn.Embed(
        num,
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(init_std), tuple(axes)),
        name=name,
    )


def rms_norm(eps: float, *, name: str, dtype: Dtype, param_dtype: Dtype) -> nn.RMSNorm:
    """RMSNorm with a `("embed",)` scale; statistics are reduced in float32 like HF's LlamaRMSNorm."""
    return nn.RMSNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        name=name,
    )


def layer_norm(eps: float, *, name: str, dtype: Dtype, param_dtype: Dtype) -> nn.LayerNorm:
    """LayerNorm with `("embed",)` scale and bias (GPT-2, BERT)."""
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
        # Two-pass variance: the fast E[x^2]-E[x]^2 form loses digits that the 1e-4 parity needs.
        use_fast_variance=False,
        name=name,
    )


def activation(name: str):
    """The activation function a Hugging Face config names (`hidden_act` / `activation_function`)."""
    table = {
        "silu": jax.nn.silu,
        "swish": jax.nn.silu,
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
        "relu": jax.nn.relu,
    }
    if name not in table:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(table)}")
    return table[name]
