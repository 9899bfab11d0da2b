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
    with pytest.raises(ValueError, match="lora\\|full\\[,tiny\\]"):
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
