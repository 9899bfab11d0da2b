"""Hugging Face safetensors <-> parameter pytrees, driven by the module's own parameter paths.

A parameter path maps to a HF tensor name mechanically: `/` -> `.`, the stack component
`layers_N` -> `layers.N` (or, scanned, one `layers` leaf -> `layers.0 ... layers.{L-1}` stacked),
leaf `kernel`/`embedding`/`scale` -> `weight` (old LayerNorms: `gamma`), `bias` -> `bias` (`beta`).
Kernels are HF weights transposed, except GPT-2's Conv1D. Tensor names may lack or carry the
base-model prefix (`model.`, `transformer.`, `bert.`); both are accepted.

Example:
    >>> tensors = to_hf_tensors(params, LLAMA, cfg)
    >>> tensors["model.layers.0.self_attn.q_proj.weight"].shape
    (64, 64)
"""

import json
import logging
import os
import re
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from safetensors import SafetensorError, safe_open

from lorax_ft.errors import UserError
from lorax_ft.models.abstract import abstract_params
from lorax_ft.models.families import Family

_LEAF_NAMES = {
    "kernel": ("weight",),
    "embedding": ("weight",),
    "scale": ("weight", "gamma"),
    "bias": ("bias", "beta"),
}


class ModelFileError(UserError, ValueError):
    """A model file that cannot be read as what it claims to be; the message names the file."""


def read_json(path: str) -> Any:
    """A JSON file of a model directory; a damaged one is a `ModelFileError` naming it."""
    try:
        with open(path) as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path} is not valid JSON ({e}); re-download or re-export it") from e


def _open_safetensors(path: str) -> Any:
    """`safe_open`, with a damaged file (truncated, bad header, a tensor outside the data) named."""
    try:
        return safe_open(path, framework="numpy")
    except SafetensorError as e:
        raise ModelFileError(
            f"{path} is not a readable safetensors file ({e}); re-download or re-export it"
        ) from e


class SafetensorsDir:
    """The tensors of `model.safetensors` or of the shards a `model.safetensors.index.json` lists."""

    def __init__(self, directory: str):
        index = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        if os.path.exists(index):
            listing = read_json(index)
            weight_map = listing.get("weight_map") if isinstance(listing, dict) else None
            if not isinstance(weight_map, dict):
                raise ModelFileError(f"{index} has no weight_map (tensor name -> file)")
            self.file_of = {k: os.path.join(directory, v) for k, v in weight_map.items()}
        elif os.path.exists(single):
            with _open_safetensors(single) as f:
                self.file_of = dict.fromkeys(f.keys(), single)
        else:
            raise FileNotFoundError(
                f"no model.safetensors or model.safetensors.index.json in {directory}"
            )
        self.name = directory
        self._handles: dict[str, Any] = {}

    def get(self, key: str) -> np.ndarray:
        path = self.file_of[key]
        if path not in self._handles:
            if not os.path.exists(path):
                raise FileNotFoundError(f"missing checkpoint shard {path} (listed for {key})")
            self._handles[path] = _open_safetensors(path)
        return self._handles[path].get_tensor(key)


def _leaf_paths(tree: Any) -> Iterator[tuple[tuple[str, ...], Any]]:
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        yield tuple(k.key for k in path), leaf


def _hf_base(path: tuple[str, ...], family: Family, layer: int | None) -> tuple[str, ...]:
    """HF name components (leaf excluded) of a parameter path; `layer` expands a scanned stack."""
    out = []
    pattern = re.compile(rf"^{family.stack_name}_(\d+)$")
    for comp in path[:-1]:
        match = pattern.match(comp)
        if match:
            out += [family.stack_name, match.group(1)]
        elif comp == family.stack_name and layer is not None:
            out += [family.stack_name, str(layer)]
        else:
            out.append(comp)
    return tuple(out)


def _candidates(base: tuple[str, ...], leaf: str, family: Family) -> list[str]:
    bases = [base]
    if base[0] in family.base_prefixes:
        bases.append(base[1:])
    else:
        bases += [(p, *base) for p in family.base_prefixes]
    return [".".join((*b, name)) for name in _LEAF_NAMES[leaf] for b in bases]


def _is_stacked(path: tuple[str, ...], family: Family, cfg: Any) -> bool:
    return cfg.scan_layers and family.stack_name in path[:-1]


def is_stacked(path: tuple[str, ...], family: Family, cfg: Any) -> bool:
    """Whether the leaf at `path` is a scanned layer stack (a leading layer axis, one per layer)."""
    return _is_stacked(path, family, cfg)


def hf_module_name(path: tuple[str, ...], family: Family, layer: int | None = None) -> str:
    """The HF module holding the leaf at `path`; `layer` picks one layer of a scanned stack.

    >>> from lorax_ft.models.families import LLAMA
    >>> hf_module_name(("model", "layers", "self_attn", "q_proj", "kernel"), LLAMA, 1)
    'model.layers.1.self_attn.q_proj'
    """
    return ".".join(_hf_base(path, family, layer))


def hf_leaf_names(leaf: str) -> tuple[str, ...]:
    """HF names of a leaf (`kernel` -> `weight`), the current name first, then older ones."""
    return _LEAF_NAMES[leaf]


def from_hf_layout(array: np.ndarray, leaf: str, family: Family) -> np.ndarray:
    """One layer's HF tensor in the layout of the leaf (`nn.Linear` weights transposed)."""
    return _from_hf(array, leaf, family)


def hf_leaf_tensors(path: tuple[str, ...], value: Any, family: Family, cfg: Any) -> dict:
    """`{HF tensor name: numpy array}` of one parameter leaf; a scanned stack gives one per layer."""
    array = np.asarray(jax.device_get(value))
    layers = range(array.shape[0]) if _is_stacked(path, family, cfg) else [None]
    out = {}
    for layer in layers:
        name = f"{hf_module_name(path, family, layer)}.{_LEAF_NAMES[path[-1]][0]}"
        part = array if layer is None else array[layer]
        out[name] = np.ascontiguousarray(_from_hf(part, path[-1], family))
    return out


def _from_hf(array: np.ndarray, leaf: str, family: Family) -> np.ndarray:
    return array.T if leaf == "kernel" and family.transpose_kernels else array


def _hf_shape(shape: tuple[int, ...], leaf: str, family: Family) -> tuple[int, ...]:
    return tuple(shape[::-1]) if leaf == "kernel" and family.transpose_kernels else tuple(shape)


def read_params(
    source: Any,
    abstract: Any,
    family: Family,
    cfg: Any,
    shardings: Any = None,
) -> Any:
    """Reads every parameter of `abstract` (a shape/dtype pytree) from a HF safetensors directory.

    Args:
      source: a HF model directory, or a store: an object with `name`, `file_of` (HF tensor name ->
        file) and `get(name) -> np.ndarray` in HF layout (see `gguf_llama.GgufTensors`).
      abstract: `jax.ShapeDtypeStruct` pytree of the parameters, e.g. from `jax.eval_shape`.
      family: the model family (naming rules).
      cfg: the model config (scan_layers, number of layers).
      shardings: optional pytree of `jax.sharding.Sharding` (or None leaves) shaped like `abstract`;
        each tensor is `jax.device_put` onto its sharding as soon as it is read.

    Returns:
      The parameter pytree, in `abstract`'s dtypes.

    Raises:
      ModelFileError: a parameter has no tensor in the checkpoint, or a tensor's shape
        disagrees with the config.
    """
    store = SafetensorsDir(source) if isinstance(source, str) else source
    used: set[str] = set()

    def read_one(path, layer, shape):
        base = _hf_base(path, family, layer)
        for key in _candidates(base, path[-1], family):
            if key in store.file_of:
                used.add(key)
                array = _from_hf(store.get(key), path[-1], family)
                if array.shape != shape:
                    # Report the tensor as stored, so the numbers match what the file says.
                    raise ModelFileError(
                        f"{store.file_of[key]}: tensor {key} has shape "
                        f"{_hf_shape(array.shape, path[-1], family)} but the config implies "
                        f"{_hf_shape(shape, path[-1], family)}"
                    )
                return array
        name = ".".join((*base, _LEAF_NAMES[path[-1]][0]))
        raise ModelFileError(
            f"{store.name}: checkpoint has no tensor {name} (for {'/'.join(path)})"
        )

    def load(path, spec, sharding):
        if _is_stacked(path, family, cfg):
            layer_shape = tuple(spec.shape[1:])
            array = np.stack([read_one(path, i, layer_shape) for i in range(spec.shape[0])])
        else:
            array = read_one(path, None, tuple(spec.shape))
        array = array.astype(spec.dtype)
        return jax.device_put(array, sharding) if sharding is not None else jax.numpy.asarray(array)

    flat_shardings = None
    if shardings is not None:
        flat_shardings = jax.tree.structure(abstract).flatten_up_to(shardings)
    leaves = []
    for i, (path, spec) in enumerate(_leaf_paths(abstract)):
        leaves.append(load(path, spec, None if flat_shardings is None else flat_shardings[i]))
    unused = sorted(set(store.file_of) - used)
    if unused:
        logging.info(
            "%s: %d checkpoint tensors unused, e.g. %s", store.name, len(unused), unused[:3]
        )
    return jax.tree.unflatten(jax.tree.structure(abstract), leaves)


def load_params(
    store: Any,
    module: Any,
    family: Family,
    cfg: Any,
    shardings: Any = None,
    read_weights: bool = True,
) -> Any:
    """The parameters of `module` from `store` (see `read_params`), or only their shapes.

    Args:
      store: as `read_params`'s `source`.
      module: the Flax module the parameters are for.
      family: the model family (naming rules).
      cfg: the model config.
      shardings: None, a pytree of shardings shaped like the params, or a function
        `module -> such a pytree` (it can then be derived from the module's logical axes).
      read_weights: False returns `jax.ShapeDtypeStruct`s (with their shardings) and reads
        nothing: enough to plan memory or build shardings before loading.
    """
    abstract = abstract_params(module)
    if callable(shardings):
        shardings = shardings(module)
    if not read_weights:
        if shardings is None:
            return abstract
        return jax.tree.map(
            lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
            abstract,
            shardings,
        )
    return read_params(store, abstract, family, cfg, shardings)


def to_hf_tensors(params: Any, family: Family, cfg: Any) -> dict[str, np.ndarray]:
    """HF-named numpy tensors (`(out, in)` Linear weights, stacks unrolled) for `params`."""
    out = {}
    for path, value in _leaf_paths(params):
        out.update(hf_leaf_tensors(path, value, family, cfg))
    return out
