"""Optimizers and learning-rate schedules from config, partitioned by the variable labels.

`make_optimizer(config, labels)` returns one `optax.GradientTransformation` that works on the
trainable variables (or on all of them): global-norm clipping, then `optax.partition` over groups
of leaves, where frozen leaves get `optax.set_to_zero()` and therefore no optimizer state.

Trainable leaves are grouped by label and by their learning-rate and weight-decay multipliers,
big_vision's `lr_mults` and `wd_mults`: ordered `(regex, multiplier)` rules (`lorax_ft.transform.rules`)
over the variables' `/`-joined paths, such as `params/encoder/layer_0/attention/self/query/kernel`
or `lora/encoder/layer_0/attention/self/query/kernel/a`. Each group gets its own optimizer with
the schedule scaled by its learning-rate multiplier and decay `weight_decay × its multiplier`.
Leaves no `wd_mults` rule matches keep the default: decay on matrices, never on biases, norm
scales and DoRA magnitudes (1-D leaves, or leaves named `bias`/`scale`/`magnitude`, which a
layer stack makes 2-D). LoRA+ (PEFT's `loraplus_lr_ratio`) multiplies the learning rate of the
B factors, the `b` field of every `Factors` node, and of DoRA's magnitudes, as PEFT's
`create_loraplus_optimizer` does (it puts every 1-D trainable parameter in B's group).
`make_optimizer(tx, labels)` takes a ready optax transformation for the trainable leaves instead.

>>> import ml_collections
>>> config = ml_collections.ConfigDict(
...     {"optim": default_optim_config(), "schedule": default_schedule_config()})
>>> config.optim.name = "adamw"; config.schedule.total_steps = 100
>>> tx = make_optimizer(config, labels)   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import jax
import ml_collections
import optax

from lorax_ft.transform import paths
from lorax_ft.transform.lora import Factors
from lorax_ft.transform.rules import Rules
from lorax_ft.transform.spec import FROZEN, LORA, TRAIN

PyTree = Any
OPTIMIZERS = ("adamw", "adam", "sgd", "adafactor", "lion")
SCHEDULES = ("constant", "warmup_cosine", "warmup_linear")
_NO_DECAY_NAMES = ("bias", "scale", "magnitude")
LORA_B = "lora_b"
"""The group of LoRA B factors (and DoRA magnitudes), apart for LoRA+."""


def default_optim_config() -> ml_collections.ConfigDict:
    """The optimizer section of an experiment config, with its defaults."""
    return ml_collections.ConfigDict(
        {
            "name": "adamw",  # one of OPTIMIZERS
            "b1": 0.9,
            "b2": 0.999,
            "eps": 1e-8,
            "weight_decay": 0.0,  # decoupled (AdamW-style); by default on matrices only
            "momentum": 0.9,  # sgd only
            "nesterov": False,  # sgd only
            "clip_norm": 1.0,  # global-norm clipping; 0 turns it off
            "loraplus_lr_ratio": 1.0,  # LoRA+: learning-rate multiplier for the B factors
            # (regex, multiplier) over trainable variable paths (params/<path>,
            # lora/<kernel path>/a or /b); first full match wins, unmatched leaves: 1.
            "lr_mults": (),
            # (regex, multiplier), weight decay = weight_decay × multiplier (0: none); unmatched
            # leaves keep the default: decay on matrices, not on biases and norm scales.
            "wd_mults": (),
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


def _base_optimizer(
    config: ml_collections.ConfigDict, lr: optax.Schedule, wd_mult: float | None = None
):
    wd, mask = config.weight_decay, _decay_mask
    if wd_mult is not None:  # a wd_mults rule decides for every leaf of the group
        wd, mask = wd * wd_mult, None
    if config.name == "adamw":
        return optax.adamw(lr, config.b1, config.b2, config.eps, weight_decay=wd, mask=mask)
    if config.name == "adam":
        return optax.adam(lr, config.b1, config.b2, config.eps)
    if config.name == "sgd":
        return optax.chain(
            optax.add_decayed_weights(wd, mask) if wd else optax.identity(),
            optax.sgd(lr, config.momentum or None, config.nesterov),
        )
    if config.name == "adafactor":
        return optax.adafactor(lr, weight_decay_rate=wd or None, weight_decay_mask=mask)
    if config.name == "lion":
        return optax.lion(lr, config.b1, config.b2, weight_decay=wd, mask=mask)
    raise ValueError(f"optim.name={config.name!r} is not one of {OPTIMIZERS}")


class Group(NamedTuple):
    """The optimizer group of a leaf: leaves with equal groups share one optimizer."""

    label: str  # 'lora', 'lora_b' (a B factor), 'train' or 'frozen'
    lr_mult: float = 1.0  # the schedule's multiplier (LoRA+'s ratio included)
    wd_mult: float | None = None  # None: the default decay mask (matrices only)


def leaf_groups(optim_config: ml_collections.ConfigDict, labels: PyTree) -> dict[str, Group]:
    """`{variable path: Group}` from the variable labels and the `optim` section's rules.

    Raises:
      RuleError: an `optim.lr_mults` or `optim.wd_mults` rule that matches no trainable leaf.
    """
    flat = paths.flatten(_with_b_factors(labels))
    trainable = [p for p, label in flat.items() if label != FROZEN]
    where = " (over the trainable variables)"
    lr = Rules(optim_config.lr_mults, what="optim.lr_mults" + where).match(trainable, 1.0)
    wd = Rules(optim_config.wd_mults, what="optim.wd_mults" + where).match(trainable)
    ratio = {LORA_B: optim_config.loraplus_lr_ratio}
    return {
        p: Group(label, lr[p] * ratio.get(label, 1.0), wd[p]) if label != FROZEN else Group(FROZEN)
        for p, label in flat.items()
    }


def _with_b_factors(labels: PyTree) -> PyTree:
    """The labels with each LoRA B factor and DoRA magnitude of a `Factors` node as `lora_b`."""
    is_factors = lambda x: isinstance(x, Factors)

    def relabel(x):
        if not is_factors(x):
            return x
        if x.b == LORA:
            x = x.replace(b=LORA_B)
        if x.magnitude == LORA:
            x = x.replace(magnitude=LORA_B)
        return x

    return jax.tree.map(relabel, labels, is_leaf=is_factors)


def _group_names(groups: Iterable[Group], loraplus_lr_ratio: float) -> dict[Group, str]:
    # The groups without multipliers keep their label as name, whether or not they have leaves,
    # so a config without lr_mults/wd_mults has the same optimizer state as ever.
    names = {Group(label): label for label in (LORA, TRAIN, FROZEN)}
    names[Group(LORA_B, loraplus_lr_ratio)] = LORA_B
    for group in groups:
        names.setdefault(group, f"{group.label}_{len(names)}")
    return names


def _scaled(schedule: optax.Schedule, mult: float) -> optax.Schedule:
    return schedule if mult == 1 else lambda step: mult * schedule(step)


def make_optimizer(
    config_or_tx: ml_collections.ConfigDict | optax.GradientTransformation, labels: PyTree
) -> optax.GradientTransformation:
    """The optimizer for a fine-tune: per-group transforms over the labels (frozen: no state).

    From a config: global-norm clipping, then one optimizer per `Group` of leaves (see the module
    docstring). From an optax transformation: that transformation for all trainable leaves
    together (as one tree, so a global norm inside it spans them all) and nothing added.

    Args:
      config_or_tx: a config with `optim` and `schedule` sections (see the defaults above), or
        an `optax.GradientTransformation`.
      labels: the variable labels from `partition.variable_labels`.

    Returns:
      A transformation whose `init` accepts the trainable variables (or all variables).

    Raises:
      RuleError: an `optim.lr_mults` or `optim.wd_mults` rule that matches no trainable leaf.

    >>> import jax.numpy as jnp
    >>> labels = {"params": {"emb": "frozen", "w": "train"}, "lora": {}}
    >>> variables = {"params": {"emb": jnp.ones(3), "w": jnp.ones(2)}, "lora": {}}
    >>> tx = make_optimizer(optax.sgd(0.5), labels)
    >>> tx.update(variables, tx.init(variables))[0]["params"]
    {'emb': Array([0., 0., 0.], dtype=float32), 'w': Array([-0.5, -0.5], dtype=float32)}
    """
    if isinstance(config_or_tx, optax.GradientTransformation):
        flat = paths.flatten(labels)
        by_path = {p: FROZEN if label == FROZEN else "trainable" for p, label in flat.items()}
        transforms = {"trainable": config_or_tx, FROZEN: optax.set_to_zero()}
        return optax.partition(transforms, _labeller(by_path))
    config = config_or_tx
    groups = leaf_groups(config.optim, labels)
    names = _group_names(groups.values(), config.optim.loraplus_lr_ratio)
    schedule = make_schedule(config.schedule)
    transforms = {
        name: optax.set_to_zero()
        if group.label == FROZEN
        else _base_optimizer(config.optim, _scaled(schedule, group.lr_mult), group.wd_mult)
        for group, name in names.items()
    }
    partitioned = optax.partition(transforms, _labeller({p: names[g] for p, g in groups.items()}))
    clip = config.optim.clip_norm
    return optax.chain(optax.clip_by_global_norm(clip), partitioned) if clip else partitioned


def _labeller(by_path: dict[str, str]):
    # A function of the tree, not a fixed tree: `init` may get all variables or the trainable
    # ones alone (frozen leaves None).
    return lambda tree: paths.map_with_path(lambda p, _: by_path[p], tree)
