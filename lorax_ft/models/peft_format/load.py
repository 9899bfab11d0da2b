"""PEFT -> lorax_ft: `load_peft` reads a PEFT LoRA adapter directory into `Factors` (exact, or
refused with one line naming the file and key).

Refused: what PEFT would compute differently from lorax_ft (a tied embedding table, a trained
leaf of an adapted module, a feature of the config lorax_ft does not implement, a module the
config targets without tensors in the file).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from lorax_ft.models import checkpoint
from lorax_ft.models.bert import BertForSequenceClassification, BertModel
from lorax_ft.models.export import HEAD_CONFIG, has_separate_head
from lorax_ft.models.families import family_for_config
from lorax_ft.models.loading import read_classifier_head
from lorax_ft.models.peft_format import names
from lorax_ft.models.peft_format.names import (
    CONFIG_NAME,
    PREFIX,
    WEIGHTS_NAME,
    AdapterInfo,
    PeftFormatError,
)
from lorax_ft.transform import lora, paths
from lorax_ft.transform.spec import LoRA, Spec, Train

# Config keys `load_peft` interprets; any other key set to something truthy is a PEFT feature
# lorax_ft does not implement (layers_to_transform, use_qalora, lora_bias, megatron_config, ...).
_HANDLED = {
    "peft_type", "task_type", "r", "lora_alpha", "target_modules", "exclude_modules",
    "rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "modules_to_save", "bias",
    "fan_in_fan_out", "lora_dropout", "init_lora_weights", "inference_mode", "revision",
    "base_model_name_or_path", "peft_version", "auto_mapping", "megatron_core",
    "qalora_group_size",
}  # fmt: skip
_EXACT_INITS = (True, False, "gaussian")  # other inits (pissa, olora, ...) rewrite the base


@dataclasses.dataclass
class LoadedAdapters:
    """A PEFT adapter in lorax layout.

    Attributes:
      adapters: pytree of `Factors` at the kernel paths of `params` (stacked when scanned).
      trained: `{path: array}` of fully trained leaves (PEFT's `modules_to_save`, and the head
        of a "mean"/"cls"-pooled classifier).
      info: `{kernel path: AdapterInfo}`.
      dropout: the config's `lora_dropout`.
      task_type: the config's `task_type`.
      base_model_name_or_path: the config's base model, if it names one.
    """

    adapters: Any
    trained: dict[str, Any]
    info: dict[str, AdapterInfo]
    dropout: float = 0.0
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    def spec(self) -> Spec:
        """The `Spec` that trains these adapters: one exact-path rule per kernel and leaf."""
        dora_field = "dora" in {f.name for f in dataclasses.fields(LoRA)}
        rules = []
        for path, info in self.info.items():
            kwargs = {"rslora": info.rslora, "dropout": self.dropout}
            if info.dora and not dora_field:
                raise PeftFormatError(
                    f"{path} is a DoRA adapter, but this lorax_ft's LoRA has no dora option"
                )
            if dora_field:
                kwargs["dora"] = info.dora
            alpha = int(info.alpha) if float(info.alpha).is_integer() else info.alpha
            rules.append((re.escape(path), LoRA(info.rank, alpha, **kwargs)))
        rules += [(re.escape(path), Train()) for path in self.trained]
        return Spec(rules)


def load_peft(directory: str, module: Any, params: Any) -> LoadedAdapters:
    """Reads a PEFT LoRA adapter directory for `module`/`params` (exact, or refused).

    A BERT classifier pooling by "mean" or "cls" reads what `save_peft` writes for it: encoder
    adapters for `BertModel` (task_type FEATURE_EXTRACTION) and the head from
    classifier.json/classifier.safetensors, returned among the `trained` leaves.

    Args:
      directory: holds `adapter_config.json` and `adapter_model.safetensors`.
      module: the lorax_ft model the adapter is for.
      params: its base params (the adapter's shapes are checked against them).

    Returns:
      `LoadedAdapters`; `.spec()` gives the matching `Spec`.

    Raises:
      PeftFormatError: a missing or unreadable file; not a LoRA adapter; a config feature
        lorax_ft does not implement; a tensor that maps to no module of this model or whose
        shape does not fit; a module the config targets or saves without tensors in the file;
        a classifier head whose pooling is not the model's.

    >>> loaded = load_peft("/tmp/adapter", module, params)        # doctest: +SKIP
    >>> logits = factored(module)(params, loaded.adapters, ids)   # doctest: +SKIP
    """
    _read_config(directory)  # what the directory is, before what it would hold for this model
    if not isinstance(module, BertForSequenceClassification):
        return _load(directory, module, params)
    try:
        head = read_classifier_head(directory)
    except checkpoint.ModelFileError as e:
        raise PeftFormatError(str(e)) from None
    pooling = module.config.classifier_pooling
    if not has_separate_head(module):
        if head is not None:
            raise PeftFormatError(
                f"{directory}: its classifier pools by {head.pooling!r} ({HEAD_CONFIG}), this "
                f"model by 'pooler'; build the classifier with classifier_pooling={head.pooling!r}"
            )
        return _load(directory, module, params)
    if head is None:
        raise PeftFormatError(
            f"{directory}: no {HEAD_CONFIG}: the adapter of a {pooling!r}-pooled classifier "
            "carries its head there (save_peft writes it); for the encoder's adapters alone, "
            "load_peft(directory, BertModel(config), params['bert'])"
        )
    if head.pooling != pooling:
        raise PeftFormatError(
            f"{directory}: its classifier pools by {head.pooling!r} ({HEAD_CONFIG}), this model "
            f"by {pooling!r}; build the classifier with classifier_pooling={head.pooling!r}"
        )
    kernel, bias = params["classifier"]["kernel"], params["classifier"]["bias"]
    if head.weight.T.shape != tuple(kernel.shape):
        raise PeftFormatError(
            f"{head.weights_file}: weight {head.weight.shape} does not fit this model's "
            f"classifier, which needs {tuple(kernel.shape)[::-1]} (num_labels, hidden)"
        )
    encoder = _load(directory, BertModel(module.config), params["bert"], "FEATURE_EXTRACTION")
    trained = {f"bert/{p}": v for p, v in encoder.trained.items()}
    trained["classifier/kernel"] = jnp.asarray(head.weight.T, kernel.dtype)
    trained["classifier/bias"] = jnp.asarray(head.bias, bias.dtype)
    return dataclasses.replace(
        encoder,
        adapters={"bert": encoder.adapters} if encoder.adapters else {},
        trained=trained,
        info={f"bert/{p}": info for p, info in encoder.info.items()},
    )


def _load(directory: str, module: Any, params: Any, task_type: str | None = None):
    config, tensors = _read(directory)
    if task_type is not None and config.get("task_type") not in (task_type, None):
        raise PeftFormatError(
            f"{directory}: task_type {config.get('task_type')!r}; this model's encoder takes "
            f"{task_type} adapters (transformers' BertModel)"
        )
    cfg = module.config
    family = family_for_config(cfg)
    flat = paths.flatten(params)
    modules = names.modules(flat, family, cfg)
    weights_file = os.path.join(directory, WEIGHTS_NAME)
    lora_parts, whole = _split_keys(weights_file, tensors, modules)
    tied = names.tied_table(module)
    per_layer = {}  # lorax path -> {layer: (info, a, b, m)}
    for name, parts in sorted(lora_parts.items()):
        path, layer = modules[name].weight
        info, arrays = _one_kernel(weights_file, config, name, parts, modules[name], flat)
        if path == tied:
            raise PeftFormatError(
                f"{weights_file}: {name} is the tied LM head's table; PEFT adapts its lookup "
                "only, lorax_ft both uses: not exact"
            )
        per_layer.setdefault(path, {})[layer] = (info, *arrays)
    for name, mod in sorted(modules.items()):
        if mod.weight and name not in lora_parts and names.is_targeted(config, name):
            linear = not mod.embedding and name != "lm_head"
            if config.get("target_modules") != "all-linear" or linear:
                raise PeftFormatError(
                    f"{directory}: {CONFIG_NAME} targets {name} but {WEIGHTS_NAME} has no "
                    "LoRA tensors for it (PEFT would silently leave it unadapted)"
                )
    adapters, info = {}, {}
    dropout = float(config.get("lora_dropout") or 0.0)
    for path, layers in per_layer.items():
        info[path], adapters[path] = _assemble(weights_file, path, layers, flat, dropout)
    trained = _trained(weights_file, config, whole, modules, flat, per_layer, family)
    return LoadedAdapters(
        adapters=paths.unflatten(adapters),
        trained=trained,
        info=info,
        dropout=dropout,
        task_type=config.get("task_type"),
        base_model_name_or_path=config.get("base_model_name_or_path"),
    )


def _read(directory: str) -> tuple[dict, dict]:
    config = _read_config(directory)
    weights_file = os.path.join(directory, WEIGHTS_NAME)
    try:
        # "flax" rather than "numpy": numpy cannot hold bfloat16 tensors.
        with safe_open(weights_file, framework="flax") as f:
            tensors = {k: np.asarray(f.get_tensor(k)) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise PeftFormatError(f"{weights_file} is not a readable safetensors file ({e})") from None
    return config, tensors


def _read_config(directory: str) -> dict:
    """The adapter's config, once the directory is found to hold a LoRA adapter lorax_ft reads."""
    config_file = os.path.join(directory, CONFIG_NAME)
    weights_file = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(config_file):
        raise PeftFormatError(f"{directory}: no {CONFIG_NAME} (not a PEFT adapter directory)")
    if not os.path.isfile(weights_file):
        if os.path.isfile(os.path.join(directory, "adapter_model.bin")):
            raise PeftFormatError(
                f"{directory}: has adapter_model.bin (pickle) but not {WEIGHTS_NAME}; re-save "
                "the adapter with safe_serialization=True"
            )
        raise PeftFormatError(f"{directory}: no {WEIGHTS_NAME}")
    try:
        with open(config_file) as f:
            config = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PeftFormatError(f"{config_file} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise PeftFormatError(f"{config_file} is not a JSON object")
    if config.get("peft_type") != "LORA":
        raise PeftFormatError(
            f"{config_file}: peft_type {config.get('peft_type')!r}, only 'LORA' is supported"
        )
    for key, value in config.items():
        if key not in _HANDLED and value:
            raise PeftFormatError(f"{config_file}: {key}={value!r} is not supported by lorax_ft")
    if config.get("init_lora_weights", True) not in _EXACT_INITS:
        raise PeftFormatError(
            f"{config_file}: init_lora_weights={config['init_lora_weights']!r} rewrites the base "
            "weights when PEFT loads it; not supported by lorax_ft"
        )
    return config


_LORA_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_embedding_A": "A",
    ".lora_embedding_B": "B",
    ".lora_magnitude_vector": "m",
}


def _split_keys(weights_file: str, tensors: dict, modules: dict):
    """`{module: {"A"/"B"/"m": array}}` and `{key: array}` of whole tensors."""
    lora_parts, whole = {}, {}
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise PeftFormatError(f"{weights_file}: key {key} lacks PEFT's prefix {PREFIX!r}")
        key = key.removeprefix(PREFIX)
        suffix = next((s for s in _LORA_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            if ".lora_" in key:
                raise PeftFormatError(
                    f"{weights_file}: {key} (LoRA biases or another variant) is not supported"
                )
            whole[key] = value
            continue
        name = key.removesuffix(suffix)
        mod = modules.get(name)
        if mod is None or mod.weight is None:
            raise PeftFormatError(
                f"{weights_file}: {key} maps to no kernel of this model (an adapter for "
                "another architecture?)"
            )
        if ("embedding" in suffix) != mod.embedding:
            kind = "an embedding" if mod.embedding else "a linear layer"
            raise PeftFormatError(f"{weights_file}: {key} does not fit {name}, {kind}")
        parts = lora_parts.setdefault(name, {})
        parts[_LORA_SUFFIXES[suffix]] = value
    return lora_parts, whole


def _one_kernel(weights_file, config, name, parts, mod, flat):
    path, layer = mod.weight
    shape = tuple(flat[path].shape)[0 if layer is None else 1 :]
    fan_in, fan_out = shape
    if not names.is_targeted(config, name):
        raise PeftFormatError(
            f"{weights_file}: has LoRA tensors for {name}, which {CONFIG_NAME} does not target"
        )
    if "A" not in parts or "B" not in parts:
        raise PeftFormatError(
            f"{weights_file}: {name} has lora_{'A' if 'A' in parts else 'B'} only"
        )
    rank = names.pattern(config.get("rank_pattern") or {}, name, config.get("r", 8))
    alpha = names.pattern(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8))
    if not (isinstance(alpha, int | float) and 0 < alpha < math.inf):
        raise PeftFormatError(f"{weights_file}: {name} has lora_alpha {alpha!r}, not > 0")
    a, b = parts["A"].T, parts["B"].T
    if a.shape != (fan_in, rank) or b.shape != (rank, fan_out):
        raise PeftFormatError(
            f"{weights_file}: {name} has lora_A {parts['A'].shape} and lora_B "
            f"{parts['B'].shape}; rank {rank} and its weight {shape} need "
            f"{(rank, fan_in)} and {(fan_out, rank)}"
        )
    dora = bool(config.get("use_dora"))
    m = parts.get("m")
    if dora and mod.embedding:
        raise PeftFormatError(f"{weights_file}: {name}: DoRA on an embedding is not supported")
    if dora != (m is not None):
        raise PeftFormatError(
            f"{weights_file}: {name} {'lacks' if dora else 'has'} lora_magnitude_vector but "
            f"use_dora is {dora}"
        )
    if m is not None and m.shape != (fan_out,):
        raise PeftFormatError(
            f"{weights_file}: {name}.lora_magnitude_vector {m.shape} does not fit {(fan_out,)}"
        )
    info = AdapterInfo(rank, alpha, bool(config.get("use_rslora")), dora)
    return info, (a, b, m)


def _float(x: np.ndarray) -> jnp.ndarray:
    return jnp.asarray(x.astype(np.float64 if x.dtype == np.float64 else np.float32))


def _factors(info: AdapterInfo, a, b, m, dropout: float) -> lora.Factors:
    magnitude = None if m is None else _float(m)
    return lora.Factors(_float(a), _float(b), info.scale, dropout, magnitude)


def _assemble(weights_file, path, layers: dict, flat, dropout):
    if None in layers:
        info, a, b, m = layers[None]
        return info, _factors(info, a, b, m, dropout)
    count = flat[path].shape[0]
    missing = sorted(set(range(count)) - set(layers))
    infos = {layer: v[0] for layer, v in layers.items()}
    if missing or len(set(infos.values())) > 1:
        why = f"not layers {missing}" if missing else f"differently: {list(set(infos.values()))}"
        raise PeftFormatError(
            f"{weights_file}: adapts {path} {why}; a scanned stack needs one adapter for all "
            "its layers (load the model with scan_layers=False)"
        )
    info = infos[0]
    a, b = (np.stack([layers[i][k] for i in range(count)]) for k in (1, 2))
    m = None if layers[0][3] is None else np.stack([layers[i][3] for i in range(count)])
    return info, _factors(info, a, b, m, dropout)


def _trained(weights_file, config, whole, modules, flat, adapted, family) -> dict:
    """`{path: array}` from the whole tensors (modules_to_save, or PEFT's copies of the base)."""
    bias = config.get("bias", "none")
    layers = {}  # path -> {layer: array}
    for key, value in whole.items():
        name, _, leaf_name = key.rpartition(".")
        name = name.removesuffix(".base_layer")
        mod = modules.get(name)
        if mod is None or leaf_name not in mod.leaves:
            raise PeftFormatError(f"{weights_file}: {key} is no tensor of this model")
        path, layer = mod.leaves[leaf_name]
        leaf = path.rpartition("/")[2]
        array = checkpoint.from_hf_layout(value, leaf, family)
        shape = tuple(flat[path].shape)[0 if layer is None else 1 :]
        if array.shape != shape:
            raise PeftFormatError(
                f"{weights_file}: {key} has shape {value.shape}, this model's needs "
                f"{tuple(checkpoint.from_hf_layout(np.empty(shape), leaf, family).shape)}"
            )
        if not names.saved_whole(config, name):
            if bias != "none" and leaf == "bias":
                raise PeftFormatError(f"{weights_file}: {key}: bias={bias!r} is not supported")
            base = np.asarray(flat[path] if layer is None else flat[path][layer])
            if np.array_equal(array.astype(base.dtype), base):
                continue  # PEFT's copy of a base weight (save_embedding_layers)
            if path in adapted:
                raise PeftFormatError(
                    f"{weights_file}: {key} replaces the base weight of an adapted module"
                )
        layers.setdefault(path, {})[layer] = array
    for name, mod in sorted(modules.items()):
        absent = [p for p, layer in set(mod.leaves.values()) if layer not in layers.get(p, {})]
        if names.saved_whole(config, name) and absent:
            raise PeftFormatError(
                f"{weights_file}: modules_to_save covers {name}, but the file lacks its "
                f"tensors for {sorted(absent)[0]} (PEFT would silently use the base values)"
            )
    trained = {}
    for path, parts in layers.items():
        dtype = flat[path].dtype
        if None in parts:
            trained[path] = jnp.asarray(parts[None], dtype)
            continue
        missing = sorted(set(range(flat[path].shape[0])) - set(parts))
        if missing:
            raise PeftFormatError(
                f"{weights_file}: trains {path} but not in layers {missing}; a scanned stack "
                "trains all its layers (load the model with scan_layers=False)"
            )
        trained[path] = jnp.asarray(np.stack([parts[i] for i in sorted(parts)]), dtype)
    return trained
