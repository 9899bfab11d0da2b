"""The experiment config: its sections, their defaults, validation, and the spec it describes.

An experiment is a `configs/<name>.py` whose `get_config(arg)` starts from `default_config()` and
changes what it needs. `validate` runs before anything heavy and raises `ConfigError`, one line
naming the key and what would be valid, for an unknown key, a wrong type, a bad choice, a missing
file or a batch that does not divide the devices.

Sections: model, data, peft, optim, schedule, train, checkpoint, logging, mesh, sharding (see the
comments in `default_config`).
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import ml_collections

from lorax_ft.data import CHAT_FORMATS, default_data_config
from lorax_ft.errors import UserError
from lorax_ft.models.layers import REMAT_POLICIES
from lorax_ft.models.lora_targets import lora_targets
from lorax_ft.parallel import mesh as mesh_lib
from lorax_ft.parallel import sharding
from lorax_ft.training import optim
from lorax_ft.transform.spec import FULL_FINETUNE, Freeze, LoRA, Spec, SpecError, Train, parse_init

ConfigDict = ml_collections.ConfigDict


class ConfigError(UserError, ValueError):
    """A config that cannot run; the message names the key."""


CHOICES = {
    "model.task": ("classification", "causal_lm"),
    "model.dtype": ("float32", "bfloat16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "peft.mode": ("lora", "full"),
    "optim.name": optim.OPTIMIZERS,
    "schedule.name": optim.SCHEDULES,
    "train.on_nonfinite": ("stop", "skip"),
    "model.classifier_pooling": ("mean", "cls", "pooler"),
    "model.remat": ("none", *REMAT_POLICIES),
    "model.quantize": ("none", "int8", "nf4", "gguf"),
    "data.chat_format": tuple(CHAT_FORMATS),
}

# (lowest, highest, whether the bounds themselves are allowed): numbers outside these ranges
# crash (a division by zero, an allocation of terabytes) or train something other than asked.
RANGES = {
    "model.classifier_dropout": (0, 1, "[)"),
    "data.max_length": (2, math.inf, "[]"),  # an input token and the one it predicts
    "data.eval_fraction": (0, 1, "()"),
    "data.read_threads": (1, math.inf, "[]"),
    "data.prefetch_batches": (0, math.inf, "[]"),
    "peft.rank": (1, math.inf, "[]"),
    "peft.alpha": (0, math.inf, "()"),  # alpha 0 would train factors that change nothing
    "peft.dropout": (0, 1, "[)"),
    "optim.b1": (0, 1, "[)"),
    "optim.b2": (0, 1, "[)"),
    "optim.eps": (0, math.inf, "[]"),
    "optim.weight_decay": (0, math.inf, "[]"),
    "optim.momentum": (0, 1, "[)"),
    "optim.clip_norm": (0, math.inf, "[]"),
    "optim.loraplus_lr_ratio": (0, math.inf, "()"),
    "schedule.lr": (0, math.inf, "()"),
    "schedule.warmup_steps": (0, math.inf, "[]"),
    "schedule.total_steps": (0, math.inf, "[]"),  # 0: train.steps
    "schedule.end_lr_factor": (0, 1, "[]"),
    "train.batch_size": (1, math.inf, "[]"),
    "train.eval_batch_size": (1, math.inf, "[]"),
    "train.steps": (1, math.inf, "[]"),
    "train.grad_accum": (1, math.inf, "[]"),
    "train.log_every": (1, math.inf, "[]"),
    "train.eval_every": (0, math.inf, "[]"),  # 0: before training and at the end only
    "train.eval_steps": (0, math.inf, "[]"),  # 0: the whole eval split
    "train.checkpoint_every": (1, math.inf, "[]"),
    "train.max_new_tokens": (1, math.inf, "[]"),
    "checkpoint.keep": (1, math.inf, "[]"),
}


def default_config() -> ConfigDict:
    """Every key an experiment config may set, with its default."""
    config = ConfigDict()
    config.model = ConfigDict(
        {
            "preset": "",  # a named model shipped in a pip package (lorax_ft.models.presets)
            "path": "",  # or a Hugging Face directory / GGUF file
            "task": "classification",  # classification (encoder + head) or causal_lm
            "dtype": "float32",  # compute dtype
            "param_dtype": "float32",  # dtype the base weights are stored in
            "scan_layers": False,
            "remat": "none",
            "classifier_pooling": "mean",  # classification: mean, cls or pooler
            "classifier_dropout": 0.1,
            # The frozen base kept quantized in memory (QLoRA, lorax_ft.quant): none, int8 (per
            # output feature), nf4 (blocks of 64) or gguf (a .gguf file's Q4_0/Q4_1/Q8_0 blocks
            # as stored). The kernels of supported layers only; LoRA mode only.
            "quantize": "none",
            "double_quant": False,  # nf4: the block scales as int8 codes too (QLoRA's)
            "quantize_embeddings": False,  # also the embedding tables
        }
    )
    config.data = default_data_config()
    config.peft = ConfigDict(
        {
            "mode": "lora",  # lora, or full (every parameter trained)
            # A preset of the model family (attention-qv, attention-all, all-linear) or a regex
            # over parameter paths.
            "targets": "all-linear",
            "rank": 8,
            "alpha": 16.0,
            "dropout": 0.0,
            # kaiming or gaussian; or pissa, pissa_niter_<N>, olora: the factors start at a
            # rank-r part of each kernel and the base becomes the residual (PEFT's inits).
            "init": "kaiming",
            "rslora": False,
            "dora": False,  # DoRA: a learned magnitude per output feature (PEFT's use_dora)
            "train": "",  # regex of leaves trained fully in LoRA mode (a new head, say)
            # Ordered (regex or preset, action) rules before the shorthand above, first match
            # wins: the action is "train", "freeze" or a dict of LoRA settings (rank, alpha,
            # dropout, init, rslora, dora); settings it leaves out come from the keys above.
            # E.g. (("attention-qv", {"rank": 16}),) with targets="all-linear", rank=4: rank
            # 16 on q and v and 4 elsewhere (PEFT's rank_pattern/alpha_pattern).
            "rules": (),
            # A PEFT adapter directory (adapter_config.json + adapter_model.safetensors) to start
            # from instead of fresh factors; it must fit the settings above exactly.
            "init_from": "",
        }
    )
    config.optim = optim.default_optim_config()
    config.schedule = optim.default_schedule_config()
    config.train = ConfigDict(
        {
            "batch_size": 32,  # global, across all devices and processes
            "eval_batch_size": 64,
            "steps": 100,
            "grad_accum": 1,  # micro-batches per optimizer step (batch_size = their total)
            "seed": 0,
            "log_every": 10,
            "eval_every": 0,  # 0: evaluate before training and at the end only
            "eval_steps": 0,  # 0: the whole eval split
            "checkpoint_every": 50,
            "on_nonfinite": "stop",  # stop (keep the last good checkpoint) or skip the step
            # causal_lm: prompts (user messages for chat data) completed before and after training
            "sample_prompts": (),
            "max_new_tokens": 32,
        }
    )
    config.checkpoint = ConfigDict({"keep": 2, "use_async": True})
    config.logging = ConfigDict({"tensorboard": True, "plots": True, "progress": True})
    # Device mesh sizes; one may be -1 (the rest). data: batch only; fsdp: batch, and parameters
    # and optimizer state split (ZeRO-3); tensor: layers' feature axes split (Megatron).
    config.mesh = mesh_lib.data_parallel()
    config.sharding = ConfigDict(
        {
            # (logical axis name, mesh axis or None): parameters of lorax_ft.models carry logical
            # axis names; the first rule for a name whose mesh axis is free and divides wins.
            "logical_rules": sharding.DEFAULT_RULES,
            # (regex over parameter paths, (mesh axis or None, ...) per dimension): first full
            # match wins over the logical rules; for models without logical axis names.
            "path_rules": (),
        }
    )
    return config


def validate(config: ConfigDict, num_devices: int | None = None, process_count: int = 1) -> None:
    """Raises ConfigError on the first problem found.

    With `num_devices`, also checks the mesh, the sharding rules and that batches divide over
    the devices that split them and over the processes that read them.
    """
    _check_keys(config, default_config(), "")
    for key, valid in CHOICES.items():
        section, name = key.split(".")
        if config[section][name] not in valid:
            raise ConfigError(f"{key}={config[section][name]!r} is not one of {valid}")
    model = config.model
    if bool(model.preset) == bool(model.path):
        raise ConfigError("set exactly one of model.preset (a named model) and model.path")
    if model.path and not os.path.exists(model.path):
        raise ConfigError(f"model.path={model.path!r} does not exist")
    for key in ("path", "train_path", "eval_path"):
        value = config.data.get(key)
        if value and not os.path.exists(value):
            raise ConfigError(f"data.{key}={value!r} does not exist")
    try:
        parse_init(config.peft.init)
    except SpecError as e:
        raise ConfigError(f"peft.init={config.peft.init!r}: {e}") from None
    init_from = config.peft.init_from
    if init_from and not os.path.isfile(os.path.join(init_from, "adapter_config.json")):
        raise ConfigError(
            f"peft.init_from={init_from!r} is not a PEFT adapter directory (no adapter_config.json)"
        )
    if init_from and config.peft.mode != "lora":
        raise ConfigError("peft.init_from starts adapters: it needs peft.mode='lora'")
    for key, bounds in RANGES.items():
        section, name = key.split(".")
        _check_range(key, config[section][name], *bounds)
    _check_rules(config.peft.rules)
    if model.quantize != "none" and config.peft.mode != "lora":
        raise ConfigError(
            f"model.quantize={model.quantize!r} keeps the base frozen and quantized: it needs "
            "peft.mode='lora' (full fine-tuning trains every weight; use model.quantize='none')"
        )
    if model.double_quant and model.quantize != "nf4":
        raise ConfigError(
            f"model.double_quant=True quantizes nf4's block scales; model.quantize is "
            f"{model.quantize!r} (set it to 'nf4', or double_quant to False)"
        )
    if model.quantize == "gguf":
        _check_gguf_base(config)
    if config.peft.mode == "lora" and not (config.peft.targets or config.peft.rules):
        raise ConfigError(
            "peft.mode='lora' adapts nothing: set peft.targets (a preset or a regex) or peft.rules"
        )
    for key in ("lr_mults", "wd_mults"):
        for index, rule in enumerate(config.optim[key]):
            if not _is_multiplier_rule(rule):
                raise ConfigError(
                    f"optim.{key}[{index}]={rule!r} must be (regex, multiplier >= 0), e.g. "
                    "('params/.*/kernel', 0.5)"
                )
    train, schedule = config.train, config.schedule
    total = total_steps(config)
    if schedule.name == "constant" and schedule.warmup_steps:
        raise ConfigError(
            f"schedule.warmup_steps={schedule.warmup_steps} is not used by the constant schedule; "
            "set it to 0 or use schedule.name='warmup_cosine' or 'warmup_linear'"
        )
    if schedule.warmup_steps > total:
        raise ConfigError(
            f"schedule.warmup_steps={schedule.warmup_steps} is longer than the {total} steps of "
            "the schedule (schedule.total_steps, or train.steps when it is 0)"
        )
    if train.batch_size % train.grad_accum:
        raise ConfigError(
            f"train.batch_size={train.batch_size} is not divisible by "
            f"train.grad_accum={train.grad_accum}"
        )
    if num_devices is not None:
        _check_mesh(config, num_devices, process_count)


GGUF_MAGIC = b"GGUF"


def _check_gguf_base(config: ConfigDict) -> None:
    """`model.quantize='gguf'` trains on a GGUF file's blocks: the model must be one, and no
    init may change its kernels (PiSSA/OLoRA residuals would need blocks of their own)."""
    from lorax_ft.models.presets import PRESETS

    model = config.model
    preset = PRESETS.get(model.preset)
    if preset is not None:
        is_gguf = preset.relative_path.endswith(".gguf")
    elif model.path:
        is_gguf = os.path.isfile(model.path) and _starts_with(model.path, GGUF_MAGIC)
    else:
        return  # an unknown preset: loading names it
    if not is_gguf:
        gguf_presets = ", ".join(n for n, p in PRESETS.items() if p.relative_path.endswith(".gguf"))
        raise ConfigError(
            f"model.quantize='gguf' needs a .gguf model.path or a GGUF preset ({gguf_presets}); "
            f"{model.preset or model.path!r} is not one (use model.quantize='nf4' or 'int8')"
        )
    inits = [config.peft.init] + [
        action.get("init", config.peft.init)
        for _, action in config.peft.rules
        if isinstance(action, dict | ConfigDict)
    ]
    changing = [i for i in inits if _init_method(i) in ("pissa", "olora")]
    if changing:
        raise ConfigError(
            f"peft.init={changing[0]!r} makes the base a residual, but model.quantize='gguf' "
            "keeps the file's blocks as they are; use model.quantize='nf4' (the residual is "
            "quantized) or peft.init='kaiming'"
        )


def _init_method(init) -> str | None:
    try:
        return parse_init(init)[0]
    except SpecError:  # a bad init in a rule: peft_spec names it
        return None


def _starts_with(path: str, magic: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(magic)) == magic


def total_steps(config: ConfigDict) -> int:
    """The steps the learning-rate schedule spans: `schedule.total_steps`, or `train.steps`."""
    return config.schedule.total_steps or config.train.steps


def resolve(config: ConfigDict) -> ConfigDict:
    """A copy with the values other keys imply filled in (`schedule.total_steps`), so that
    `--config.train.steps=8` also ends the learning-rate schedule at step 8."""
    config = config.copy_and_resolve_references()
    config.schedule.total_steps = total_steps(config)
    return config


def _check_range(key: str, value, low, high, closed: str) -> None:
    below = value < low if closed[0] == "[" else value <= low
    above = value > high if closed[1] == "]" else value >= high
    if below or above or math.isnan(value):
        if high == math.inf:
            valid = f"{'>=' if closed[0] == '[' else '>'} {low}"
        else:
            valid = f"in {closed[0]}{low}, {high}{closed[1]}"
        raise ConfigError(f"{key}={value!r} must be {valid}")


def _check_mesh(config: ConfigDict, num_devices: int, process_count: int) -> None:
    try:
        sizes = mesh_lib.mesh_shape(config.mesh, num_devices)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for index, rule in enumerate(config.sharding.logical_rules):
        axes = rule[1] if len(rule) == 2 else None
        named = sharding.axes_tuple(axes)
        if len(rule) != 2 or not isinstance(rule[0], str) or set(named) - set(sizes):
            raise ConfigError(
                f"sharding.logical_rules[{index}]={tuple(rule)!r} must be (logical name, mesh "
                f"axis or None) with mesh axes in {tuple(sizes)}"
            )
    for index, rule in enumerate(config.sharding.path_rules):
        named = [a for e in (rule[1] if len(rule) == 2 else ()) for a in sharding.axes_tuple(e)]
        if len(rule) != 2 or not _is_regex(rule[0]) or set(named) - set(sizes):
            raise ConfigError(
                f"sharding.path_rules[{index}]={tuple(rule)!r} must be (regex, (mesh axis or "
                f"None, ...)) with mesh axes in {tuple(sizes)}"
            )
    train = config.train
    ways = sizes["data"] * sizes["fsdp"]
    described = f"mesh data={sizes['data']} × fsdp={sizes['fsdp']}"
    for key, size in (
        ("batch_size // grad_accum", train.batch_size // train.grad_accum),
        ("eval_batch_size", train.eval_batch_size),
    ):
        if size % ways or size % process_count:
            multiple = math.lcm(ways, process_count)
            raise ConfigError(
                f"train.{key}={size} does not divide over the {ways} devices that split the "
                f"batch ({described}) and {process_count} process(es); use a multiple of "
                f"{multiple}"
            )


def _is_regex(pattern) -> bool:
    try:
        re.compile(pattern)
    except (re.error, TypeError):
        return False
    return True


def _is_multiplier_rule(rule) -> bool:
    if not isinstance(rule, tuple | list) or len(rule) != 2:
        return False
    regex, mult = rule
    number = isinstance(mult, int | float) and not isinstance(mult, bool)
    return isinstance(regex, str) and _is_regex(regex) and number and 0 <= mult < math.inf


def _check_keys(config: ConfigDict, schema: ConfigDict, prefix: str) -> None:
    for key, value in config.items():
        name = f"{prefix}{key}"
        if key not in schema:
            raise ConfigError(
                f"unknown config key {name!r}; valid keys{' in ' + prefix[:-1] if prefix else ''}: "
                + ", ".join(sorted(schema.keys()))
            )
        expected = schema[key]
        if isinstance(expected, ConfigDict):
            if not isinstance(value, ConfigDict):
                raise ConfigError(f"config key {name!r} must be a section, got {value!r}")
            _check_keys(value, expected, name + ".")
        elif not _type_ok(value, expected):
            raise ConfigError(
                f"config key {name!r} must be {type(expected).__name__}, got "
                f"{type(value).__name__} {value!r}"
            )


def _type_ok(value: Any, expected: Any) -> bool:
    if expected is None:
        return True
    if isinstance(expected, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(expected, bool)
    if isinstance(expected, float):
        return isinstance(value, int | float)
    if isinstance(expected, tuple | list):
        return isinstance(value, tuple | list)
    return isinstance(value, type(expected))


def parse_variant(
    arg: str | None, name: str, modes: tuple[str, ...] = ("lora", "full")
) -> tuple[str, bool]:
    """A config file's argument `MODE[,tiny]` -> `(mode, tiny)`, MODE one of `modes` (the first
    is the default).

    >>> parse_variant("full,tiny", "bbc_minilm")
    ('full', True)
    >>> parse_variant("qlora", "smollm2_shakespeare", ("lora", "full", "qlora"))
    ('qlora', False)
    """
    args = set((arg or modes[0]).split(","))
    chosen = args & set(modes)
    if args - {*modes, "tiny"} or len(chosen) > 1:
        raise ConfigError(f"{name} arguments are {'|'.join(modes)}[,tiny], got {arg!r}")
    return (chosen.pop() if chosen else modes[0]), "tiny" in args


def shrink_to_tiny(config: ConfigDict, *, max_length: int, steps: int) -> None:
    """A seconds-long variant: a few short steps on small batches, one eval batch, checkpoints."""
    config.data.max_length = max_length
    config.train.batch_size = 8  # one example per simulated test device
    config.train.eval_batch_size = 8
    config.train.steps = steps
    config.train.eval_every = 0
    config.train.eval_steps = 1
    config.train.log_every = 1
    config.train.checkpoint_every = 2
    config.train.max_new_tokens = 2
    config.schedule.warmup_steps = 1


TARGET_PRESETS = ("attention-qv", "attention-all", "all-linear")


LORA_SETTINGS = ("rank", "alpha", "dropout", "init", "rslora", "dora")
"""The keys of a `peft.rules` LoRA action; each defaults to the peft key of the same name."""


def peft_spec(peft: ConfigDict, model_config: Any) -> Spec:
    """The `Spec` a peft section describes; `model_config` resolves target presets.

    The rules of `peft.rules` come first, in order, then the shorthand: `targets` adapted with
    `rank`, `alpha`, ... and `train` trained fully. A preset in a rule stands for its patterns.
    """
    if peft.mode == "full":
        return FULL_FINETUNE
    rules = []
    for index, (target, action) in enumerate(peft.rules):
        where = f"peft.rules[{index}]"
        for pattern in _patterns(target, model_config):
            rules.append((pattern, _rule_action(action, peft, where)))
    if peft.targets:
        shorthand = _rule_action({}, peft, "peft")
        rules += [(pattern, shorthand) for pattern in _patterns(peft.targets, model_config)]
    if peft.train:
        rules.append((peft.train, Train()))
    try:
        return Spec(rules)
    except SpecError as e:
        raise ConfigError(f"peft: {e}") from None


def _patterns(target: str, model_config: Any) -> tuple[str, ...]:
    if target in TARGET_PRESETS:
        return lora_targets(model_config, target)
    return (target,)


def _rule_action(action, peft: ConfigDict, where: str):
    if action in ("train", "freeze"):
        return Train() if action == "train" else Freeze()
    settings = {key: peft[key] for key in LORA_SETTINGS}
    settings.update(action)
    try:
        return LoRA(**settings)
    except SpecError as e:
        raise ConfigError(f"{where}: {e}") from None


def _check_rules(rules) -> None:
    """One line naming `peft.rules[i]` for a rule that is not (regex or preset, action)."""
    if not isinstance(rules, tuple | list):
        raise ConfigError(f"peft.rules must be a list of (regex or preset, action), got {rules!r}")
    for index, rule in enumerate(rules):
        where = f"peft.rules[{index}]={rule!r}"
        if not (isinstance(rule, tuple | list) and len(rule) == 2 and _is_regex(rule[0])):
            raise ConfigError(
                f"{where} must be (regex or preset, action), e.g. ('attention-qv', "
                "{'rank': 16}) or ('.*/norm/.*', 'train')"
            )
        action = rule[1]
        if isinstance(action, str):
            if action not in ("train", "freeze"):
                raise ConfigError(f"{where}: action must be 'train', 'freeze' or a dict")
        elif not isinstance(action, dict | ConfigDict):
            raise ConfigError(f"{where}: action must be 'train', 'freeze' or a dict")
        else:
            unknown = sorted(set(action) - set(LORA_SETTINGS))
            if unknown:
                raise ConfigError(
                    f"{where}: unknown LoRA setting {unknown[0]!r}; valid: "
                    + ", ".join(LORA_SETTINGS)
                )
