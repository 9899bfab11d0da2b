"""A tiny in-test tokenizer for the data tests (no downloads), and a check of it."""

from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<bos>", "<eos>", "<|im_start|>", "<|im_end|>"]
PAD, UNK, CLS, SEP, BOS, EOS, IM_START, IM_END = range(len(SPECIALS))


def make_tokenizer(texts, vocab_size=5000):
    """A whitespace WordLevel tokenizer over `texts` with BERT-style `[CLS] $A [SEP]` post-processing.

    Words split on whitespace and punctuation, so `ids_of(text)` can be computed independently.
    """
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=SPECIALS)
    tok.train_from_iterator([*texts, "system user assistant"], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)]
    )
    return tok


def ids_of(tok, text):
    """Token ids of whitespace-separated words, looked up one by one (independent of encode)."""
    return [tok.token_to_id(w) for w in text.split()]


def test_tokenizer_specials_and_words():
    tok = make_tokenizer(["the cat sat", "a dog ran"])
    assert [tok.token_to_id(s) for s in SPECIALS] == list(range(len(SPECIALS)))
    assert tok.encode("the dog", add_special_tokens=False).ids == ids_of(tok, "the dog")
    assert tok.encode("the dog").ids == [CLS, *ids_of(tok, "the dog"), SEP]
    assert tok.encode("<|im_end|>the", add_special_tokens=False).ids == [
        IM_END,
        *ids_of(tok, "the"),
    ]
