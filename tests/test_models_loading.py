"""load_pretrained: sharded checkpoints, placement with shardings, config forms, and clear errors."""

import json
import re
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from safetensors.numpy import load_file, save_file

from lorax_ft.errors import UserError
from lorax_ft.models import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    abstract_params,
    load_pretrained,
    logical_axes,
)
from lorax_ft.models.checkpoint import ModelFileError, to_hf_tensors
from lorax_ft.models.export import save_pretrained
from lorax_ft.models.families import LLAMA
from lorax_ft.models.hf_config import llama_from_hf

CFG = LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def _params(module):
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32), abstract_params(module))


@pytest.fixture
def model_dir(tmp_path):
    module = LlamaForCausalLM(CFG)
    params = _params(module)
    save_pretrained(str(tmp_path), module, params)
    return tmp_path, params


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_sharded_checkpoint_and_shardings(model_dir):
    path, params = model_dir
    tensors = to_hf_tensors(params, LLAMA, CFG)
    (path / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(path / file), metadata={"format": "pt"})
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    rules = (("embed", "data"), ("heads", "model"), ("kv", "model"), ("mlp", "model"))
    shardings = nn.logical_to_mesh_sharding(logical_axes(LlamaForCausalLM(CFG)), mesh, rules)
    _, loaded, _, _ = load_pretrained(str(path), shardings=shardings)
    q = loaded["model"]["layers_1"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec("data", "model")
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_bfloat16_load(model_dir):
    path, _ = model_dir
    _, loaded, cfg, _ = load_pretrained(str(path), dtype=jnp.bfloat16)
    assert cfg.dtype == jnp.bfloat16
    assert loaded["lm_head"]["kernel"].dtype == jnp.bfloat16


def test_rope_config_forms_agree():
    base = {
        "model_type": "llama",
        "vocab_size": 8,
        "hidden_size": 8,
        "intermediate_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    }
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    v4 = llama_from_hf({**base, "rope_theta": 5e5, "rope_scaling": scaling})
    v5 = llama_from_hf({**base, "rope_parameters": {**scaling, "rope_theta": 5e5}})
    assert v4.rope == v5.rope and v4.rope.rope_type == "llama3" and v4.rope.theta == 5e5
    assert llama_from_hf(base).rope.theta == 10000.0


def test_unknown_model_type(model_dir):
    path, _ = model_dir
    _edit_config(path, model_type="t5")
    with pytest.raises(ValueError, match=r"unknown model_type 't5'; valid: bert, gpt2, llama"):
        load_pretrained(str(path))


def test_missing_files(tmp_path, model_dir):
    with pytest.raises(FileNotFoundError, match="nowhere is neither a model directory"):
        load_pretrained(str(tmp_path / "nowhere"))
    path, _ = model_dir
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        load_pretrained(str(path))
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_pretrained(str(path))


def test_shape_mismatch_names_file_tensor_and_shapes(model_dir):
    path, _ = model_dir
    _edit_config(path, intermediate_size=40)
    with pytest.raises(ValueError) as err:
        load_pretrained(str(path))
    assert str(err.value).endswith(
        "model.safetensors: tensor model.layers.0.mlp.down_proj.weight has shape (32, 48) "
        "but the config implies (32, 40)"
    )


def test_missing_tensor_is_named(model_dir):
    path, params = model_dir
    tensors = to_hf_tensors(params, LLAMA, CFG)
    del tensors["model.norm.weight"]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelFileError, match=r"checkpoint has no tensor model\.norm\.weight"):
        load_pretrained(str(path))


def _with_header(data: bytes, edit) -> bytes:
    """A safetensors file whose JSON header went through `edit` (the data stays as it was)."""
    size = struct.unpack("<Q", data[:8])[0]
    header = edit(json.loads(data[8 : 8 + size]))
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data[8 + size :]


def _wrong_size(header):
    header["model.norm.weight"]["shape"] = [16]  # 16 floats where the offsets hold 32
    return header


@pytest.mark.parametrize(
    ("damage", "detail"),
    [
        (lambda data: data[: len(data) // 2], "incomplete metadata"),  # a cut-off download
        (lambda data: struct.pack("<Q", 2**40) + data[8:], "header too large"),  # bad length
        (lambda data: struct.pack("<Q", 12) + b"not a header" + data[20:], "invalid JSON"),
        (lambda data: _with_header(data, _wrong_size), "invalid shape, data type, or offset"),
    ],
)
def test_damaged_safetensors_is_a_user_error_naming_the_file(model_dir, damage, detail):
    path, _ = model_dir
    file = path / "model.safetensors"
    file.write_bytes(damage(file.read_bytes()))
    with pytest.raises(UserError) as err:
        load_pretrained(str(path))
    message = str(err.value)
    assert message.startswith(f"{file} is not a readable safetensors file") and detail in message


def test_damaged_config_and_index_are_named(model_dir):
    path, _ = model_dir
    (path / "model.safetensors.index.json").write_text('{"weights": {}}')
    with pytest.raises(UserError, match=re.escape(f"{path}/model.safetensors.index.json has no")):
        load_pretrained(str(path))
    (path / "config.json").write_text("{'model_type': 'llama'}")
    with pytest.raises(UserError, match=re.escape(f"{path}/config.json is not valid JSON")):
        load_pretrained(str(path))


BERT_CFG = BertConfig(
    vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    intermediate_size=48, max_position_embeddings=16, num_labels=3, classifier_pooling="mean",
)  # fmt: skip


@pytest.fixture
def head_dir(tmp_path):
    """A mean-pooled classifier's export: a BertModel with classifier.json/.safetensors beside."""
    module = BertForSequenceClassification(BERT_CFG)
    params = _params(module)
    save_pretrained(str(tmp_path), module, params)
    return tmp_path, params


def test_head_directory_shapes_and_shardings(head_dir):
    path, params = head_dir
    module, shapes, cfg, _ = load_pretrained(str(path), read_weights=False)
    assert isinstance(module, BertForSequenceClassification) and cfg.classifier_pooling == "mean"
    assert shapes["classifier"]["kernel"].shape == (32, 3)
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    rules = (("embed", "data"), ("heads", "model"), ("mlp", "model"))
    place = lambda m: nn.logical_to_mesh_sharding(logical_axes(m), mesh, rules)
    _, loaded, _, _ = load_pretrained(str(path), shardings=place)
    kernel = loaded["classifier"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("data", None)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def _rewrite_head(path, weight=None, bias=None, extra=None):
    tensors = dict(load_file(str(path / "classifier.safetensors")))
    tensors.update({k: v for k, v in (("weight", weight), ("bias", bias)) if v is not None})
    tensors.update(extra or {})
    save_file(tensors, str(path / "classifier.safetensors"))


def _edit_head(path, **changes):
    head = json.loads((path / "classifier.json").read_text())
    (path / "classifier.json").write_text(json.dumps({**head, **changes}))


@pytest.mark.parametrize(
    ("damage", "error", "match"),
    [
        (lambda p: (p / "classifier.safetensors").unlink(), ModelFileError,
         r"has classifier\.json but no classifier\.safetensors"),
        (lambda p: (p / "classifier.json").unlink(), ModelFileError,
         r"has classifier\.safetensors but no classifier\.json"),
        (lambda p: _edit_head(p, pooling="max"), ModelFileError, r"pooling 'max', lorax_ft reads"),
        (lambda p: _edit_head(p, num_labels=4), ModelFileError,
         r"weight \(3, 32\) and bias \(3,\) do not fit num_labels=4"),
        (lambda p: _rewrite_head(p, extra={"dense": np.zeros((32, 32), np.float32)}),
         ModelFileError, r"tensors \['bias', 'dense', 'weight'\], a classifier head is"),
        (lambda p: _rewrite_head(p, weight=np.zeros((3, 16), np.float32)), ModelFileError,
         r"tensor classifier\.weight has shape \(3, 16\) but the config implies \(3, 32\)"),
        (lambda p: _edit_config(p, architectures=["BertForSequenceClassification"]),
         ModelFileError, r"classifier\.json is a head for a BERT encoder, but config\.json"),
    ],
)  # fmt: skip
def test_head_directory_refuses_what_it_cannot_read_exactly(head_dir, damage, error, match):
    path, _ = head_dir
    damage(path)
    with pytest.raises(error, match=match) as err:
        load_pretrained(str(path))
    assert "\n" not in str(err.value)


def test_head_directory_refuses_another_pooling(head_dir):
    path, _ = head_dir
    with pytest.raises(ValueError, match=r"classifier_pooling='cls', but its head .* 'mean'"):
        load_pretrained(str(path), classifier_pooling="cls")
    module, _, _, _ = load_pretrained(str(path), classifier_pooling="mean")
    assert module.config.classifier_pooling == "mean"
