"""The device mesh: three named axes sized by a config section, and presets for common layouts.

`data` splits the batch only; `fsdp` splits the batch and the parameters (ZeRO-3); `tensor`
splits each layer's feature axes (Megatron). Sizes come from a config section such as the
`mesh` section of an experiment config, `{"data": -1, "fsdp": 1, "tensor": 1}`, where one axis
may be -1 to take the remaining devices.

>>> mesh = make_mesh(fsdp_tensor(tensor=2))   # doctest: +SKIP
>>> dict(mesh.shape)                          # doctest: +SKIP
{'data': 1, 'fsdp': 4, 'tensor': 2}
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
"""Mesh axes the leading (batch) dimension of batches and activations is split over."""


def data_parallel() -> ml_collections.ConfigDict:
    """Mesh preset: every device holds the whole model and a slice of the batch."""
    return ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})


def fsdp() -> ml_collections.ConfigDict:
    """Mesh preset: parameters and optimizer state split over all devices (ZeRO-3)."""
    return ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})


def fsdp_tensor(tensor: int) -> ml_collections.ConfigDict:
    """Mesh preset: `tensor`-way tensor parallelism inside FSDP over the remaining devices."""
    return ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": tensor})


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """`{axis: size}` of a mesh config section, with its one `-1` resolved.

    Raises:
      ValueError: an unknown axis, a size that is not a positive integer or -1, more than one
        -1, or sizes whose product is not the device count.
    """
    sizes = dict(mesh_config.items())
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh axes {unknown} are unknown; the axes are {MESH_AXES}")
    sizes = {axis: sizes.get(axis, 1) for axis in MESH_AXES}
    for axis, size in sizes.items():
        if not isinstance(size, int) or (size < 1 and size != -1):
            raise ValueError(f"mesh.{axis}={size!r} must be a positive integer or -1")
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"mesh axes {free} are all -1; at most one axis may take the rest")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free and num_devices % fixed == 0:
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        described = " × ".join(f"{axis}={size}" for axis, size in sizes.items())
        raise ValueError(
            f"mesh {described} does not fit the {num_devices} devices: the sizes must multiply "
            f"to {num_devices} (use -1 for one axis to take the rest)"
        )
    return sizes


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
    """A `(data, fsdp, tensor)` mesh over `devices` (default: all), with Auto axis types.

    Args:
      mesh_config: sizes of `data`, `fsdp` and `tensor` (missing ones are 1, one may be -1),
        e.g. the `mesh` section of an experiment config or a preset such as `fsdp()`.
      devices: the devices to span; `jax.devices()` by default.

    >>> dict(make_mesh({"data": 2, "fsdp": -1, "tensor": 2}).shape)   # doctest: +SKIP
    {'data': 2, 'fsdp': 2, 'tensor': 2}
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(mesh_config, len(devices))
    return jax.make_mesh(
        tuple(sizes.values()),
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
        devices=devices,
    )


def split_over_batch(y: jax.Array) -> jax.Array:
    """`y` with its leading (batch) dimension split over the current mesh's batch axes.

    A no-op unless traced under a mesh (`jax.sharding.use_abstract_mesh`, as the sharded steps
    do) with `data`/`fsdp` axes that divide it; the other dimensions are left to XLA. The
    sharded steps pass it to `lorax_ft.transform.factored(model, constrain=...)` for every layer output.
    """
    mesh = jax.sharding.get_abstract_mesh()
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
    if not axes or y.ndim == 0 or y.shape[0] % math.prod(mesh.shape[a] for a in axes):
        return y
    spec = P(axes if len(axes) > 1 else axes[0], *[P.UNCONSTRAINED] * (y.ndim - 1))
    return jax.lax.with_sharding_constraint(y, spec)
