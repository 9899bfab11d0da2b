"""Parameter shapes and logical axis names of a model, computed without allocating parameters.

Use these to build shardings before any weight exists:

Example:
    >>> specs = logical_axes(module)            # pytree of PartitionSpec('embed', 'heads'), ...
    >>> shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    >>> module, params, cfg, tok = load_pretrained(path, shardings=shardings)
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def _boxed_variables(module: nn.Module) -> Any:
    dummy = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: module.init(jax.random.key(0), dummy))


def abstract_params(module: nn.Module) -> Any:
    """`jax.ShapeDtypeStruct` pytree of the module's parameters (the `params` collection)."""
    return nn.unbox(_boxed_variables(module))["params"]


def logical_axes(module: nn.Module) -> Any:
    """`PartitionSpec` pytree of logical axis names, shaped like `abstract_params(module)`."""
    return nn.get_partition_spec(_boxed_variables(module))["params"]
