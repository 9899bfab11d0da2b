"""Config validation: each bad config is one clear error naming the key."""

import jax
import jax.numpy as jnp
import pytest

import lorax_ft as lf
from configs import bbc_minilm, smollm2_chatterbot, smollm2_shakespeare
from lorax_ft.run import config as config_lib
from lorax_ft.transform import lora
from lorax_ft.transform.spec import FULL_FINETUNE, LoRA, Train


@pytest.mark.parametrize("module", [bbc_minilm, smollm2_chatterbot, smollm2_shakespeare])
@pytest.mark.parametrize("arg", ["lora", "full", "lora,tiny", "full,tiny"])
def test_shipped_configs_validate(module, arg):
    config = module.get_config(arg)
    config_lib.validate(config, num_devices=8)
    assert config.peft.mode == arg.split(",")[0]


def test_config_arguments_are_checked():
    with pytest.raises(ValueError, match="lora\\|full\\|qlora\\[,tiny\\]"):
        bbc_minilm.get_config("lora,full")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.train.__setattr__("batchsize", 8), "unknown config key 'train.batchsize'"),
        (lambda c: c.__setattr__("trainer", {}), "unknown config key 'trainer'; valid keys: "),
        (lambda c: c.train.__setitem__("steps", 2.5), None),  # ConfigDict itself refuses
        (lambda c: c.model.__setattr__("preset", ""), "set exactly one of model.preset"),
        (lambda c: c.data.__setattr__("path", "/no/file"), "data.path='/no/file' does not exist"),
        (lambda c: c.schedule.__setattr__("name", "cyclic"), "schedule.name='cyclic' is not one"),
        (lambda c: c.train.__setattr__("grad_accum", 3), "not divisible by train.grad_accum=3"),
        (lambda c: c.train.__setattr__("batch_size", 20), "does not divide over the 8 devices"),
        (lambda c: c.mesh.__setattr__("fsdp", 3), "mesh data=-1 × fsdp=3 × tensor=1 does not fit"),
        (lambda c: c.mesh.update(data=1, fsdp=-1, tensor=-1), "are all -1"),
        # With tensor=4 only data=2 devices split the batch: 6 would do, 5 does not.
        (
            lambda c: c.update_from_flattened_dict({"mesh.tensor": 4, "train.batch_size": 5}),
            r"batch_size // grad_accum=5 does not divide over the 2 devices that split the batch "
            r"\(mesh data=2 × fsdp=1\)",
        ),
        (
            lambda c: c.sharding.__setattr__("logical_rules", (("embed", "fsdpp"),)),
            r"sharding.logical_rules\[0\]=\('embed', 'fsdpp'\) must be",
        ),
        (
            lambda c: c.sharding.__setattr__("path_rules", (("bert/(", ("fsdp",)),)),
            r"sharding.path_rules\[0\]=.* must be \(regex",
        ),
        (
            lambda c: c.optim.__setattr__("lr_mults", (("bert/.*", 0.5), ("(", 2.0))),
            r"optim.lr_mults\[1\]=\('\(', 2.0\) must be \(regex, multiplier >= 0\)",
        ),
        (
            lambda c: c.optim.__setattr__("wd_mults", ((".*", -1.0),)),
            r"optim.wd_mults\[0\]=\('.\*', -1.0\) must be \(regex, multiplier >= 0\)",
        ),
        (lambda c: c.optim.__setattr__("wd_mults", ((".*",),)), r"optim.wd_mults\[0\]="),
        (lambda c: c.optim.__setattr__("lr_mults", ((".*", "2"),)), r"optim.lr_mults\[0\]="),
        (lambda c: c.optim.__setattr__("lr_mults", ((".*", True),)), r"optim.lr_mults\[0\]="),
        (lambda c: c.peft.__setattr__("rules", (("(", "train"),)), r"peft.rules\[0\]=.* must be"),
        (lambda c: c.peft.__setattr__("rules", (("q", "adapt"),)), r"action must be 'train'"),
        (
            lambda c: c.peft.__setattr__("rules", ((".*", "train"), ("q", {"rnk": 4}))),
            r"peft.rules\[1\]=.*unknown LoRA setting 'rnk'; valid: rank, alpha",
        ),
        (lambda c: c.peft.__setattr__("targets", ""), "peft.mode='lora' adapts nothing"),
    ],
)
def test_each_bad_config_names_its_key(edit, message):
    config = bbc_minilm.get_config("lora")
    if message is None:
        with pytest.raises(TypeError):
            edit(config)
        return
    edit(config)
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(config, num_devices=8)


def test_multiplier_rules_are_config_data():
    """`optim.lr_mults` / `optim.wd_mults` set in a config file validate and reach the optimizer."""
    from lorax_ft.models import BertConfig
    from lorax_ft.training import optim

    config = bbc_minilm.get_config("lora")
    config.peft.targets = r".*/self/value/kernel"
    config.optim.lr_mults = ((r"lora/.*/value/kernel/.", 0.5), ("params/classifier/.*", 10))
    config.optim.wd_mults = ((r"lora/.*", 0.0),)
    config_lib.validate(config, num_devices=8)
    spec = config_lib.peft_spec(config.peft, BertConfig(num_hidden_layers=1))
    params = {
        "bert": {"encoder": {"layer_0": {"attention": {"self": {"value": {"kernel": (16, 16)}}}}}},
        "classifier": {"kernel": (16, 2)},
    }
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), params, is_leaf=_shape)
    adapters = jax.eval_shape(lambda: lora.init(jax.random.key(0), params, spec))
    groups = optim.leaf_groups(config.optim, lf.variable_labels(params, adapters, spec))
    value = "lora/bert/encoder/layer_0/attention/self/value/kernel"
    assert groups[f"{value}/a"] == optim.Group("lora", 0.5, 0.0)
    assert groups[f"{value}/b"] == optim.Group("lora_b", 0.5, 0.0)
    assert groups["params/classifier/kernel"] == optim.Group("train", 10, None)


def _shape(x):
    return isinstance(x, tuple) and all(isinstance(n, int) for n in x)


def test_peft_spec_from_config():
    from lorax_ft.models import BertConfig

    config = bbc_minilm.get_config("lora")
    spec = config_lib.peft_spec(config.peft, BertConfig())
    actions = [a for _, a in spec.rules]
    assert all(isinstance(a, LoRA) and a.rank == 8 and a.scale == 2.0 for a in actions[:-1])
    assert spec.rules[-1] == (r"classifier/.*", Train())
    assert config_lib.peft_spec(bbc_minilm.get_config("full").peft, BertConfig()) is FULL_FINETUNE


def test_peft_rules_mean_what_a_spec_means():
    """`peft.rules` come first, presets expand, unset settings come from the shorthand keys."""
    from lorax_ft.models import LlamaConfig
    from lorax_ft.models.lora_targets import lora_targets

    config = smollm2_shakespeare.get_config("lora")
    config.peft.update(rank=4, alpha=8.0, targets="all-linear", train=".*/norm/scale")
    config.peft.rules = (
        ("attention-qv", {"rank": 16, "dora": True}),
        (r".*/mlp/down_proj/kernel", {"alpha": 2.0, "rslora": True}),
        (r".*/layers_0/mlp/.*", "freeze"),
    )
    config_lib.validate(config, num_devices=8)
    spec = config_lib.peft_spec(config.peft, LlamaConfig(num_hidden_layers=2))
    qv, shorthand = LoRA(16, alpha=8.0, dora=True), LoRA(4, alpha=8.0)
    assert spec.rules == (
        (lora_targets("llama", "attention-qv")[0], qv),
        (r".*/mlp/down_proj/kernel", LoRA(4, alpha=2.0, rslora=True)),
        (r".*/layers_0/mlp/.*", lf.Freeze()),
        *((pattern, shorthand) for pattern in lora_targets("llama", "all-linear")),
        (".*/norm/scale", Train()),
    )
    shape = jax.ShapeDtypeStruct((64, 64), jnp.float32)
    layers = {
        f"layers_{i}": {
            "self_attn": {n: {"kernel": shape} for n in ("q_proj", "k_proj", "v_proj")},
            "mlp": {n: {"kernel": shape} for n in ("up_proj", "down_proj")},
        }
        for i in range(2)
    }
    params = {"model": {**layers, "norm": {"scale": jax.ShapeDtypeStruct((64,), jnp.float32)}}}
    targets = spec.lora_targets(params)
    assert targets["model/layers_1/self_attn/q_proj/kernel"].rank == 16
    assert targets["model/layers_1/self_attn/k_proj/kernel"].scale == 2.0
    assert targets["model/layers_1/mlp/down_proj/kernel"].scale == 1.0  # 2 / sqrt(4)
    assert "model/layers_0/mlp/up_proj/kernel" not in targets  # frozen by the earlier rule
    assert spec.labels(params)["model"]["norm"]["scale"] == "train"


def test_peft_rule_settings_are_validated_with_the_rule_named():
    from lorax_ft.models import LlamaConfig

    config = smollm2_shakespeare.get_config("lora")
    config.peft.rules = (("attention-qv", {"rank": 0}),)
    config_lib.validate(config, num_devices=8)  # the structure is fine; the value is not
    with pytest.raises(config_lib.ConfigError, match=r"^peft.rules\[0\]: LoRA rank must be"):
        config_lib.peft_spec(config.peft, LlamaConfig())


def test_schedule_length_follows_train_steps_unless_set():
    """`--config.train.steps=8` ends the decay at step 8; an explicit total_steps is kept."""
    from lorax_ft.training import optim

    config = bbc_minilm.get_config("lora")
    config.train.steps = 8
    resolved = config_lib.resolve(config)
    assert resolved.schedule.total_steps == 8 and config.schedule.total_steps == 0
    schedule = optim.make_schedule(resolved.schedule)
    assert float(schedule(8)) == pytest.approx(config.schedule.lr * config.schedule.end_lr_factor)
    assert float(schedule(6)) == pytest.approx(config.schedule.lr)  # the end of the warmup
    config.schedule.total_steps = 20
    assert config_lib.resolve(config).schedule.total_steps == 20


@pytest.mark.parametrize("arg", ["qlora", "qlora,tiny", "tiny,qlora"])
def test_the_qlora_variant_is_lora_on_the_gguf_blocks_and_composes_with_tiny(arg):
    config = smollm2_shakespeare.get_config(arg)
    config_lib.validate(config, num_devices=8)
    lora_config = smollm2_shakespeare.get_config(arg.replace("qlora", "lora"))
    assert (config.peft.mode, config.model.quantize) == ("lora", "gguf")
    # Otherwise the lora variant: the same keys, quantize aside.
    config.model.quantize = "none"
    assert config.to_dict() == lora_config.to_dict()
    with pytest.raises(ValueError, match=r"lora\|full\|qlora\[,tiny\]"):
        smollm2_shakespeare.get_config("qlora,full")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda c: c.model.update(quantize="nf4", double_quant=True, preset="gpt-5"),
            None,  # an unknown preset is named by loading, not here
        ),
        (lambda c: c.model.update(quantize="gguf"), r"model.quantize='gguf' needs a .gguf"),
        (
            lambda c: c.model.update(quantize="gguf", preset="", path="configs/bbc_minilm.py"),
            r"'configs/bbc_minilm.py' is not one",
        ),
        (lambda c: c.model.update(quantize="int8", double_quant=True), "double_quant=True"),
        (lambda c: c.peft.update(mode="full") or c.model.update(quantize="int8"), "peft.mode"),
    ],
)
def test_quantize_keys_are_validated(edit, message):
    config = bbc_minilm.get_config("lora,tiny")
    edit(config)
    if message is None:
        config_lib.validate(config, num_devices=8)
        return
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(config, num_devices=8)


@pytest.mark.parametrize(
    "rules", [(), (("attention-qv", {"init": "olora"}),)], ids=["peft.init", "a rule's init"]
)
def test_gguf_blocks_refuse_inits_that_change_the_base(rules):
    config = smollm2_shakespeare.get_config("qlora,tiny")
    config.peft.rules = rules
    if not rules:
        config.peft.init = "pissa_niter_2"
    with pytest.raises(config_lib.ConfigError, match=r"peft.init='(pissa_niter_2|olora)'.*gguf"):
        config_lib.validate(config, num_devices=8)


def test_quantization_is_a_resume_key_even_for_checkpoints_that_predate_it():
    """A checkpoint written before the quantize keys existed was trained on a float base."""
    from lorax_ft.run.resume import CheckpointMismatchError, check_same_config, resume_config

    config = bbc_minilm.get_config("lora,tiny")
    old = {k: v for k, v in resume_config(config).items() if not k.startswith("model.quant")}
    old.pop("model.double_quant")
    check_same_config("ckpt/4", {"config": old}, resume_config(config))  # the same run
    config.model.quantize = "nf4"
    with pytest.raises(CheckpointMismatchError, match=r"model.quantize='none' \(now 'nf4'\)"):
        check_same_config("ckpt/4", {"config": old}, resume_config(config))
    for key in ("model.quantize", "model.double_quant", "model.quantize_embeddings"):
        assert key in resume_config(config)
