"""Chat examples: the loss mask covers exactly the assistant answers; record and JSONL errors."""

import json

import ml_collections
import numpy as np
import pytest

from lorax_ft.data import chatml, encode_chat, plain, to_messages
from lorax_ft.data.pipeline import load_records
from tests.test_data_helpers import BOS, EOS, IM_END, PAD, ids_of, make_tokenizer

CONVO = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "what is the capital of france"},
    {"role": "assistant", "content": "paris is the capital"},
    {"role": "user", "content": "and of italy"},
    {"role": "assistant", "content": "rome"},
]
TOK = make_tokenizer([m["content"] for m in CONVO])


def _trained_labels(ex):
    return ex["labels"][ex["loss_mask"] == 1].tolist()


def test_prompt_completion_masks_exactly_the_completion():
    msgs = to_messages({"prompt": "what is the capital of france", "completion": "paris"})
    ex = encode_chat(msgs, TOK, max_length=32, pad_id=PAD, eos_id=EOS)
    # The answer is the completion, its end-of-turn marker and the final EOS.
    assert _trained_labels(ex) == [*ids_of(TOK, "paris"), IM_END, EOS]
    full = [*TOK.encode(chatml(msgs), add_special_tokens=False).ids, EOS]
    n = len(full) - 1
    np.testing.assert_array_equal(ex["input_ids"][:n], full[:-1])
    np.testing.assert_array_equal(ex["labels"][:n], full[1:])
    assert (ex["input_ids"][n:] == PAD).all() and (ex["loss_mask"][n:] == 0).all()
    assert ex["attention_mask"].tolist() == [1] * n + [0] * (32 - n)


def test_multi_turn_trains_every_assistant_turn_and_nothing_else():
    ex = encode_chat(CONVO, TOK, max_length=64, pad_id=PAD, eos_id=EOS, bos_id=BOS)
    want = [*ids_of(TOK, "paris is the capital"), IM_END, *ids_of(TOK, "rome"), IM_END, EOS]
    assert _trained_labels(ex) == want
    assert ex["input_ids"][0] == BOS


def test_plain_format_and_truncation():
    msgs = to_messages({"prompt": "what is the ", "completion": "capital of france"})
    ex = encode_chat(msgs, TOK, max_length=5, pad_id=PAD, format_chat=plain)
    # 6 tokens, cut to max_length + 1: inputs "what is the capital of", answer from "capital".
    assert ex["input_ids"].tolist() == ids_of(TOK, "what is the capital of")
    assert _trained_labels(ex) == ids_of(TOK, "capital of france")
    assert ex["loss_mask"].tolist() == [0, 0, 1, 1, 1]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "hi"}, "expected keys 'prompt' and 'completion', or 'messages'"),
        ({"messages": []}, "'messages' must be a non-empty list"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "role 'bot'; valid roles: system, user"),
        ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
        ({"messages": [{"role": "user", "content": 3}]}, "needs a string 'content'"),
    ],
)
def test_bad_records_name_where_and_what(record, message):
    with pytest.raises(ValueError, match=message) as e:
        to_messages(record, "f.jsonl:7")
    assert str(e.value).startswith("f.jsonl:7: ") and "\n" not in str(e.value)


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "chat.jsonl"
    good = json.dumps({"prompt": "a", "completion": "b"})
    path.write_text(f"{good}\n\n{good}\n{{not json\n")
    cfg = {"kind": "chat", "train_path": str(path)}
    with pytest.raises(ValueError, match=rf"{path}:4: invalid JSON") as e:
        load_records(ml_collections.ConfigDict(cfg), "train")
    assert "\n" not in str(e.value)
    path.write_text(f"{good}\n[1, 2]\n")
    with pytest.raises(ValueError, match=rf"{path}:2: expected a JSON object, got list"):
        load_records(ml_collections.ConfigDict(cfg), "train")
