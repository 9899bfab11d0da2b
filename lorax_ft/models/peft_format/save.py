"""lorax_ft -> PEFT: `save_peft` writes what PEFT's `save_pretrained` writes for the same adapters.

Per adapted HF module `m` (keys prefixed `base_model.model.`): `m.lora_A.weight` (r, in) = Aᵀ and
`m.lora_B.weight` (out, r) = Bᵀ (GPT-2's Conv1D too, with `fan_in_fan_out`), embeddings as
`m.lora_embedding_A` (r, vocab) = Aᵀ and `m.lora_embedding_B` (dim, r) = Bᵀ, DoRA's
`m.lora_magnitude_vector` (out,), and every tensor of a `modules_to_save` module under its own
name. A scanned layer stack is one module per layer. The config's ranks and alphas are checked
against PEFT's own matching before anything is written.
"""

from __future__ import annotations

import collections
import json
import math
import os
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from lorax_ft.models import checkpoint
from lorax_ft.models.bert import BertForSequenceClassification, BertModel
from lorax_ft.models.export import (
    HEAD_WEIGHTS,
    has_separate_head,
    remove_classifier_head,
    write_classifier_head,
)
from lorax_ft.models.families import family_for_config
from lorax_ft.models.peft_format import names
from lorax_ft.models.peft_format.names import PREFIX, AdapterInfo, PeftFormatError
from lorax_ft.transform import lora, paths
from lorax_ft.transform.mixed import MixedFactors


def save_peft(
    directory: str,
    module: Any,
    params: Any,
    adapters: Any,
    trained: Any = None,
    *,
    base_model_name_or_path: str | None = None,
) -> dict:
    """Writes `adapters` (and fully trained leaves) as a PEFT LoRA adapter directory.

    `peft.PeftModel.from_pretrained(hf_model, directory)` then computes lorax_ft's factored
    forward. A BERT classifier pooling by "mean" or "cls" has no transformers class (its
    `BertForSequenceClassification` classifies the pooler output): its encoder's adapters are
    written for `BertModel` (task_type FEATURE_EXTRACTION), and its head beside them as
    classifier.json + classifier.safetensors (see `lorax_ft.models.export`), which PEFT ignores.

    Args:
      directory: created if missing; an existing adapter there is overwritten.
      module: a model of `lorax_ft.models` (its config gives the family and `scan_layers`).
      params: the base params (shapes, and the untrained leaves of modules saved whole).
      adapters: pytree of `lorax_ft.transform.lora.Factors` at kernel paths of `params`.
      trained: fully trained leaves, a pytree or `{path: array}`; each HF module holding one is
        saved whole (PEFT's `modules_to_save`), its other leaves at their `params` value. A
        BERT classifier's head is always saved whole, as PEFT's SEQ_CLS does.
      base_model_name_or_path: recorded in the config (PEFT's `from_pretrained` uses it).

    Returns:
      The adapter config written.

    Raises:
      PeftFormatError: adapters that do not fit `params`; adapters PEFT would compute
        differently (a tied embedding table, a trained leaf in an adapted module, DoRA on an
        embedding, DoRA on some kernels only, adapters on a classifier head); no adapters.

    >>> config = save_peft("/tmp/adapter", module, params, adapters)  # doctest: +SKIP
    """
    head = None
    if has_separate_head(module):
        module, params, adapters, trained, head = _split_head(module, params, adapters, trained)
    config, tensors = _adapter(directory, module, params, adapters, trained)
    config["base_model_name_or_path"] = base_model_name_or_path
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, names.WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(directory, names.CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)
    if head is None:
        remove_classifier_head(directory)
    else:
        write_classifier_head(directory, module.config, *head)
    return config


def _split_head(module, params, adapters, trained):
    """A mean/cls-pooled classifier as its encoder (`BertModel`) and its head's (kernel, bias)."""
    cfg = module.config
    trained = paths.flatten(trained) if trained else {}
    for path in lora.factors_by_path(adapters):
        if not path.startswith("bert/"):
            raise PeftFormatError(
                f"adapter {path}: the head of a {cfg.classifier_pooling!r}-pooled classifier is "
                f"saved whole ({HEAD_WEIGHTS}); train it fully or merge its adapters"
            )
    head = dict(params["classifier"])
    for path, value in trained.items():
        if path.startswith("bert/"):
            continue
        leaf = path.removeprefix("classifier/")
        if (
            leaf == path
            or leaf not in head
            or tuple(np.shape(value)) != tuple(np.shape(head[leaf]))
        ):
            raise PeftFormatError(
                f"trained leaf {path} {np.shape(value)} is not a leaf of this model's params"
            )
        head[leaf] = value
    encoder_adapters = {
        p.removeprefix("bert/"): f for p, f in lora.factors_by_path(adapters).items()
    }
    encoder_trained = {p.removeprefix("bert/"): v for p, v in trained.items() if p[:5] == "bert/"}
    return (
        BertModel(cfg),
        params["bert"],
        paths.unflatten(encoder_adapters),
        encoder_trained,
        (head["kernel"], head["bias"]),
    )


def _adapter(directory, module, params, adapters, trained) -> tuple[dict, dict]:
    """The adapter config and `{key: tensor}` PEFT would write, or a `PeftFormatError`."""
    cfg = module.config
    family = family_for_config(cfg)
    flat = paths.flatten(params)
    modules = names.modules(flat, family, cfg)
    factors = lora.factors_by_path(adapters)
    trained = paths.flatten(trained) if trained else {}
    if not factors:
        raise PeftFormatError(f"{directory}: no adapters to save (PEFT needs target modules)")
    tied = names.tied_table(module)
    tensors, kernels = {}, {}  # kernels: HF module -> Factors
    for path, f in factors.items():
        parts = tuple(path.split("/"))
        if path not in flat or parts[-1] not in names.WEIGHTS:
            raise PeftFormatError(f"adapter {path} is not a kernel or embedding of this model")
        if path == tied:
            raise PeftFormatError(
                f"adapter {path}: this table is also the tied LM head, which lorax_ft adapts "
                "too but PEFT does not; adapt another module or save the merged model"
            )
        stacked = checkpoint.is_stacked(parts, family, cfg)
        arrays = _check_factors(path, f, tuple(flat[path].shape), stacked)
        if f.magnitude is not None and parts[-1] == "embedding":
            raise PeftFormatError(f"adapter {path}: PEFT has no DoRA magnitude for embeddings")
        for layer in range(flat[path].shape[0]) if stacked else [None]:
            name = checkpoint.hf_module_name(parts, family, layer)
            kernels[name] = f
            a, b, m = (x if layer is None or x is None else x[layer] for x in arrays)
            if parts[-1] == "embedding":
                keys = (f"{name}.lora_embedding_A", f"{name}.lora_embedding_B")
            else:
                keys = (f"{name}.lora_A.weight", f"{name}.lora_B.weight")
            tensors[PREFIX + keys[0]] = np.ascontiguousarray(a.T)
            tensors[PREFIX + keys[1]] = np.ascontiguousarray(b.T)
            if m is not None:
                tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = np.ascontiguousarray(m)
    saved = _save_whole(module, flat, factors, trained, tied, tensors)
    config = _config(module, kernels, saved)
    _check_matching(config, kernels, saved, modules)
    return config, tensors


def _check_factors(path: str, f: lora.Factors, shape: tuple, stacked: bool):
    if isinstance(f, MixedFactors):
        raise PeftFormatError(
            f"adapter {path}: a mixed set (lf.mixed_adapters) holds several adapters; save each "
            "adapter of its list on its own"
        )
    stack = shape[:1] if stacked else ()
    if len(shape) != len(stack) + 2:
        raise PeftFormatError(f"adapter {path}: kernel of shape {shape} is not a 2-D weight")
    fan_in, fan_out = shape[len(stack) :]
    a, b = np.asarray(f.a), np.asarray(f.b)
    r = a.shape[-1]
    m = None if f.magnitude is None else np.asarray(f.magnitude)
    if a.shape != (*stack, fan_in, r) or b.shape != (*stack, r, fan_out):
        raise PeftFormatError(
            f"adapter {path}: A {a.shape} and B {b.shape} do not fit its kernel {shape} "
            f"(expected A {(*stack, fan_in, r)}, B {(*stack, r, fan_out)})"
        )
    if m is not None and m.shape != (*stack, fan_out):
        raise PeftFormatError(
            f"adapter {path}: DoRA magnitude {m.shape} does not fit its kernel {shape}"
        )
    if not (math.isfinite(f.scale) and f.scale > 0):
        raise PeftFormatError(f"adapter {path}: scale {f.scale} is not a positive number")
    return a, b, m


def _save_whole(module, flat, factors, trained, tied, tensors) -> set[str]:
    """Adds the tensors of every module holding a trained leaf; returns those module names."""
    cfg = module.config
    family = family_for_config(cfg)
    owners = {}  # lorax module path -> a trained leaf in it
    for path, value in trained.items():
        if path not in flat or tuple(np.shape(value)) != tuple(flat[path].shape):
            raise PeftFormatError(
                f"trained leaf {path} {np.shape(value)} is not a leaf of this model's params"
            )
        if path == tied:
            raise PeftFormatError(
                f"trained leaf {path}: this table is also the tied LM head; PEFT would save "
                "a copy used by the input lookup only"
            )
        owners.setdefault(path.rpartition("/")[0], path)
    if isinstance(module, BertForSequenceClassification):
        owners.setdefault("classifier", "classifier")  # PEFT's SEQ_CLS always saves the head
    saved = set()
    for owner, example in owners.items():
        for path in (p for p in flat if p.rpartition("/")[0] == owner):
            if path in factors:
                raise PeftFormatError(
                    f"{example} is trained and {path} has LoRA adapters: PEFT saves a module "
                    "either whole (modules_to_save) or adapted; merge the adapters or train both"
                )
            parts = tuple(path.split("/"))
            value = trained.get(path, flat[path])
            named = checkpoint.hf_leaf_tensors(parts, value, family, cfg)
            tensors.update({PREFIX + k: v for k, v in named.items()})
            saved.update(k.rpartition(".")[0] for k in named)
    return saved


def _task_type(module: Any) -> str:
    if isinstance(module, BertForSequenceClassification):
        return "SEQ_CLS"
    if isinstance(module, BertModel):
        return "FEATURE_EXTRACTION"
    return "CAUSAL_LM"


def _round(x: float) -> float | int:
    return round(x) if abs(x - round(x)) <= 1e-9 * abs(x) else x


def _config(module, kernels: dict, saved: set) -> dict:
    """PEFT's LoraConfig fields for these adapters; ranks/alphas off the default as patterns."""

    def alphas(rslora):
        return {
            n: _round(f.scale * (math.sqrt(f.rank) if rslora else f.rank))
            for n, f in kernels.items()
        }

    def untidiness(rslora):  # fewer distinct alphas, then whole numbers
        values = alphas(rslora).values()
        return len(set(values)), sum(not float(v).is_integer() for v in values), rslora

    rslora = min((False, True), key=untidiness)
    alpha = alphas(rslora)
    rank = {n: f.rank for n, f in kernels.items()}
    default_r = collections.Counter(rank.values()).most_common(1)[0][0]
    default_alpha = collections.Counter(alpha.values()).most_common(1)[0][0]
    dora = {n: f.magnitude is not None for n, f in kernels.items()}
    if len(set(dora.values())) > 1:
        plain = sorted(n for n, d in dora.items() if not d)[:3]
        raise PeftFormatError(
            f"DoRA on some kernels only (not on {plain}): PEFT's use_dora covers all of them"
        )
    dropouts = collections.Counter(f.dropout for f in kernels.values())
    return {
        "peft_type": "LORA",
        "task_type": _task_type(module),
        "base_model_name_or_path": None,
        "r": default_r,
        "lora_alpha": default_alpha,
        "lora_dropout": dropouts.most_common(1)[0][0],
        "target_modules": sorted(kernels),
        "rank_pattern": {n: r for n, r in sorted(rank.items()) if r != default_r},
        "alpha_pattern": {n: a for n, a in sorted(alpha.items()) if a != default_alpha},
        "use_rslora": rslora,
        "use_dora": next(iter(dora.values())),
        "modules_to_save": sorted(saved) or None,
        "bias": "none",
        "fan_in_fan_out": not family_for_config(module.config).transpose_kernels,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def _check_matching(config: dict, kernels: dict, saved: set, modules: dict) -> None:
    """PEFT's own matching of this config selects exactly these modules with these ranks."""
    every = names.all_module_names(modules)
    targeted = {n for n in every if names.is_targeted(config, n)}
    whole = {n for n in every if names.saved_whole(config, n)}
    for name, f in kernels.items():
        rank = names.pattern(config["rank_pattern"], name, config["r"])
        alpha = names.pattern(config["alpha_pattern"], name, config["lora_alpha"])
        info = AdapterInfo(rank, alpha, config["use_rslora"])
        if rank != f.rank or not math.isclose(info.scale, f.scale, rel_tol=1e-12):
            raise PeftFormatError(f"{name}: PEFT's patterns would give rank {rank} alpha {alpha}")
    if targeted != set(kernels) or whole != saved:
        extra = sorted((targeted - set(kernels)) | (whole - saved))[:3]
        raise PeftFormatError(f"PEFT's name matching would also select {extra}")
