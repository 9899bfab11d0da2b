"""Classification: label ids, padding and truncation masks, JSONL/CSV/folder sources, errors."""

import json

import ml_collections
import numpy as np
import pytest

from lorax_ft.data import default_data_config, encode_classification, label_vocabulary
from lorax_ft.data.pipeline import make_pipeline
from tests.test_data_helpers import CLS, PAD, SEP, ids_of, make_tokenizer

TEXTS = ["good film", "bad plot and bad acting", "fine", "great cast great story", "dull"]
LABELS = ["pos", "neg", "pos", "pos", "neg"]
TOK = make_tokenizer(TEXTS)


def _config(**kw):
    cfg = default_data_config()
    cfg.update(kind="classification", max_length=6, read_threads=1, prefetch_batches=2, **kw)
    return cfg


def _write_jsonl(path, texts, labels):
    path.write_text(
        "".join(
            json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(texts, labels, strict=True)
        )
    )
    return str(path)


def test_encode_pads_and_truncates_keeping_special_tokens():
    ex = encode_classification("good film", 1, TOK, max_length=6, pad_id=PAD)
    assert ex["input_ids"].tolist() == [CLS, *ids_of(TOK, "good film"), SEP, PAD, PAD]
    assert ex["attention_mask"].tolist() == [1, 1, 1, 1, 0, 0]
    assert ex["token_type_ids"].tolist() == [0] * 6 and ex["label"] == 1
    long = encode_classification("bad plot and bad acting", 0, TOK, max_length=4, pad_id=PAD)
    assert long["input_ids"].tolist() == [CLS, *ids_of(TOK, "bad plot"), SEP]
    assert long["attention_mask"].tolist() == [1, 1, 1, 1]


def test_label_vocabulary_sorted_names_explicit_names_and_int_ids():
    assert label_vocabulary([{"label": y} for y in LABELS]) == {"neg": 0, "pos": 1}
    assert label_vocabulary([], ["pos", "neg"]) == {"pos": 0, "neg": 1}
    assert label_vocabulary([{"label": 2}, {"label": 0}, {"label": 1}]) == {0: 0, 1: 1, 2: 2}
    # Names that are integers (CSV labels) sort numerically: "10" is not between "1" and "2".
    names = [{"label": str(i)} for i in (10, 2, 1, 0)]
    assert label_vocabulary(names) == {"0": 0, "1": 1, "2": 2, "10": 3}


def test_eval_batches_carry_labels_masks_and_padding_weights(tmp_path):
    cfg = _config(
        train_path=_write_jsonl(tmp_path / "tr.jsonl", TEXTS, LABELS),
        eval_path=_write_jsonl(tmp_path / "ev.jsonl", TEXTS[:3], LABELS[:3]),
    )
    it = make_pipeline(cfg, TOK, split="eval", batch_size=2, pad_id=PAD)
    batches = list(it)
    assert it.pipeline["labels"] == ["neg", "pos"] and len(batches) == it.num_batches == 2
    label = np.concatenate([b["label"] for b in batches])
    weights = np.concatenate([b["weights"] for b in batches])
    assert label[:3].tolist() == [1, 0, 1] and weights.tolist() == [1, 1, 1, 0]
    first = batches[0]
    assert first["input_ids"].shape == (2, 6) and first["input_ids"].dtype == np.int32
    np.testing.assert_array_equal(first["attention_mask"].sum(1), [4, 6])


def test_csv_source_with_custom_columns(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('sentiment,tweet\npos,"good film"\nneg,"dull"\npos,fine\n')
    cfg = _config(train_path=str(path), text_field="tweet", label_field="sentiment")
    batch = next(make_pipeline(cfg, TOK, split="train", batch_size=3, pad_id=PAD, seed=0))
    assert sorted(batch["label"].tolist()) == [0, 1, 1]


def test_folder_per_class_sorts_label_names(tmp_path):
    for label, texts in {"zeta": ["good film", "fine"], "alpha": ["dull"]}.items():
        (tmp_path / label).mkdir()
        for i, t in enumerate(texts):
            (tmp_path / label / f"{i}.txt").write_text(t)
    cfg = _config(train_path=str(tmp_path), eval_path=str(tmp_path))
    it = make_pipeline(cfg, TOK, split="eval", batch_size=3, pad_id=PAD)
    batch = next(it)
    assert it.pipeline["labels"] == ["alpha", "zeta"]
    assert batch["label"].tolist() == [0, 1, 1]
    assert batch["input_ids"][0].tolist()[:3] == [CLS, *ids_of(TOK, "dull"), SEP][:3]


def test_unknown_label_lists_valid_labels(tmp_path):
    cfg = _config(
        train_path=_write_jsonl(tmp_path / "tr.jsonl", TEXTS, LABELS),
        eval_path=_write_jsonl(tmp_path / "ev.jsonl", ["fine"], ["meh"]),
    )
    with pytest.raises(
        ValueError,
        match=r"ev.jsonl:1: unknown label 'meh', not among the training labels; "
        r"valid labels: neg, pos",
    ) as e:
        make_pipeline(cfg, TOK, split="eval", batch_size=2, pad_id=PAD)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"label": "pos"}, "expected a string 'text' field"),
        ({"text": "x"}, "expected a non-empty string or integer 'label', got None"),
    ],
)
def test_bad_record_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "fine", "label": "pos"}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(ValueError, match=rf"{path}:2: {message}"):
        make_pipeline(_config(train_path=str(path)), TOK, split="train", batch_size=1, pad_id=PAD)


def test_missing_csv_column_and_pad_id(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text,y\nfine,pos\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['label'\]; expected columns"):
        make_pipeline(_config(train_path=str(path)), TOK, split="train", batch_size=1, pad_id=PAD)
    cfg = _config(train_path=_write_jsonl(tmp_path / "tr.jsonl", TEXTS, LABELS))
    with pytest.raises(ValueError, match="classification data needs pad_id"):
        make_pipeline(ml_collections.ConfigDict(cfg), TOK, split="train", batch_size=1)
