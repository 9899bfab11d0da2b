"""Optimizers and learning-rate schedules from config, partitioned by the variable labels.

`make_optimizer(config, labels)` returns one `optax.GradientTransformation` that works on the
trainable variables (or on all of them): global-norm clipping, then `optax.partition` over the
labels, where frozen leaves get `optax.set_to_zero()` and therefore no optimizer state.
Weight decay is masked off biases and norm scales (1-D leaves, or leaves named `bias`/`scale`).
LoRA+ (PEFT's `loraplus_lr_ratio`) trains the B factors with a larger learning rate.

>>> import ml_collections
>>> config = ml_collections.ConfigDict(
...     {"optim": default_optim_config(), "schedule": default_schedule_config()})
>>> config.optim.name = "adamw"; config.schedule.total_steps = 100
>>> tx = make_optimizer(config, labels)   # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import ml_collections
import optax

from lorax_ft import paths
from lorax_ft.spec import FROZEN, LORA

PyTree = Any
OPTIMIZERS = ("adamw", "adam", "sgd", "adafactor", "lion")
SCHEDULES = ("constant", "warmup_cosine", "warmup_linear")
_NO_DECAY_NAMES = ("bias", "scale")


def default_optim_config() -> ml_collections.ConfigDict:
    """The optimizer section of an experiment config, with its defaults."""
    return ml_collections.ConfigDict(
        {
            "name": "adamw",  # one of OPTIMIZERS
            "b1": 0.9,
            "b2": 0.999,
            "eps": 1e-8,
            "weight_decay": 0.0,  # decoupled (AdamW-style); never on biases or norm scales
            "momentum": 0.9,  # sgd only
            "nesterov": False,  # sgd only
            "clip_norm": 1.0,  # global-norm clipping; 0 turns it off
            "loraplus_lr_ratio": 1.0,  # LoRA+: learning-rate multiplier for the B factors
        }
    )


def default_schedule_config() -> ml_collections.ConfigDict:
    """The schedule section of an experiment config, with its defaults."""
    return ml_collections.ConfigDict(
        {
            "name": "warmup_cosine",  # one of SCHEDULES
            "lr": 1e-3,  # peak learning rate
            "warmup_steps": 0,
            "total_steps": 0,  # the steps the decay spans; 0 in an experiment: train.steps
            "end_lr_factor": 0.0,  # final lr = lr * end_lr_factor (cosine and linear decay)
        }
    )


def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """A learning-rate schedule from a `schedule` config section."""
    lr, warmup, total = config.lr, config.warmup_steps, config.total_steps
    end = lr * config.end_lr_factor
    if config.name == "constant":
        return optax.constant_schedule(lr)
    if total < 1:  # an unset length would decay to the end value right after the warmup
        raise ValueError(f"schedule.total_steps={total}: a {config.name} schedule needs its length")
    if config.name == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total, warmup + 1), end)
    if config.name == "warmup_linear":
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, lr, warmup),
                optax.linear_schedule(lr, end, max(total - warmup, 1)),
            ],
            [warmup],
        )
    raise ValueError(f"schedule.name={config.name!r} is not one of {SCHEDULES}")


def _decay_mask(tree: PyTree) -> PyTree:
    return paths.map_with_path(
        lambda p, x: x.ndim >= 2 and p.rsplit("/", 1)[-1] not in _NO_DECAY_NAMES, tree
    )


def _base_optimizer(config: ml_collections.ConfigDict, lr: optax.Schedule):
    wd = config.weight_decay
    if config.name == "adamw":
        return optax.adamw(lr, config.b1, config.b2, config.eps, weight_decay=wd, mask=_decay_mask)
    if config.name == "adam":
        return optax.adam(lr, config.b1, config.b2, config.eps)
    if config.name == "sgd":
        return optax.chain(
            optax.add_decayed_weights(wd, _decay_mask) if wd else optax.identity(),
            optax.sgd(lr, config.momentum or None, config.nesterov),
        )
    if config.name == "adafactor":
        return optax.adafactor(lr, weight_decay_rate=wd or None, weight_decay_mask=_decay_mask)
    if config.name == "lion":
        return optax.lion(lr, config.b1, config.b2, weight_decay=wd, mask=_decay_mask)
    raise ValueError(f"optim.name={config.name!r} is not one of {OPTIMIZERS}")


def optimizer_labels(labels: PyTree) -> dict[str, str]:
    """`{path: group}`: the variable labels, with LoRA B factors in their own group for LoRA+."""
    return {
        p: "lora_b" if lab == LORA and p.endswith("/b") else lab
        for p, lab in paths.flatten(labels).items()
    }


def make_optimizer(
    config: ml_collections.ConfigDict, labels: PyTree
) -> optax.GradientTransformation:
    """The optimizer for a fine-tune: clip, then per-label transforms (frozen: no state).

    Args:
      config: a config with `optim` and `schedule` sections (see the defaults above).
      labels: the variable labels from `partition.variable_labels`.

    Returns:
      A transformation whose `init` accepts the trainable variables (or all variables).
    """
    by_path = optimizer_labels(labels)
    schedule = make_schedule(config.schedule)
    ratio = config.optim.loraplus_lr_ratio
    transforms = {
        "lora": _base_optimizer(config.optim, schedule),
        "lora_b": _base_optimizer(config.optim, lambda step: ratio * schedule(step)),
        "train": _base_optimizer(config.optim, schedule),
        FROZEN: optax.set_to_zero(),
    }
    partitioned = optax.partition(
        transforms, lambda tree: paths.map_with_path(lambda p, _: by_path[p], tree)
    )
    clip = config.optim.clip_norm
    return optax.chain(optax.clip_by_global_norm(clip), partitioned) if clip else partitioned
