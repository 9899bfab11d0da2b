"""The frozen base of a QLoRA run (`model.quantize`): its kernels quantized inside the train state.

`quantize_state` runs once the adapters exist, so that PiSSA/OLoRA residuals are what gets
quantized (as PEFT does for QLoRA + PiSSA), and replaces the frozen kernels of the supported
layers (`layouts`) with `lorax_ft.quant.QuantizedKernel`s at the same paths. Leaves the run
trains are never quantized (they are not in the frozen part), embedding tables only with
`model.quantize_embeddings`. It goes kernel by kernel, one jitted program per kernel shape whose
outputs are placed as the kernel was, and deletes each float kernel as soon as its codes exist:
quantizing never holds more float kernels on the devices than loading did.

Each kernel's relative error ‖dequantize(Wq) − W‖/‖W‖ is measured as it is quantized (in the
dtype the model reads it in); `report` summarises them for the run's summary and its exports.
DoRA's magnitudes restart at the norms of the dequantized kernels (PEFT's `dora_init` reads the
dequantized weight of a quantized layer), so fresh adapters leave the quantized model as it is.

A GGUF base (`model.quantize='gguf'`) comes quantized from the file: `gguf_base` keeps its
blocks where the run would have quantized a kernel and dequantizes the rest (trained leaves,
embeddings unless asked); its error against the file is 0.

>>> state, shardings, errors = quantize_state(state, shardings, method="nf4",
...                                           layouts=layouts)          # doctest: +SKIP
>>> report("nf4", errors)["relative_error_max"]                         # doctest: +SKIP
0.0952
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lorax_ft.parallel import sharding as sharding_lib
from lorax_ft.quant import QuantizeError, is_quantized, quantize_kernel
from lorax_ft.training.train_step import TrainState
from lorax_ft.transform import lora, paths
from lorax_ft.transform.lora import Factors, KernelLayout

PyTree = Any

GGUF_NOTE = (
    "the base is the GGUF file's blocks as stored: no quantization error against the file "
    "(the file's own error against the original float model is not known here)"
)


def selected(layout: KernelLayout | None, embeddings: bool) -> bool:
    """Whether a frozen leaf with this layout is kept quantized: a supported layer's kernel,
    an embedding table only when `embeddings` (`model.quantize_embeddings`)."""
    return layout is not None and (embeddings or not layout.embedding)


def quantize_state(
    state: TrainState,
    shardings: TrainState,
    *,
    method: str,
    layouts: Mapping[str, KernelLayout],
    double_quant: bool = False,
    embeddings: bool = False,
    fresh_magnitudes: bool = True,
) -> tuple[TrainState, TrainState, dict[str, jax.Array]]:
    """The state with its frozen kernels quantized, their shardings, and each one's error.

    Args:
      state: the step-0 state (arrays, or `jax.ShapeDtypeStruct`s with shardings for a plan).
        Its float kernels are deleted as they are quantized: use the returned state.
      shardings: the state's `NamedSharding`s.
      method: "int8" or "nf4" (`lorax_ft.quant.quantize_kernel`).
      layouts: `infer_layouts` of the model: which leaves are supported layers' kernels.
      double_quant: nf4's block scales as int8 codes too.
      embeddings: quantize embedding tables too.
      fresh_magnitudes: set DoRA magnitudes to the dequantized kernels' norms (False when the
        adapters come from a directory, `peft.init_from`, whose magnitudes were trained).

    Returns:
      `(state, shardings, errors)`: the arrays of a quantized kernel are placed from its
      kernel's sharding (`parallel.sharding.quantized_sharding`); `errors` maps each
      quantized kernel's path to its relative error, a device scalar (empty for shapes).
      A kernel whose blocked axis is not a multiple of nf4's block of 64 stays in float, named
      in a warning.
    """
    flat = paths.flatten(state.frozen["params"])  # frozen leaves only: trained ones are None
    flat_shardings = paths.flatten(shardings.frozen["params"])
    factors = lora.factors_by_path(state.trainable["lora"])
    factor_shardings = lora.factors_by_path(shardings.trainable["lora"])
    quantized, placed, magnitudes, errors, unfit = {}, {}, {}, {}, []
    for path, kernel in flat.items():
        layout = layouts.get(path)
        if not selected(layout, embeddings) or is_quantized(kernel):
            continue
        options = (method, layout.stack, layout.inputs, double_quant)
        try:
            shapes = jax.eval_shape(functools.partial(_quantized, *options), kernel)
        except QuantizeError:
            unfit.append(path)
            continue
        where = flat_shardings[path]
        out = sharding_lib.quantized_sharding(shapes, where)  # GGUF blocks are placed so too
        f = factors.get(path)
        dora = f is not None and f.dora and fresh_magnitudes
        if isinstance(kernel, jax.ShapeDtypeStruct):
            quantized[path] = jax.tree.map(_with_sharding, shapes, out)
        else:
            magnitude_sharding = factor_shardings[path].magnitude if dora else None
            run = _quantizer(options, dora, out, magnitude_sharding, _replicated(where))
            quantized[path], errors[path], magnitude = run(kernel, f if dora else None)
            if dora:
                magnitudes[path] = magnitude
            kernel.delete()  # its codes exist: free the float kernel now, not at the end
        placed[path] = out
    if unfit:
        logging.warning(
            "%d kernels stay in float: their last input axis is not a multiple of %s's block "
            "of 64: %s", len(unfit), method, ", ".join(unfit[:5]),
        )  # fmt: skip

    def swap(tree, new):
        return paths.map_with_path(lambda p, x: new.get(p, x), tree)

    state = state.replace(
        frozen={**state.frozen, "params": swap(state.frozen["params"], quantized)},
        trainable={
            **state.trainable,
            "lora": _with_magnitudes(state.trainable["lora"], magnitudes),
        },
    )
    shardings = shardings.replace(
        frozen={**shardings.frozen, "params": swap(shardings.frozen["params"], placed)}
    )
    return state, shardings, errors


def _quantized(method, stack, inputs, double_quant, kernel):
    return quantize_kernel(kernel, method, stack=stack, inputs=inputs, double_quant=double_quant)


@functools.lru_cache(maxsize=64)
def _quantizer(options, dora, out, magnitude_sharding, scalar):
    """One compiled program per kernel shape and placement: (codes, error, DoRA magnitude)."""

    def run(kernel, factors):
        q = _quantized(*options, kernel)
        w = kernel.astype(jnp.float32)
        seen = q.dequantize().astype(jnp.float32)  # what the model reads, in its dtype
        error = jnp.sqrt(jnp.sum(jnp.square(seen - w))) / jnp.maximum(
            jnp.sqrt(jnp.sum(jnp.square(w))), jnp.finfo(jnp.float32).tiny
        )
        magnitude = None
        if factors is not None:  # ‖W_q + s·A·B‖ per output feature: PiSSA's A, B included
            magnitude = lora.dora_norm(q.dequantize(), factors).astype(factors.magnitude.dtype)
        return q, error, magnitude

    return jax.jit(run, out_shardings=(out, scalar, magnitude_sharding))


def _with_magnitudes(adapters: PyTree, magnitudes: dict[str, jax.Array]) -> PyTree:
    if not magnitudes:
        return adapters
    return jax.tree_util.tree_map_with_path(
        lambda kp, f: (
            f.replace(magnitude=magnitudes[paths.path_str(kp)])
            if isinstance(f, Factors) and paths.path_str(kp) in magnitudes
            else f
        ),
        adapters,
        is_leaf=lambda x: isinstance(x, Factors),
    )


def _replicated(kernel_sharding: NamedSharding) -> NamedSharding:
    return NamedSharding(kernel_sharding.mesh, P())


def _with_sharding(shape: jax.ShapeDtypeStruct, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding)


def gguf_base(
    params: PyTree,
    layouts: Mapping[str, KernelLayout],
    *,
    trained: set[str],
    embeddings: bool,
    shardings: PyTree,
) -> PyTree:
    """A GGUF file's params (`load_pretrained(..., gguf_blocks=True)`) as a run keeps them.

    Blocks stay where `quantize_state` would have quantized a kernel (a supported layer's
    frozen kernel, an embedding table only with `embeddings`); any other block (a leaf in
    `trained`, a table, a tensor no supported layer reads) is dequantized into the float
    leaf's planned sharding (`shardings`, the float params' `NamedSharding`s), kernel by
    kernel, its blocks deleted at once. Shapes (a plan) become float shapes likewise.
    """
    flat_shardings = paths.flatten(shardings)

    def convert(path, leaf):
        keep = selected(layouts.get(path), embeddings) and path not in trained
        if not is_quantized(leaf) or keep:
            return leaf
        where = flat_shardings[path]
        if isinstance(leaf.values, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where)
        out = _dequantizer(where)(leaf)
        for array in jax.tree.leaves(leaf):
            array.delete()
        return out

    return paths.map_with_path(convert, params)


@functools.lru_cache(maxsize=64)
def _dequantizer(where: NamedSharding):
    return jax.jit(lambda q: q.dequantize(), out_shardings=where)


def dora_view(params: PyTree, spec) -> PyTree:
    """`params` with the quantized kernels that DoRA adapts dequantized (traced: for their norms,
    DoRA's initial magnitudes); other leaves as they are."""
    dora = {p for p, a in spec.lora_targets(params).items() if a.dora}
    return paths.map_with_path(
        lambda p, x: x.dequantize() if p in dora and is_quantized(x) else x, params
    )


def float_shardings(params: PyTree, planned: PyTree) -> PyTree:
    """`params`' shardings, a quantized kernel's being the float kernel's `planned` one (one
    sharding per kernel, as adapters are placed from)."""
    flat = paths.flatten(planned)
    return paths.map_with_path(lambda p, x: flat[p] if is_quantized(x) else x.sharding, params)


def quantized_kernels(params: PyTree) -> dict[str, Any]:
    """`{path: QuantizedKernel}` of a params tree (what the base fingerprint covers)."""
    return {p: v for p, v in paths.flatten(params).items() if is_quantized(v)}


def report(
    method: str,
    errors: Mapping[str, Any],
    *,
    double_quant: bool = False,
    embeddings: bool = False,
    params: PyTree | None = None,
) -> dict:
    """A JSON-able summary of a quantized base: method, kernels, relative errors, storage.

    Args:
      method: `model.quantize`.
      errors: `{path: relative error}` from `quantize_state` (empty for "gguf").
      double_quant, embeddings: the config's `model.double_quant`, `model.quantize_embeddings`.
      params: the quantized params, for the formats, the kernels' count and bytes per parameter.

    >>> report("nf4", {"a/kernel": 0.1, "b/kernel": 0.2})["relative_error_max"]
    0.2
    """
    values = np.asarray(jax.device_get(list(errors.values())), np.float64)
    out = {
        "method": method,
        "double_quant": double_quant,
        "quantize_embeddings": embeddings,
        "kernels": len(errors),
        "relative_error_max": float(values.max()) if values.size else 0.0,
        "relative_error_mean": float(values.mean()) if values.size else 0.0,
        "relative_error": "‖dequantize(Wq) − W‖/‖W‖ per quantized kernel, W the float kernel "
        "quantized (a PiSSA/OLoRA residual where the init changed the base)",
    }
    if params is not None:
        kernels = quantized_kernels(params)
        formats: dict[str, int] = {}
        for q in kernels.values():
            formats[q.format] = formats.get(q.format, 0) + 1
        size = sum(math.prod(q.shape) for q in kernels.values())
        held = sum(q.nbytes for q in kernels.values())
        out["kernels"] = len(kernels)
        out["formats"] = formats
        out["bytes_per_param"] = held / size if size else 0.0
    if method == "gguf":
        out["relative_error"] = GGUF_NOTE
    return out


def statement(summary: dict) -> str:
    """One line for a user: what the base was quantized with and how far that is from float."""
    if summary["method"] == "gguf":
        formats = ", ".join(f"{n} {f}" for f, n in sorted(summary.get("formats", {}).items()))
        return (
            f"the adapters were trained on the GGUF file's quantized blocks ({formats or 'none'} "
            f"kernels): relative error 0 against the file, which is the base itself"
        )
    method = summary["method"] + (" with double quantization" if summary["double_quant"] else "")
    return (
        f"the adapters were trained on an {method}-quantized base: relative error "
        f"‖dequantize(Wq) − W‖/‖W‖ over its {summary['kernels']} quantized kernels: max "
        f"{summary['relative_error_max']:.4g}, mean {summary['relative_error_mean']:.4g}"
    )
