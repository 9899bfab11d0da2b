"""Text packing and the held-out-tail split, checked against a hand-built token stream."""

import numpy as np
import pytest

from lorax_ft.data import pack_documents, split_text_tail, text_example
from tests.test_data_helpers import BOS, EOS, ids_of, make_tokenizer

DOCS = ["the cat sat on the mat", "a dog ran far away", "birds sing"]


def test_packing_matches_the_concatenated_stream():
    tok = make_tokenizer(DOCS)
    stream = [t for d in DOCS for t in [BOS, *ids_of(tok, d), EOS]]  # 19 tokens
    rows = pack_documents(tok, DOCS, max_length=4, eos_id=EOS, bos_id=BOS)
    assert rows.shape == ((len(stream) - 1) // 4, 5) and rows.dtype == np.int32
    for i, row in enumerate(rows):
        ex = text_example(row)
        np.testing.assert_array_equal(ex["input_ids"], stream[4 * i : 4 * i + 4])
        np.testing.assert_array_equal(ex["labels"], stream[4 * i + 1 : 4 * i + 5])
        assert ex["loss_mask"].sum() == 4 and ex["attention_mask"].sum() == 4
    # Every stream token but the first is a label exactly once, up to the dropped tail.
    labels = np.concatenate([text_example(r)["labels"] for r in rows])
    np.testing.assert_array_equal(labels, stream[1 : 1 + len(labels)])


def test_packing_without_bos_puts_eos_between_documents():
    tok = make_tokenizer(DOCS)
    rows = pack_documents(tok, DOCS[:2], max_length=12, eos_id=EOS)
    assert rows.shape == (1, 13)  # 6 + 1 + 5 + 1 tokens
    np.testing.assert_array_equal(rows[0], [*ids_of(tok, DOCS[0]), EOS, *ids_of(tok, DOCS[1]), EOS])


def test_too_little_text_is_one_line_error():
    tok = make_tokenizer(DOCS)
    with pytest.raises(ValueError, match="fewer than one sequence of max_length 64") as e:
        pack_documents(tok, ["birds sing"], max_length=64, eos_id=EOS)
    assert "\n" not in str(e.value)


def test_tail_split_partitions_each_document_by_lines():
    docs = ["".join(f"line {i}\n" for i in range(20)), "only one line\n"]
    train = split_text_tail(docs, "train", eval_fraction=0.1)
    evl = split_text_tail(docs, "eval", eval_fraction=0.1)
    assert evl == ["line 18\nline 19\n"]  # a one-line document stays wholly in train
    assert train == ["".join(f"line {i}\n" for i in range(18)), "only one line\n"]
