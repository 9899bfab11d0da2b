"""Config validation: each bad config is one clear error naming the key."""

import pytest

from configs import bbc_minilm, smollm2_chatterbot, smollm2_shakespeare
from lorax_ft import config as config_lib
from lorax_ft.spec import FULL_FINETUNE, LoRA, Train


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


def test_peft_spec_from_config():
    from lorax_ft.models import BertConfig

    config = bbc_minilm.get_config("lora")
    spec = config_lib.peft_spec(config.peft, BertConfig())
    actions = [a for _, a in spec.rules]
    assert all(isinstance(a, LoRA) and a.rank == 8 and a.scale == 2.0 for a in actions[:-1])
    assert spec.rules[-1] == (r"classifier/.*", Train())
    assert config_lib.peft_spec(bbc_minilm.get_config("full").peft, BertConfig()) is FULL_FINETUNE
