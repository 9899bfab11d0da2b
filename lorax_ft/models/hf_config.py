"""Translation between Hugging Face `config.json` dicts and this package's model configs.

Reads configs written by transformers 4.x (`rope_theta` + `rope_scaling`) and 5.x
(`rope_parameters`); writes the 4.x form, which 5.x still reads.

Example:
    >>> cfg = llama_from_hf({"model_type": "llama", "vocab_size": 100, "hidden_size": 32,
    ...                      "intermediate_size": 64, "num_hidden_layers": 2,
    ...                      "num_attention_heads": 4, "num_key_value_heads": 2})
    >>> llama_to_hf(cfg)["num_key_value_heads"]
    2
"""

from typing import Any

from lorax_ft.models.attention import RopeConfig
from lorax_ft.models.bert import BertConfig
from lorax_ft.models.gpt2 import Gpt2Config
from lorax_ft.models.llama import LlamaConfig

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list | tuple) else (int(value),)


def _ids_to_hf(ids: tuple[int, ...]) -> int | list[int] | None:
    return None if not ids else ids[0] if len(ids) == 1 else list(ids)


def _rope_from_hf(hf: dict) -> RopeConfig:
    params = dict(hf.get("rope_parameters") or {})
    # 4.x keeps theta at the top level and scaling under rope_scaling; 5.x nests both.
    if hf.get("rope_scaling"):
        params = {**hf["rope_scaling"], **params}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: default, linear, llama3")
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )


def _rope_to_hf(rope: RopeConfig) -> dict:
    out: dict[str, Any] = {"rope_theta": rope.theta, "rope_scaling": None}
    if rope.rope_type == "linear":
        out["rope_scaling"] = {"rope_type": "linear", "factor": rope.factor}
    elif rope.rope_type == "llama3":
        out["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": rope.factor,
            "low_freq_factor": rope.low_freq_factor,
            "high_freq_factor": rope.high_freq_factor,
            "original_max_position_embeddings": rope.original_max_position_embeddings,
        }
    return out


def llama_from_hf(hf: dict, **overrides: Any) -> LlamaConfig:
    """LlamaConfig from a llama / mistral / qwen2 config.json dict; `overrides` set runtime options."""
    model_type = hf["model_type"]
    if model_type == "qwen2":
        if hf.get("use_sliding_window"):
            raise ValueError("qwen2 with use_sliding_window=true is not supported")
        qkv_bias, o_bias, window = True, False, None
    else:
        qkv_bias = o_bias = bool(hf.get("attention_bias", False))
        window = hf.get("sliding_window") if model_type == "mistral" else None
    return LlamaConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf.get("num_key_value_heads"),
        head_dim=hf.get("head_dim"),
        hidden_act=hf.get("hidden_act", "silu"),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope=_rope_from_hf(hf),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=window,
        initializer_range=hf.get("initializer_range", 0.02),
        model_type=model_type,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_ids(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
        **overrides,
    )


def llama_to_hf(cfg: LlamaConfig) -> dict:
    """config.json dict for a LlamaConfig (model_type llama, mistral or qwen2)."""
    out = {
        "architectures": [_ARCHITECTURES[cfg.model_type]],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_size,
        "hidden_act": cfg.hidden_act,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": cfg.initializer_range,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": _ids_to_hf(cfg.eos_token_ids),
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": "float32",
        **_rope_to_hf(cfg.rope),
    }
    if cfg.model_type == "qwen2":
        if not cfg.qkv_bias or cfg.o_bias:
            raise ValueError("qwen2 export needs qkv_bias=True and o_bias=False")
        out["use_sliding_window"] = False
    else:
        if cfg.qkv_bias != cfg.o_bias:
            raise ValueError(f"{cfg.model_type} export needs qkv_bias == o_bias (attention_bias)")
        out["attention_bias"] = cfg.qkv_bias
        out["mlp_bias"] = cfg.mlp_bias
    if cfg.model_type == "mistral":
        out["sliding_window"] = cfg.sliding_window
    return out


def gpt2_from_hf(hf: dict, **overrides: Any) -> Gpt2Config:
    """Gpt2Config from a gpt2 config.json dict."""
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            raise ValueError(f"gpt2 with {flag}=true is not supported")
    if not hf.get("scale_attn_weights", True):
        raise ValueError("gpt2 with scale_attn_weights=false is not supported")
    return Gpt2Config(
        vocab_size=hf["vocab_size"],
        n_positions=hf.get("n_positions", 1024),
        n_embd=hf.get("n_embd", 768),
        n_layer=hf.get("n_layer", 12),
        n_head=hf.get("n_head", 12),
        n_inner=hf.get("n_inner"),
        activation_function=hf.get("activation_function", "gelu_new"),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        resid_pdrop=hf.get("resid_pdrop", 0.1),
        embd_pdrop=hf.get("embd_pdrop", 0.1),
        attn_pdrop=hf.get("attn_pdrop", 0.1),
        initializer_range=hf.get("initializer_range", 0.02),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_ids(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
        **overrides,
    )


def gpt2_to_hf(cfg: Gpt2Config) -> dict:
    """config.json dict for a Gpt2Config."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.n_positions,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": cfg.n_inner,
        "activation_function": cfg.activation_function,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "resid_pdrop": cfg.resid_pdrop,
        "embd_pdrop": cfg.embd_pdrop,
        "attn_pdrop": cfg.attn_pdrop,
        "initializer_range": cfg.initializer_range,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": _ids_to_hf(cfg.eos_token_ids),
        "pad_token_id": cfg.pad_token_id,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


def bert_from_hf(hf: dict, **overrides: Any) -> BertConfig:
    """BertConfig from a bert config.json dict (num_labels from `id2label` when present)."""
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError("bert with non-absolute position_embedding_type is not supported")
    num_labels = len(hf["id2label"]) if hf.get("id2label") else hf.get("num_labels", 2)
    return BertConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf.get("hidden_size", 768),
        num_hidden_layers=hf.get("num_hidden_layers", 12),
        num_attention_heads=hf.get("num_attention_heads", 12),
        intermediate_size=hf.get("intermediate_size", 3072),
        hidden_act=hf.get("hidden_act", "gelu"),
        hidden_dropout_prob=hf.get("hidden_dropout_prob", 0.1),
        attention_probs_dropout_prob=hf.get("attention_probs_dropout_prob", 0.1),
        max_position_embeddings=hf.get("max_position_embeddings", 512),
        type_vocab_size=hf.get("type_vocab_size", 2),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        initializer_range=hf.get("initializer_range", 0.02),
        pad_token_id=hf.get("pad_token_id", 0) or 0,
        num_labels=num_labels,
        classifier_dropout=hf.get("classifier_dropout"),
        **overrides,
    )


def bert_to_hf(cfg: BertConfig, *, classifier: bool) -> dict:
    """config.json dict for a BertConfig; `classifier` picks BertForSequenceClassification.

    Raises:
      ValueError: `classifier` with `classifier_pooling` other than "pooler": transformers'
        BertForSequenceClassification classifies the pooler output, so it would load such a
        head without complaint and compute other logits (`save_pretrained` writes the encoder
        and the head beside it instead).
    """
    if classifier and cfg.classifier_pooling != "pooler":
        raise ValueError(
            f"classifier_pooling={cfg.classifier_pooling!r} has no transformers "
            "BertForSequenceClassification (it classifies the pooler output); export the "
            "encoder as BertModel with the head beside it (save_pretrained does)"
        )
    arch = "BertForSequenceClassification" if classifier else "BertModel"
    return {
        "architectures": [arch],
        "model_type": "bert",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": cfg.hidden_act,
        "hidden_dropout_prob": cfg.hidden_dropout_prob,
        "attention_probs_dropout_prob": cfg.attention_probs_dropout_prob,
        "max_position_embeddings": cfg.max_position_embeddings,
        "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.layer_norm_eps,
        "initializer_range": cfg.initializer_range,
        "pad_token_id": cfg.pad_token_id,
        "position_embedding_type": "absolute",
        "id2label": {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)},
        "label2id": {f"LABEL_{i}": i for i in range(cfg.num_labels)},
        "classifier_dropout": cfg.classifier_dropout,
        "torch_dtype": "float32",
    }
