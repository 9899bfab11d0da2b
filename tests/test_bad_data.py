"""Bad data and data keys are refused with one line naming the file, record or key.

Each case calls what the CLI calls (`make_pipeline`, `load_records`, `label_ids`, the readers,
`tasks.build`, `generate`) and expects a `lorax_ft.errors.UserError`, which `lorax-ft` prints
as one line before exiting with status 2; one test runs the CLI itself. Next to the refusals,
the inputs that must keep working: quoted multi-line CSV fields, integer labels `0..K-1`,
string labels.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorax_ft.data import (
    default_data_config,
    label_ids,
    label_vocabulary,
    load_named,
    load_records,
    make_pipeline,
    readers,
    to_messages,
)
from lorax_ft.errors import UserError
from lorax_ft.models import BertConfig, Gpt2Config, Gpt2LMHeadModel
from lorax_ft.models.generate import Sampling, generate
from lorax_ft.run import tasks
from lorax_ft.run.config import default_config
from tests.test_data_helpers import PAD, make_tokenizer

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["good film", "bad plot", "fine cast", "dull story", "great acting", "weak ending"]
TOK = make_tokenizer(TEXTS)


def _refused(fn, *needles: str) -> str:
    """Runs `fn`, expecting a one-line `UserError` whose message contains every needle."""
    with pytest.raises(UserError) as e:
        fn()
    message = str(e.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


def _config(**kw):
    cfg = default_data_config()
    cfg.update(kind="classification", max_length=8, read_threads=1, prefetch_batches=2, **kw)
    return cfg


def _pipeline(cfg, split="train", batch_size=2):
    return make_pipeline(cfg, TOK, split=split, batch_size=batch_size, pad_id=PAD, seed=0)


def _jsonl(path: Path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _csv_rows(n=40):
    return ["text,label"] + [f"article {i},{'sport' if i % 2 else 'tech'}" for i in range(n)]


# --- CSV ---------------------------------------------------------------------------------


def test_csv_unterminated_quote_names_file_and_line(tmp_path):
    rows = _csv_rows()
    rows[6] = '"article with an unterminated quote,sport'  # line 7 of the file
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(rows) + "\n")
    _refused(lambda: _pipeline(_config(path=str(path))), f"{path}:7:", "never closed")


def test_csv_unterminated_quote_meeting_a_later_quote_is_refused(tmp_path):
    rows = _csv_rows()
    rows[6] = '"article with an unterminated quote,sport'
    rows[20] = '"a quoted article",tech'  # the stray quote would close here, mid-line
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(rows) + "\n")
    _refused(lambda: readers.read_csv(path, ("text", "label")), f"{path}:7:", "malformed quoting")


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        ("text,label\nan unquoted, comma,sport\n", (":2:", "3 field(s), the header has 2")),
        ("text,label\nonly text\n", (":2:", "1 field(s), the header has 2")),
        ("", ("empty CSV file",)),
        ("text,label,label\nx,a,b\n", ("repeats column(s) ['label']",)),
        ("words,label\nx,a\n", ("lacks column(s) ['text']",)),
    ],
)
def test_csv_structure_errors(tmp_path, content, needles):
    path = tmp_path / "d.csv"
    path.write_text(content)
    _refused(lambda: readers.read_csv(path, ("text", "label")), str(path), *needles)


def test_csv_header_only_has_no_records(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\n")
    _refused(lambda: _pipeline(_config(train_path=str(path))), str(path), "no train records")


def test_non_utf8_file_names_the_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"text,label\ngood,pos\ncaf\xe9,neg\n")
    _refused(lambda: readers.read_csv(path, ("text", "label")), f"{path}:3:", "not valid utf-8")


def test_csv_quoted_multiline_field_bom_and_doubled_quotes_still_read(tmp_path):
    path = tmp_path / "d.csv"
    content = 'text,label\n"line one\nline, two",pos\n\n"she said ""fine""",neg\nplain,pos\n'
    path.write_bytes(b"\xef\xbb\xbf" + content.encode())  # a UTF-8 byte-order mark, as Excel writes
    rows = readers.read_csv(path, ("text", "label"))
    assert rows == [
        (f"{path}:2", {"text": "line one\nline, two", "label": "pos"}),
        (f"{path}:5", {"text": 'she said "fine"', "label": "neg"}),
        (f"{path}:6", {"text": "plain", "label": "pos"}),
    ]


# --- labels ------------------------------------------------------------------------------


def test_integer_label_among_string_labels_names_the_record(tmp_path):
    records = [{"text": t, "label": "sport" if i % 2 else "tech"} for i, t in enumerate(TEXTS)]
    records[3]["label"] = 3
    path = _jsonl(tmp_path / "d.jsonl", records)
    _refused(
        lambda: _pipeline(_config(path=path)),
        f"{path}:4: label 3 is an integer",
        "5 of 6 labels",
        "are strings",
    )


def test_integer_labels_with_gaps_are_refused(tmp_path):
    path = _jsonl(
        tmp_path / "d.jsonl", [{"text": t, "label": 5 * (i % 2)} for i, t in enumerate(TEXTS)]
    )
    _refused(
        lambda: label_ids(_config(train_path=path)),
        str(path),
        "integer labels [0, 5] are not the class ids 0..1 (missing [1, 2, 3, 4])",
        "data.labels=('0', '5')",
    )


def test_integer_labels_0_to_k_are_ids_and_eval_labels_must_be_known(tmp_path):
    train = _jsonl(
        tmp_path / "tr.jsonl", [{"text": t, "label": i % 3} for i, t in enumerate(TEXTS)]
    )
    evl = _jsonl(
        tmp_path / "ev.jsonl", [{"text": "fine", "label": 2}, {"text": "dull", "label": 0}]
    )
    cfg = _config(train_path=train, eval_path=evl)
    it = _pipeline(cfg, split="eval")
    assert it.pipeline["labels"] == [0, 1, 2]
    assert next(it)["label"].tolist() == [2, 0]
    _jsonl(tmp_path / "ev.jsonl", [{"text": "fine", "label": 3}])
    _refused(
        lambda: _pipeline(cfg, split="eval"), f"{evl}:1: unknown label 3", "valid labels: 0, 1, 2"
    )


def test_integer_labels_can_be_named_by_data_labels(tmp_path):
    path = _jsonl(
        tmp_path / "d.jsonl", [{"text": t, "label": 5 * (i % 2)} for i, t in enumerate(TEXTS)]
    )
    cfg = _config(train_path=path, eval_path=path, labels=("0", "5"))
    assert next(_pipeline(cfg, split="eval"))["label"].tolist() == [0, 1]


def test_string_labels_still_work(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text(
        "text,label\n" + "".join(f"{t},{'b' if i % 2 else 'a'}\n" for i, t in enumerate(TEXTS))
    )
    it = _pipeline(_config(train_path=str(path), eval_path=str(path)), split="eval")
    assert it.pipeline["labels"] == ["a", "b"]
    assert next(it)["label"].tolist() == [0, 1]


@pytest.mark.parametrize(
    ("labels", "names", "needles"),
    [
        (["pos", "pos"], (), ("the training data: 1 distinct label(s) ['pos']", "at least 2")),
        (["pos", " pos", "neg"], (), ("' pos' and 'pos'", "surrounding spaces")),
        (["pos", "neg"], ("pos", "neg", "pos"), ("data.labels=", "repeats ['pos']")),
        (["pos", "neg"], ("pos",), ("fewer than 2 classes",)),
    ],
)
def test_label_sets_that_cannot_train(labels, names, needles):
    _refused(lambda: label_vocabulary([{"label": y} for y in labels], names), *needles)


@pytest.mark.parametrize(
    ("record", "needles"),
    [
        ({"text": "  ", "label": "pos"}, ("'text' field is empty",)),
        ({"label": "pos"}, ("expected a string 'text' field, got nothing",)),
        ({"text": "x", "label": 1.5}, ("non-empty string or integer 'label', got 1.5",)),
    ],
)
def test_bad_classification_record_names_file_and_line(tmp_path, record, needles):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "fine", "label": "pos"}, record])
    _refused(lambda: load_records(_config(train_path=path), "train"), f"{path}:2:", *needles)


def test_invalid_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine", "label": "pos"}\ntext,label\n')
    _refused(
        lambda: load_records(_config(train_path=str(path)), "train"), f"{path}:2: invalid JSON"
    )


def test_empty_class_folder_is_named(tmp_path):
    for label, texts in {"sport": ["good film"], "tech": []}.items():
        (tmp_path / label).mkdir()
        for i, t in enumerate(texts):
            (tmp_path / label / f"{i}.txt").write_text(t)
    _refused(
        lambda: load_records(_config(path=str(tmp_path)), "train"),
        f"{tmp_path / 'tech'}: class folder has no files",
    )


# --- chat, text, named, keys -------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "needle"),
    [
        ({"messages": [{"role": "bot", "content": "x"}]}, "role 'bot'; valid roles"),
        ({"messages": "hello"}, "'messages' must be a non-empty list"),
        ({"messages": [["user", "x"], ["assistant", "y"]]}, "message 0 needs a string 'content'"),
        ({"prompt": ["a"], "completion": "b"}, "'prompt' must be a string, got list"),
    ],
)
def test_bad_chat_record(tmp_path, record, needle):
    path = _jsonl(tmp_path / "c.jsonl", [{"prompt": "a", "completion": "b"}, record])
    cfg = default_data_config()
    cfg.update(kind="chat", train_path=path)
    _refused(lambda: load_records(cfg, "train"), f"{path}:2:", needle)


def test_chat_record_checker_is_one_line_with_newlines_in_content():
    _refused(
        lambda: to_messages({"messages": [{"role": "user", "content": None, "x": "a\nb"}]}),
        "needs a string",
    )


def test_empty_text_file_and_jsonl_as_text(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    cfg = default_data_config()
    cfg.update(kind="text", train_path=str(empty))
    _refused(lambda: load_records(cfg, "train"), str(empty), "no train records")
    cfg.train_path = _jsonl(tmp_path / "c.jsonl", [{"text": "x"}])
    _refused(lambda: load_records(cfg, "train"), "data.kind='text' reads plain .txt files")


def test_unknown_named_dataset_and_missing_paths(tmp_path):
    _refused(lambda: load_named("imdb"), "unknown dataset 'imdb'; valid names: bbc-news")
    missing = tmp_path / "nope.jsonl"
    message = _refused(lambda: load_records(_config(path=str(missing)), "train"), str(missing))
    assert "not found" in message
    with pytest.raises(FileNotFoundError):  # still a FileNotFoundError for callers that catch it
        load_records(_config(path=str(missing)), "train")
    cfg = default_data_config()
    cfg.update(kind="chat", train_path=str(tmp_path))
    _refused(lambda: load_records(cfg, "train"), f"{tmp_path} is a folder")


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"max_length": 0}, "data.max_length=0 must be >= 1"),
        ({"max_length": -5}, "data.max_length=-5 must be >= 1"),
        ({"eval_fraction": 0.0}, "data.eval_fraction=0.0 must be in (0, 1)"),
        ({"eval_fraction": 1.0}, "data.eval_fraction=1.0 must be in (0, 1)"),
        ({"eval_fraction": 1.5}, "data.eval_fraction=1.5 must be in (0, 1)"),
        ({"read_threads": -1}, "data.read_threads=-1 must be an integer >= 0"),
        ({"label_field": ""}, "data.label_field='' must be a non-empty"),
        (
            {"train_path": "x.jsonl"},
            "set data.path (split by data.eval_fraction) or data.train_path",
        ),
        ({"kind": "audio"}, "unknown data.kind 'audio'"),
        ({"max_length": 2}, "data.max_length=2 leaves no room for text: the tokenizer adds 2"),
    ],
)
def test_bad_data_keys(tmp_path, change, needle):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": t, "label": i % 2} for i, t in enumerate(TEXTS)])
    cfg = _config(path=path)
    cfg.update(change)
    _refused(lambda: _pipeline(cfg), needle)


# --- lengths against the model -----------------------------------------------------------


def test_max_length_beyond_the_models_positions_is_refused_at_build():
    config = default_config()
    config.model.preset = "all-minilm-l6-v2"
    config.data.update(kind="classification", name="bbc-news", max_length=600)
    _refused(
        lambda: tasks.build(config, 5, read_weights=False),
        "data.max_length=600 exceeds the 512 positions of model 'all-minilm-l6-v2'",
        "<= 512",
    )
    config.data.max_length = 512
    assert tasks.build(config, 5, read_weights=False).model_config.num_labels == 5


def test_train_max_new_tokens_and_max_length_against_a_causal_lm():
    config = default_config()
    config.model.update(task="causal_lm", path="model_dir")
    lm = Gpt2Config(n_positions=64)
    config.data.max_length = 64
    tasks.check_lengths(config, lm)
    config.train.max_new_tokens = 64
    _refused(lambda: tasks.check_lengths(config, lm), "train.max_new_tokens=64 must be in 1..63")
    config.train.max_new_tokens, config.data.max_length = 8, 100_000
    _refused(
        lambda: tasks.check_lengths(config, lm), "data.max_length=100000 exceeds the 64 positions"
    )
    config.model.task, config.data.max_length = "classification", 513
    _refused(lambda: tasks.check_lengths(config, BertConfig()), "exceeds the 512 positions")


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens=0 must be an integer >= 1"),
        ({"max_new_tokens": -3}, "max_new_tokens=-3 must be an integer >= 1"),
        ({"temperature": -1.0}, "temperature=-1.0 must be >= 0"),
        ({"top_p": 0.0}, "top_p=0.0 must be None or in (0, 1]"),
        ({"top_k": 0}, "top_k=0 must be None or an integer >= 1"),
    ],
)
def test_bad_sampling_settings(kw, needle):
    _refused(lambda: Sampling(**kw), needle)


def test_generate_refuses_lengths_and_tokens_the_model_cannot_take():
    module = Gpt2LMHeadModel(
        Gpt2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=4)
    )
    run = lambda prompts, **kw: generate(
        module, None, prompts, Sampling(**kw)
    )  # refused before params are used
    _refused(
        lambda: run([[1, 2, 3], [4]], max_new_tokens=100_000), "max_new_tokens=100000", "in 1..29"
    )
    _refused(lambda: run([list(range(32))]), "a prompt has 32 tokens, the model takes 32 positions")
    _refused(lambda: run([[1], []]), "prompt 1 has no tokens")
    _refused(lambda: run([]), "no prompts")
    _refused(lambda: run([[1, 64]]), "token id 64 is outside the model's vocabulary [0, 64)")


# --- the CLI -----------------------------------------------------------------------------


def test_cli_reports_a_bad_csv_as_one_line_and_exit_code_2(tmp_path):
    rows = _csv_rows()
    rows[6] = '"article with an unterminated quote,sport'
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(rows) + "\n")
    result = subprocess.run(
        [
            sys.executable, "-m", "lorax_ft.run.main", "train",
            "--config=configs/bbc_minilm.py:lora,tiny", f"--workdir={tmp_path / 'wd'}",
            "--config.data.kind=classification", "--config.data.name=",
            f"--config.data.path={path}",
        ],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lorax-ft train: {path}:7: "), lines
    assert "never closed" in lines[0] and not result.stdout.strip()
