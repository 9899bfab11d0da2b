"""make_pipeline: seeded determinism, bitwise resume from a saved state, process sharding,
padded single-pass eval, and one-line errors."""

import json

import numpy as np
import pytest

from lorax_ft.data import BatchIterator, default_data_config, make_pipeline
from tests.test_data_helpers import EOS, PAD, make_tokenizer

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
]
# 10 chat records whose answers are the numbers 0..9, so a batch row says which record it is.
RECORDS = [{"prompt": f"say {WORDS[i]}", "completion": f"n{i}"} for i in range(10)]
TOK = make_tokenizer([f"say {w}" for w in WORDS] + [f"n{i}" for i in range(10)])


def _chat_config(tmp_path, **kw):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    cfg = default_data_config()
    cfg.update(
        {
            "kind": "chat",
            "path": str(path),
            "max_length": 12,
            "eval_fraction": 0.3,
            "read_threads": 2,
            "prefetch_batches": 2,
            **kw,
        }
    )
    return cfg


def _pipeline(cfg, split="train", **kw):
    kw = {"batch_size": 4, "seed": 0, "pad_id": PAD, "eos_id": EOS, **kw}
    return make_pipeline(cfg, TOK, split=split, **kw)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _record_ids(batch):
    """Which record each row is (from its answer token `n<i>`), -1 for a padding row."""
    rows = np.arange(len(batch["labels"]))
    first_answer = batch["labels"][rows, batch["loss_mask"].argmax(1)]
    has_answer = batch["loss_mask"].any(1)
    return [
        int(TOK.id_to_token(int(t))[1:]) if a else -1
        for t, a in zip(first_answer, has_answer, strict=True)
    ]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and x[k].tobytes() == y[k].tobytes(), k


def test_same_seed_same_batches_other_seed_other_order(tmp_path):
    cfg = _chat_config(tmp_path, eval_fraction=0.1)  # 9 train records
    a, b, c = _pipeline(cfg), _pipeline(cfg), _pipeline(cfg, seed=1)
    _assert_same(_take(a, 5), _take(b, 5))
    assert [_record_ids(x) for x in _take(a, 5)] != [_record_ids(x) for x in _take(c, 5)]


def test_epochs_are_permutations_in_a_new_order_each_time(tmp_path):
    cfg = _chat_config(tmp_path, path="", train_path=_chat_config(tmp_path).path)  # all 10
    it = _pipeline(cfg, batch_size=5, num_epochs=2)
    assert it.num_batches == 4
    ids = [i for b in it for i in _record_ids(b)]
    assert sorted(ids[:10]) == sorted(ids[10:]) == list(range(10))
    assert ids[:10] != ids[10:]


def test_resume_from_saved_state_is_bitwise_identical(tmp_path):
    cfg = _chat_config(tmp_path)  # 7 train records, batch 4: batches cross epoch boundaries
    it = _pipeline(cfg, seed=3)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # JSON-able, as a checkpoint stores it
    rest = _take(it, 4)
    # The same data under another path (a new machine) resumes too.
    moved = tmp_path / "moved.jsonl"
    moved.write_text((tmp_path / "chat.jsonl").read_text())
    cfg.path = str(moved)
    resumed = _pipeline(cfg, seed=3)
    assert resumed.num_batches is None  # training repeats forever
    resumed.set_state(state)
    _assert_same(_take(resumed, 4), rest)
    assert resumed.get_state()["next_batch"] == it.get_state()["next_batch"] == 7


def test_processes_read_disjoint_slices_of_each_global_batch_and_resume_alike(tmp_path):
    cfg = _chat_config(tmp_path)
    full = _take(_pipeline(cfg), 4)
    parts = [_take(_pipeline(cfg, process_index=p, process_count=2), 4) for p in range(2)]
    for b, (p0, p1) in enumerate(zip(*parts, strict=True)):
        for k in full[b]:
            np.testing.assert_array_equal(np.concatenate([p0[k], p1[k]]), full[b][k])
    # The state is the global batch position, so one saved state serves every process.
    it = _pipeline(cfg, process_index=1, process_count=2)
    _take(it, 2)
    state = it.get_state()
    other = _pipeline(cfg, process_index=1, process_count=2)
    other.set_state(state)
    _assert_same(_take(other, 2), parts[1][2:])


def test_eval_is_one_ordered_pass_with_zero_weight_padding(tmp_path):
    cfg = _chat_config(tmp_path)  # 3 eval records
    it = _pipeline(cfg, split="eval", batch_size=2)
    batches = list(it)
    assert it.num_batches == len(batches) == 2
    weights = np.concatenate([b["weights"] for b in batches])
    assert weights.tolist() == [1, 1, 1, 0]
    pad_row = batches[1]["loss_mask"][1]
    assert pad_row.sum() == 0 and batches[1]["attention_mask"][1].all()
    ids = [i for b in batches for i in _record_ids(b)][:3]
    assert ids == sorted(ids)  # eval keeps the file order
    halves = [
        list(_pipeline(cfg, split="eval", batch_size=2, process_index=p, process_count=2))
        for p in range(2)
    ]
    for b, (p0, p1) in enumerate(zip(*halves, strict=True)):
        np.testing.assert_array_equal(
            np.concatenate([p0["labels"], p1["labels"]]), batches[b]["labels"]
        )


def test_text_pipeline_shapes(tmp_path):
    (tmp_path / "a.txt").write_text(" ".join(WORDS * 3))
    (tmp_path / "b.txt").write_text(" ".join(WORDS[::-1] * 3))
    cfg = default_data_config()
    cfg.update(kind="text", train_path=str(tmp_path), max_length=8, read_threads=1)
    it = _pipeline(cfg, batch_size=2)
    batch = next(it)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 8)
    assert set(batch) == {"input_ids", "labels", "loss_mask", "attention_mask", "weights"}
    assert it.pipeline["num_examples"] == (2 * (36 + 1) - 1) // 8


def test_state_from_another_pipeline_is_refused(tmp_path):
    cfg = _chat_config(tmp_path)
    state = _pipeline(cfg, seed=1).get_state()
    with pytest.raises(ValueError, match="iterator state is from another pipeline") as e:
        _pipeline(cfg, seed=2).set_state(state)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="not a data iterator state"):
        _pipeline(cfg).set_state({"next_index": 3})


@pytest.mark.parametrize(
    ("change", "kw", "error", "message"),
    [
        (
            {"path": "/no/such/file.jsonl"},
            {},
            FileNotFoundError,
            "data file not found: /no/such/file.jsonl",
        ),
        ({"kind": "audio"}, {}, ValueError, "unknown data.kind 'audio'; valid kinds: text, chat"),
        (
            {"path": ""},
            {},
            ValueError,
            "no train data: set data.name, data.path or data.train_path",
        ),
        (
            {"chat_format": "llama9"},
            {},
            ValueError,
            "unknown data.chat_format 'llama9'; valid: chatml, plain",
        ),
        (
            {},
            {"batch_size": 3, "process_count": 2},
            ValueError,
            "batch_size 3 must be a positive multiple of the process count 2",
        ),
        ({}, {"split": "test"}, ValueError, "unknown split 'test'; valid splits: train, eval"),
        ({"name": "bbc-news"}, {}, ValueError, "is kind 'classification', config says 'chat'"),
    ],
)
def test_config_errors_are_one_line(tmp_path, change, kw, error, message):
    cfg = _chat_config(tmp_path)
    cfg.update(change)
    with pytest.raises(error, match=message) as e:
        _pipeline(cfg, **kw)
    assert "\n" not in str(e.value)


def test_empty_dataset_is_one_line_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    cfg = _chat_config(tmp_path, path="", train_path=str(empty))
    with pytest.raises(ValueError, match=f"chat data '{empty}' has no train records") as e:
        _pipeline(cfg)
    assert "\n" not in str(e.value)


def test_batch_iterator_on_a_plain_dataset():
    import grain

    from lorax_ft.data import batch_dataset

    ds = grain.MapDataset.source([{"x": np.int32(i), "weights": np.float32(1)} for i in range(5)])
    it = BatchIterator(batch_dataset(ds, train=False, global_batch_size=2), num_threads=0)
    assert [b["x"].tolist() for b in it] == [[0, 1], [2, 3], [4, 0]]


def test_state_round_trips_through_an_orbax_checkpoint(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    cfg = _chat_config(tmp_path)
    it = _pipeline(cfg, seed=5)
    _take(it, 2)
    mgr = ocp.CheckpointManager(tmp_path / "ckpt")
    mgr.save(2, args=ocp.args.Composite(data=ocp.args.JsonSave(it.get_state())))
    mgr.wait_until_finished()
    rest = _take(it, 3)
    state = mgr.restore(2, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
    resumed = _pipeline(cfg, seed=5)
    resumed.set_state(state)
    _assert_same(_take(resumed, 3), rest)
