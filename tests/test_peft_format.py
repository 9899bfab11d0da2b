"""PEFT adapter format both ways: PEFT's own forward equals lorax_ft's factored forward."""

import dataclasses
import json
import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from safetensors.numpy import load_file, save_file  # noqa: E402

from lorax_ft.models import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    Gpt2Config,
    Gpt2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    abstract_params,
)
from lorax_ft.models.export import save_pretrained  # noqa: E402
from lorax_ft.models.peft_format import PeftFormatError, load_peft, save_peft  # noqa: E402
from lorax_ft.transform import paths  # noqa: E402
from lorax_ft.transform.factored import factored  # noqa: E402
from lorax_ft.transform.lora import Factors  # noqa: E402
from lorax_ft.transform.spec import LoRA, Train  # noqa: E402
from tests.test_models_export import head_logits  # noqa: E402
from tests.tolerance import assert_close  # noqa: E402

torch.set_num_threads(1)
IDS = np.random.default_rng(0).integers(0, 64, size=(2, 6))
TOL = 1e-5


def _llama(scan=False):
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, scan_layers=scan,
        )
    )  # fmt: skip


def _gpt2():
    return Gpt2LMHeadModel(
        Gpt2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4)
    )


def _bert():
    return BertForSequenceClassification(
        BertConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=48, max_position_embeddings=16, num_labels=3,
        )
    )  # fmt: skip


def _random_params(module, seed=2):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(0.5 * rng.standard_normal(s.shape, np.float32)),
        abstract_params(module),
    )


def _hf(module, params, tmp_path):
    """The same base model in transformers (through lorax_ft's HF export)."""
    directory = tmp_path / "base"
    save_pretrained(str(directory), module, params)
    if isinstance(module, BertForSequenceClassification):
        return transformers.BertForSequenceClassification.from_pretrained(directory).eval()
    return transformers.AutoModelForCausalLM.from_pretrained(directory).eval()


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def _lorax_logits(module, params, adapters, trained=None):
    flat = paths.flatten(params)
    flat.update(trained or {})
    return np.asarray(jax.jit(factored(module))(paths.unflatten(flat), adapters, IDS))


def _factors(rng, shape, rank, scale, stack=0, magnitude=False):
    lead, (fan_in, fan_out) = shape[:stack], shape[stack:]
    return Factors(
        a=jnp.asarray(0.3 * rng.standard_normal((*lead, fan_in, rank), np.float32)),
        b=jnp.asarray(0.3 * rng.standard_normal((*lead, rank, fan_out), np.float32)),
        scale=scale,
        magnitude=(
            jnp.asarray(1.0 + rng.random((*lead, fan_out), np.float32)) if magnitude else None
        ),
    )


def _peft_load(hf, directory):
    """PeftModel.from_pretrained, asserting it warns of no missing keys and loads every tensor."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(hf, directory).eval()
    assert not [w for w in caught if "missing" in str(w.message).lower()]
    state = peft.get_peft_model_state_dict(model)
    written = load_file(os.path.join(directory, "adapter_model.safetensors"))
    assert sorted(state) == sorted(written)  # nothing PEFT would drop or expect besides
    for key, value in written.items():
        np.testing.assert_array_equal(state[key].numpy(), value)
    return model


def _randomise(model, seed=3):
    """Non-zero LoRA factors (and trained copies) in a PEFT model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(
                    0.3 * torch.randn(p.shape, generator=gen) + (p if "magnitude" in name else 0)
                )
    return model


def _trained_of(loaded):
    return {p: np.asarray(v) for p, v in loaded.trained.items()}


# --- lorax -> PEFT ---


def test_llama_scanned_to_peft(tmp_path):
    module = _llama(scan=True)
    params = _random_params(module)
    flat = paths.flatten(params)
    rng = np.random.default_rng(5)
    adapters = paths.unflatten({
        "model/layers/self_attn/q_proj/kernel": _factors(rng, (2, 32, 32), 4, 2.0, stack=1),
        "model/layers/self_attn/v_proj/kernel": _factors(rng, (2, 32, 16), 2, 4.0, stack=1),
        "model/layers/mlp/up_proj/kernel": _factors(rng, (2, 32, 48), 4, 0.5, stack=1),
        "model/embed_tokens/embedding": _factors(rng, (64, 32), 4, 2.0),
    })  # fmt: skip
    trained = {
        "model/norm/scale": flat["model/norm/scale"] + 0.5,
        "lm_head/kernel": jnp.asarray(rng.standard_normal((32, 64), np.float32)),
    }
    config = save_peft(str(tmp_path / "adapter"), module, params, adapters, trained)
    assert config["r"] == 4 and config["lora_alpha"] == 8 and not config["use_rslora"]
    assert config["rank_pattern"] == {
        f"model.layers.{i}.self_attn.v_proj": 2 for i in range(2)
    }  # fmt: skip
    assert config["alpha_pattern"] == {f"model.layers.{i}.mlp.up_proj": 2 for i in range(2)}
    assert config["modules_to_save"] == ["lm_head", "model.norm"]

    hf = _hf(module, params, tmp_path)
    base = _logits(hf)
    theirs = _logits(_peft_load(hf, str(tmp_path / "adapter")))
    ours = _lorax_logits(module, params, adapters, trained)
    assert np.abs(ours - base).max() > 0.1  # the adapters matter
    assert_close(theirs, ours, tol=TOL)


def test_gpt2_conv1d_to_peft(tmp_path):
    module = _gpt2()
    params = _random_params(module)
    rng = np.random.default_rng(6)
    adapters = paths.unflatten({
        "transformer/h_0/attn/c_attn/kernel": _factors(rng, (32, 96), 4, 2.0),
        "transformer/h_1/mlp/c_fc/kernel": _factors(rng, (32, 128), 4, 2.0),
        "transformer/h_1/mlp/c_proj/kernel": _factors(rng, (128, 32), 4, 2.0),
        "transformer/wpe/embedding": _factors(rng, (16, 32), 4, 2.0),
    })  # fmt: skip
    trained = {"transformer/ln_f/bias": jnp.asarray(rng.standard_normal(32, np.float32))}
    config = save_peft(str(tmp_path / "adapter"), module, params, adapters, trained)
    assert config["fan_in_fan_out"] and config["task_type"] == "CAUSAL_LM"
    hf = _hf(module, params, tmp_path)
    theirs = _logits(_peft_load(hf, str(tmp_path / "adapter")))
    assert_close(theirs, _lorax_logits(module, params, adapters, trained), tol=TOL)


def test_bert_classifier_to_peft(tmp_path):
    module = _bert()
    params = _random_params(module)
    rng = np.random.default_rng(7)
    adapters = paths.unflatten({
        f"bert/encoder/layer_{i}/attention/self/{n}/kernel": _factors(rng, (32, 32), 4, 1.0)
        for i in range(2) for n in ("query", "value")
    })  # fmt: skip
    trained = {"classifier/kernel": jnp.asarray(rng.standard_normal((32, 3), np.float32))}
    config = save_peft(str(tmp_path / "adapter"), module, params, adapters, trained)
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]
    written = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    # The untrained bias of the saved classifier is its base value, as PEFT saves it.
    np.testing.assert_array_equal(
        written["base_model.model.classifier.bias"], paths.flatten(params)["classifier/bias"]
    )
    hf = _hf(module, params, tmp_path)
    theirs = _logits(_peft_load(hf, str(tmp_path / "adapter")))
    assert_close(theirs, _lorax_logits(module, params, adapters, trained), tol=TOL)


def test_rslora_scales_become_one_alpha(tmp_path):
    module = _llama()
    params = _random_params(module)
    rng = np.random.default_rng(8)
    # LoRA(rank=r, alpha=16, rslora=True): scale 16/√r, for ranks 4 and 2.
    adapters = paths.unflatten({
        "model/layers_0/self_attn/q_proj/kernel": _factors(rng, (32, 32), 4, 16 / 2.0),
        "model/layers_1/self_attn/q_proj/kernel": _factors(rng, (32, 32), 2, 16 / np.sqrt(2)),
    })  # fmt: skip
    config = save_peft(str(tmp_path / "adapter"), module, params, adapters)
    assert config["use_rslora"] and config["lora_alpha"] == 16 and not config["alpha_pattern"]
    hf = _hf(module, params, tmp_path)
    theirs = _logits(_peft_load(hf, str(tmp_path / "adapter")))
    assert_close(theirs, _lorax_logits(module, params, adapters), tol=TOL)


# --- PEFT -> lorax ---


def test_peft_llama_to_lorax(tmp_path):
    module = _llama()
    params = _random_params(module)
    hf = _hf(module, params, tmp_path)
    base = _logits(hf)
    lora_config = peft.LoraConfig(
        r=4, lora_alpha=8, use_rslora=True, rank_pattern={"v_proj": 2},
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        modules_to_save=["lm_head"], task_type="CAUSAL_LM",
    )  # fmt: skip
    model = _randomise(peft.get_peft_model(hf, lora_config)).eval()
    theirs = _logits(model)
    model.save_pretrained(tmp_path / "adapter")
    loaded = load_peft(str(tmp_path / "adapter"), module, params)
    assert set(loaded.trained) == {"lm_head/kernel"}
    assert loaded.info["model/layers_1/self_attn/v_proj/kernel"].rank == 2
    ours = _lorax_logits(module, params, loaded.adapters, loaded.trained)
    assert np.abs(ours - base).max() > 0.1  # the adapters matter
    assert_close(ours, theirs, tol=TOL)
    # The spec: one exact rule per kernel / trained leaf, with PEFT's rank, alpha and rslora.
    spec = loaded.spec()
    targets = spec.lora_targets(params)
    assert targets["model/layers_0/self_attn/q_proj/kernel"] == LoRA(4, 8, rslora=True)
    assert targets["model/layers_0/self_attn/v_proj/kernel"] == LoRA(2, 8, rslora=True)
    assert len(targets) == 2 * 3 + 1
    assert dict(spec.rules)[r"lm_head/kernel"] == Train()


def test_peft_llama_to_scanned_lorax_and_back(tmp_path):
    module = _llama(scan=True)
    params = _random_params(module)
    hf = _hf(module, params, tmp_path)
    lora_config = peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "up_proj"],
        modules_to_save=["input_layernorm"], alpha_pattern={"up_proj": 4}, task_type="CAUSAL_LM",
    )  # fmt: skip
    model = _randomise(peft.get_peft_model(hf, lora_config)).eval()
    theirs = _logits(model)
    model.save_pretrained(tmp_path / "adapter")
    loaded = load_peft(str(tmp_path / "adapter"), module, params)
    assert loaded.adapters["model"]["layers"]["self_attn"]["q_proj"]["kernel"].a.shape == (
        2, 32, 4,
    )  # fmt: skip
    assert_close(_lorax_logits(module, params, loaded.adapters, loaded.trained), theirs, tol=TOL)
    # Written back, the tensors are the ones PEFT wrote.
    save_peft(str(tmp_path / "back"), module, params, loaded.adapters, loaded.trained)
    assert load_peft(str(tmp_path / "back"), module, params).info == loaded.info
    ours = load_file(str(tmp_path / "back" / "adapter_model.safetensors"))
    assert ours.keys() == load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")).keys()
    for key, value in load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")).items():
        np.testing.assert_array_equal(ours[key], value)


def test_peft_gpt2_to_lorax(tmp_path):
    module = _gpt2()
    params = _random_params(module)
    hf = _hf(module, params, tmp_path)
    lora_config = peft.LoraConfig(
        r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, task_type="CAUSAL_LM"
    )
    model = _randomise(peft.get_peft_model(hf, lora_config)).eval()
    theirs = _logits(model)
    model.save_pretrained(tmp_path / "adapter")
    loaded = load_peft(str(tmp_path / "adapter"), module, params)
    assert len(loaded.info) == 2 * 3
    assert_close(_lorax_logits(module, params, loaded.adapters), theirs, tol=TOL)


def test_peft_bert_classifier_to_lorax(tmp_path):
    module = _bert()
    params = _random_params(module)
    hf = _hf(module, params, tmp_path)
    lora_config = peft.LoraConfig(
        r=4, lora_alpha=4, target_modules=["query", "value", "dense"], task_type="SEQ_CLS"
    )
    model = _randomise(peft.get_peft_model(hf, lora_config)).eval()
    theirs = _logits(model)
    model.save_pretrained(tmp_path / "adapter")
    loaded = load_peft(str(tmp_path / "adapter"), module, params)
    assert set(loaded.trained) == {"classifier/kernel", "classifier/bias"}
    assert_close(_lorax_logits(module, params, loaded.adapters, loaded.trained), theirs, tol=TOL)


def test_dora_magnitude_round_trip(tmp_path):
    module = _llama(scan=True)
    params = _random_params(module)
    rng = np.random.default_rng(9)
    adapters = paths.unflatten({
        "model/layers/self_attn/q_proj/kernel":
            _factors(rng, (2, 32, 32), 4, 2.0, stack=1, magnitude=True),
        "model/layers/mlp/down_proj/kernel":
            _factors(rng, (2, 48, 32), 4, 2.0, stack=1, magnitude=True),
    })  # fmt: skip
    config = save_peft(str(tmp_path / "adapter"), module, params, adapters)
    assert config["use_dora"]
    hf = _hf(module, params, tmp_path)
    loaded_by_peft = _logits(_peft_load(hf, str(tmp_path / "adapter")))
    # PEFT's own DoRA model with the same factors and magnitudes.
    hf2 = _hf(module, params, tmp_path / "again")
    direct = peft.get_peft_model(
        hf2,
        peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "down_proj"]),
    ).eval()
    with torch.no_grad():
        for path, f in ((p, f) for p, f in _flat_factors(adapters).items()):
            kind = "self_attn.q_proj" if "q_proj" in path else "mlp.down_proj"
            for layer in range(2):
                layer_module = direct.get_submodule(f"base_model.model.model.layers.{layer}.{kind}")
                layer_module.lora_A["default"].weight.copy_(torch.tensor(np.asarray(f.a[layer]).T))
                layer_module.lora_B["default"].weight.copy_(torch.tensor(np.asarray(f.b[layer]).T))
                layer_module.lora_magnitude_vector["default"].weight.copy_(
                    torch.tensor(np.asarray(f.magnitude[layer]))
                )
    dora = _logits(direct)
    assert np.abs(dora - _logits(_hf(module, params, tmp_path / "plain"))).max() > 0.1
    assert_close(loaded_by_peft, dora, tol=TOL)
    # lorax_ft's own DoRA forward (computed factored) on the same adapters, and on the loaded.
    assert_close(_lorax_logits(module, params, adapters), dora, tol=TOL)
    # And back: the magnitudes PEFT wrote come back as they were.
    direct.save_pretrained(tmp_path / "from_peft")
    loaded = load_peft(str(tmp_path / "from_peft"), module, params)
    for path, f in _flat_factors(loaded.adapters).items():
        assert loaded.info[path].dora and loaded.spec().lora_targets(params)[path].dora
        np.testing.assert_array_equal(f.magnitude, _flat_factors(adapters)[path].magnitude)
        np.testing.assert_array_equal(f.a, _flat_factors(adapters)[path].a)
    assert_close(_lorax_logits(module, params, loaded.adapters), dora, tol=TOL)


def _flat_factors(adapters):
    from lorax_ft.transform.lora import factors_by_path

    return factors_by_path(adapters)


# --- refused ---


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory):
    """A PEFT adapter for the tiny llama: q/v LoRA, embed_tokens LoRA, lm_head saved whole."""
    tmp = tmp_path_factory.mktemp("peft")
    module = _llama()
    params = _random_params(module)
    hf = _hf(module, params, tmp)
    lora_config = peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj", "model.embed_tokens"], modules_to_save=["lm_head"]
    )
    _randomise(peft.get_peft_model(hf, lora_config)).save_pretrained(tmp / "adapter")
    return str(tmp / "adapter"), module, params


def _edit(peft_dir, tmp_path, config=None, tensors=None):
    directory, module, params = peft_dir
    out = str(tmp_path / "edited")
    shutil.copytree(directory, out)
    with open(os.path.join(out, "adapter_config.json")) as f:
        cfg = json.load(f)
    if config:
        cfg = config(cfg) or cfg
        with open(os.path.join(out, "adapter_config.json"), "w") as f:
            json.dump(cfg, f)
    if tensors:
        weights = load_file(os.path.join(out, "adapter_model.safetensors"))
        weights = tensors(weights) or weights
        save_file(weights, os.path.join(out, "adapter_model.safetensors"))
    return out, module, params


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def _refused(args, match):
    with pytest.raises(PeftFormatError, match=match) as e:
        load_peft(*args)
    assert "\n" not in str(e.value)


def test_valid_fixture_loads(peft_dir):
    loaded = load_peft(*peft_dir)
    assert len(loaded.info) == 2 * 2 + 1 and set(loaded.trained) == {"lm_head/kernel"}


def test_refuses_missing_files(peft_dir, tmp_path):
    out, module, params = _edit(peft_dir, tmp_path)
    os.remove(os.path.join(out, "adapter_config.json"))
    _refused((out, module, params), "no adapter_config.json")
    out, module, params = _edit(peft_dir, tmp_path / "b")
    os.rename(
        os.path.join(out, "adapter_model.safetensors"), os.path.join(out, "adapter_model.bin")
    )
    _refused((out, module, params), "adapter_model.bin.*safe")


def test_refuses_unreadable_files(peft_dir, tmp_path):
    out, module, params = _edit(peft_dir, tmp_path)
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        f.write("{not json")
    _refused((out, module, params), "not valid JSON")
    out, module, params = _edit(peft_dir, tmp_path / "b")
    with open(os.path.join(out, "adapter_model.safetensors"), "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    _refused((out, module, params), "not a readable safetensors")


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("peft_type", "IA3", "peft_type 'IA3'"),
        ("layers_to_transform", [0], "layers_to_transform"),
        ("layers_pattern", "layers", "layers_pattern"),
        ("target_parameters", ["mlp.experts"], "target_parameters"),
        ("use_qalora", True, "use_qalora"),
        ("lora_bias", True, "lora_bias"),
        ("megatron_config", {"tensor_model_parallel_size": 2}, "megatron_config"),
        ("init_lora_weights", "pissa", "init_lora_weights"),
    ],
)
def test_refuses_config_features(peft_dir, tmp_path, key, value, match):
    _refused(_edit(peft_dir, tmp_path, config=lambda c: {**c, key: value}), match)


def test_refuses_another_architecture(peft_dir, tmp_path):
    def rename(w):
        w["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"] = w.pop(
            f"{Q0}.lora_A.weight"
        )

    _refused(_edit(peft_dir, tmp_path, tensors=rename), "c_attn.lora_A.weight maps to no kernel")


def test_refuses_rank_mismatch(peft_dir, tmp_path):
    _refused(_edit(peft_dir, tmp_path, config=lambda c: {**c, "r": 3}), "rank 3")


def test_refuses_a_without_b(peft_dir, tmp_path):
    def drop(w):
        del w[f"{Q0}.lora_B.weight"]

    _refused(_edit(peft_dir, tmp_path, tensors=drop), "q_proj has lora_A only")


def test_refuses_targets_without_tensors(peft_dir, tmp_path):
    def more(c):
        c["target_modules"] = [*c["target_modules"], "k_proj"]

    _refused(_edit(peft_dir, tmp_path, config=more), "targets model.layers.0.self_attn.k_proj")


def test_refuses_dora_on_embedding(peft_dir, tmp_path):
    def dora(w):
        for name in (
            "model.layers.0.self_attn.q_proj",
            "model.layers.1.self_attn.q_proj",
            "model.layers.0.self_attn.v_proj",
            "model.layers.1.self_attn.v_proj",
        ):
            w[f"base_model.model.{name}.lora_magnitude_vector"] = np.ones(
                w[f"base_model.model.{name}.lora_B.weight"].shape[0], np.float32
            )
        w["base_model.model.model.embed_tokens.lora_magnitude_vector"] = np.ones(32, np.float32)

    out = _edit(peft_dir, tmp_path, config=lambda c: {**c, "use_dora": True}, tensors=dora)
    _refused(out, "embed_tokens.*(DoRA|magnitude)")


def test_refuses_bias_tensors(peft_dir, tmp_path):
    def bias(w):
        w[f"{Q0}.bias"] = np.ones(32, np.float32)

    _refused(_edit(peft_dir, tmp_path, config=lambda c: {**c, "bias": "all"}, tensors=bias),
             "no tensor of this model|bias")  # fmt: skip


def test_refuses_partial_scanned_stack(peft_dir, tmp_path):
    def layer0(c):
        c["target_modules"] = ["model.layers.0.self_attn.q_proj", "model.embed_tokens"]

    def drop(w):
        for key in [k for k in w if "layers.1" in k or "v_proj" in k]:
            del w[key]

    out, _, _ = _edit(peft_dir, tmp_path, config=layer0, tensors=drop)
    scanned = _llama(scan=True)
    _refused((out, scanned, _random_params(scanned)), "not layers \\[1\\].*scan_layers=False")


def test_save_refuses_what_peft_computes_differently(tmp_path):
    rng = np.random.default_rng(1)
    gpt2 = _gpt2()
    tied = {"transformer": {"wte": {"embedding": _factors(rng, (64, 32), 4, 1.0)}}}
    with pytest.raises(PeftFormatError, match="tied LM head"):
        save_peft(str(tmp_path), gpt2, _random_params(gpt2), tied)
    bert = _bert()
    params = _random_params(bert)
    head = {"classifier": {"kernel": _factors(rng, (32, 3), 2, 1.0)}}
    with pytest.raises(PeftFormatError, match="classifier/kernel has LoRA adapters"):
        save_peft(str(tmp_path), bert, params, head)
    llama = _llama()
    some_dora = paths.unflatten({
        "model/layers_0/self_attn/q_proj/kernel": _factors(rng, (32, 32), 4, 1.0, magnitude=True),
        "model/layers_1/self_attn/q_proj/kernel": _factors(rng, (32, 32), 4, 1.0),
    })  # fmt: skip
    with pytest.raises(PeftFormatError, match="DoRA on some kernels only"):
        save_peft(str(tmp_path), llama, _random_params(llama), some_dora)
    wrong = {
        "model": {
            "layers_0": {"self_attn": {"q_proj": {"kernel": _factors(rng, (32, 16), 4, 1.0)}}}
        }
    }
    with pytest.raises(PeftFormatError, match="do not fit its kernel"):
        save_peft(str(tmp_path), llama, _random_params(llama), wrong)


# --- a classifier pooling by mean or cls: encoder adapters + the head beside them ---


MASK = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])  # right padding in the second row


def _pooled_bert(pooling):
    return BertForSequenceClassification(
        dataclasses.replace(_bert().config, classifier_pooling=pooling)
    )


def _pooled_bert_params(module):
    """LayerNorm scales near 1, so token states differ and the pooling matters."""
    rng = np.random.default_rng(2)
    return paths.map_with_path(
        lambda p, s: jnp.asarray(
            p.endswith("LayerNorm/scale") + 0.2 * rng.standard_normal(s.shape, np.float32)
        ),
        abstract_params(module),
    )


def _pooled_logits(module, params, adapters, trained):
    flat = {**paths.flatten(params), **trained}
    return np.asarray(jax.jit(factored(module))(paths.unflatten(flat), adapters, IDS, MASK))


@pytest.fixture(scope="module", params=["mean", "cls"])
def pooled_adapter(request, tmp_path_factory):
    """save_peft of a mean/cls-pooled classifier: LoRA on q/v, a LayerNorm and the head trained."""
    tmp = tmp_path_factory.mktemp(f"pooled_{request.param}")
    module = _pooled_bert(request.param)
    params = _pooled_bert_params(module)
    rng = np.random.default_rng(7)
    adapters = paths.unflatten({
        f"bert/encoder/layer_{i}/attention/self/{n}/kernel": _factors(rng, (32, 32), 4, 1.0)
        for i in range(2) for n in ("query", "value")
    })  # fmt: skip
    trained = {
        "classifier/kernel": jnp.asarray(rng.standard_normal((32, 3), np.float32)),
        "bert/encoder/layer_1/output/LayerNorm/scale": jnp.asarray(
            1.0 + 0.3 * rng.standard_normal(32, np.float32)
        ),
    }
    config = save_peft(str(tmp / "adapter"), module, params, adapters, trained)
    save_pretrained(str(tmp / "base"), module, params)
    return tmp, module, params, adapters, trained, config


def test_pooled_classifier_to_peft_feature_extraction(pooled_adapter):
    tmp, module, params, adapters, trained, config = pooled_adapter
    assert config["task_type"] == "FEATURE_EXTRACTION"
    assert config["modules_to_save"] == ["encoder.layer.1.output.LayerNorm"]
    head = json.loads((tmp / "adapter" / "classifier.json").read_text())
    assert head["pooling"] == module.config.classifier_pooling and head["num_labels"] == 3
    written = load_file(str(tmp / "adapter" / "adapter_model.safetensors"))
    assert not [k for k in written if "bert." in k or "classifier" in k]
    np.testing.assert_array_equal(
        load_file(str(tmp / "adapter" / "classifier.safetensors"))["weight"],
        np.asarray(trained["classifier/kernel"]).T,
    )
    hf = transformers.BertModel.from_pretrained(tmp / "base").eval()
    model = _peft_load(hf, str(tmp / "adapter"))
    with torch.no_grad():
        hidden = model(torch.tensor(IDS), attention_mask=torch.tensor(MASK)).last_hidden_state
    theirs = head_logits(hidden.numpy().astype(np.float64), MASK, tmp / "adapter")
    ours = _pooled_logits(module, params, adapters, trained)
    assert np.abs(ours - _pooled_logits(module, params, {}, trained)).max() > 0.1
    assert_close(theirs, ours, tol=TOL)


def test_pooled_classifier_peft_round_trip(pooled_adapter):
    tmp, module, params, adapters, trained, _ = pooled_adapter
    loaded = load_peft(str(tmp / "adapter"), module, params)
    # The head and the LayerNorm are saved whole: their untrained leaves at the base values.
    flat = paths.flatten(params)
    untrained = ["classifier/bias", "bert/encoder/layer_1/output/LayerNorm/bias"]
    want_trained = {**trained, **{p: flat[p] for p in untrained}}
    assert loaded.trained.keys() == want_trained.keys()
    for path, value in want_trained.items():
        np.testing.assert_array_equal(loaded.trained[path], value)
    got, want = _flat_factors(loaded.adapters), _flat_factors(adapters)
    assert got.keys() == want.keys()
    for path, f in want.items():
        np.testing.assert_array_equal(got[path].a, f.a)
        np.testing.assert_array_equal(got[path].b, f.b)
        assert got[path].scale == f.scale
    np.testing.assert_array_equal(
        _pooled_logits(module, params, loaded.adapters, loaded.trained),
        _pooled_logits(module, params, adapters, trained),
    )
    targets = loaded.spec().lora_targets(params)
    assert set(targets) == set(want) and targets[next(iter(want))] == LoRA(4, 4)


def test_pooled_classifier_refuses_another_pooling(pooled_adapter, tmp_path):
    tmp, module, params, _, _, _ = pooled_adapter
    pooling = module.config.classifier_pooling
    for other in {"mean", "cls", "pooler"} - {pooling}:
        with pytest.raises(PeftFormatError, match=f"pools by '{pooling}'.*by '{other}'"):
            load_peft(str(tmp / "adapter"), _pooled_bert(other), params)
    headless = tmp_path / "headless"
    shutil.copytree(tmp / "adapter", headless)
    os.remove(headless / "classifier.json")
    with pytest.raises(PeftFormatError, match=r"classifier\.safetensors but no classifier\.json"):
        load_peft(str(headless), module, params)
    os.remove(headless / "classifier.safetensors")
    with pytest.raises(PeftFormatError, match=r"no classifier\.json.*BertModel"):
        load_peft(str(headless), module, params)


def test_pooled_classifier_refuses_a_seq_cls_adapter(tmp_path):
    pooler = _bert()
    params = _random_params(pooler)
    adapters = {"bert": {"encoder": {"layer_0": {"attention": {"self": {"query": {
        "kernel": _factors(np.random.default_rng(1), (32, 32), 4, 1.0)}}}}}}}  # fmt: skip
    save_peft(str(tmp_path), pooler, params, adapters)
    with pytest.raises(PeftFormatError, match=r"no classifier\.json"):
        load_peft(str(tmp_path), _pooled_bert("mean"), params)
    (tmp_path / "classifier.json").write_text('{"pooling": "mean", "num_labels": 3}')
    save_file({"weight": np.zeros((3, 32), np.float32), "bias": np.zeros(3, np.float32)},
              str(tmp_path / "classifier.safetensors"))  # fmt: skip
    with pytest.raises(PeftFormatError, match=r"task_type 'SEQ_CLS'.*FEATURE_EXTRACTION"):
        load_peft(str(tmp_path), _pooled_bert("mean"), params)


# --- refused: one line each ---


def _llama_adapters(rng, **kwargs):
    return {"model": {"layers_0": {"self_attn": {"q_proj": {
        "kernel": _factors(rng, (32, 32), 4, kwargs.pop("scale", 1.0), **kwargs)}}}}}  # fmt: skip


def _save_refused(module, params, adapters, match, trained=None, tmp="/nonexistent/adapter"):
    with pytest.raises(PeftFormatError, match=match) as e:
        save_peft(tmp, module, params, adapters, trained)
    assert "\n" not in str(e.value)


def test_save_refuses_non_positive_scale():
    rng, llama = np.random.default_rng(1), _llama()
    for scale in (0.0, -2.0, float("nan")):
        _save_refused(llama, _random_params(llama), _llama_adapters(rng, scale=scale),
                      "scale .* is not a positive number")  # fmt: skip


def test_save_refuses_no_adapters():
    llama = _llama()
    _save_refused(llama, _random_params(llama), {}, "no adapters to save")


def test_save_refuses_dora_on_embedding():
    rng, llama = np.random.default_rng(1), _llama()
    table = {
        "model": {"embed_tokens": {"embedding": _factors(rng, (64, 32), 4, 1.0, magnitude=True)}}
    }
    _save_refused(llama, _random_params(llama), table, "no DoRA magnitude for embeddings")


def test_save_refuses_trained_tied_table():
    rng, gpt2 = np.random.default_rng(1), _gpt2()
    params = _random_params(gpt2)
    adapters = {"transformer": {"h_0": {"attn": {"c_attn": {
        "kernel": _factors(rng, (32, 96), 4, 1.0)}}}}}  # fmt: skip
    trained = {"transformer/wte/embedding": paths.flatten(params)["transformer/wte/embedding"]}
    _save_refused(gpt2, params, adapters, "wte/embedding: this table is also the tied LM head",
                  trained)  # fmt: skip


def test_save_refuses_non_2d_kernel():
    rng, llama = np.random.default_rng(1), _llama()
    flat = paths.flatten(_random_params(llama))
    flat["model/layers_0/self_attn/q_proj/kernel"] = jnp.zeros((32, 4, 8))  # a DenseGeneral's
    _save_refused(llama, paths.unflatten(flat), _llama_adapters(rng), "is not a 2-D weight")


def test_refuses_key_without_prefix(peft_dir, tmp_path):
    def strip(w):
        w[f"{Q0}.lora_A.weight".removeprefix("base_model.model.")] = w.pop(f"{Q0}.lora_A.weight")

    _refused(_edit(peft_dir, tmp_path, tensors=strip), "lacks PEFT's prefix 'base_model.model.'")


def test_refuses_tensors_for_untargeted_module(peft_dir, tmp_path):
    def k_proj(w):
        k = Q0.replace("q_proj", "k_proj")
        w[f"{k}.lora_A.weight"] = np.zeros((4, 32), np.float32)
        w[f"{k}.lora_B.weight"] = np.zeros((16, 4), np.float32)

    _refused(_edit(peft_dir, tmp_path, tensors=k_proj), "k_proj, which .* does not target")


def test_refuses_embedding_vs_linear_mismatch(peft_dir, tmp_path):
    def as_embedding(w):
        w[f"{Q0}.lora_embedding_A"] = w.pop(f"{Q0}.lora_A.weight")

    def as_linear(w):
        table = "base_model.model.model.embed_tokens"
        w[f"{table}.lora_A.weight"] = w.pop(f"{table}.lora_embedding_A")

    _refused(_edit(peft_dir, tmp_path, tensors=as_embedding),
             "lora_embedding_A does not fit .*q_proj, a linear layer")  # fmt: skip
    _refused(_edit(peft_dir, tmp_path / "b", tensors=as_linear),
             "embed_tokens.lora_A.weight does not fit .*embed_tokens, an embedding")  # fmt: skip


@pytest.mark.parametrize("pattern", ["rank_pattern", "alpha_pattern"])
def test_refuses_scanned_stack_adapted_differently_per_layer(tmp_path, pattern):
    module = _llama()
    hf = _hf(module, _random_params(module), tmp_path)
    lora_config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], **{pattern: {"layers.1.self_attn.q_proj": 2}}
    )
    _randomise(peft.get_peft_model(hf, lora_config)).save_pretrained(tmp_path / "adapter")
    unscanned = load_peft(str(tmp_path / "adapter"), module, _random_params(module))
    assert len(unscanned.info) == 2  # fine layer by layer
    scanned = _llama(scan=True)
    _refused((str(tmp_path / "adapter"), scanned, _random_params(scanned)),
             "adapts model/layers/self_attn/q_proj/kernel differently.*scan_layers=False")  # fmt: skip
