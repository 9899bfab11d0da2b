"""`lorax-ft export` never destroys data: refused targets, --overwrite, atomic replace, modes."""

import hashlib
import json
import os
import stat

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lorax_ft.errors import UserError
from lorax_ft.run.export_target import MARKER, check_target, replace_directory
from tests.test_trainer import TINY, lorax_ft, tiny_run  # noqa: F401 (a fixture)


def _tree(root) -> dict:
    """Every file under `root` (relative path -> sha256) and every folder: what must not change."""
    out = {}
    for folder, folders, files in os.walk(root):
        for name in folders:
            out[os.path.relpath(os.path.join(folder, name), root)] = "dir"
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _write_export(directory, value=1.0):
    def write(tmp):  # safetensors writes 0600 files
        save_file({"w": np.full(2, value, np.float32)}, os.path.join(tmp, "model.safetensors"))

    replace_directory(str(directory), write, record={"step": 1})


def _umask_modes(root):
    """Every mode under `root` is what the umask gives new folders and files."""
    umask = os.umask(0)
    os.umask(umask)
    for folder, _, files in os.walk(root):
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o777 & ~umask, folder
        for name in files:
            mode = stat.S_IMODE(os.stat(os.path.join(folder, name)).st_mode)
            assert mode == 0o666 & ~umask, (name, oct(mode))
    return True


@pytest.fixture
def workdir(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    return run


def test_refused_targets(workdir, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("mine")
    refused = {
        str(tmp_path / "notes.txt"): "is a file",
        str(workdir): "is the workdir",
        str(workdir / "checkpoints"): "is inside the workdir",
        str(workdir / "new"): "is inside the workdir",
        str(tmp_path): "contains the workdir",
        "/": "contains the workdir",
        str(tmp_path / "mine"): "not an earlier export",
        str(tmp_path / "notes.txt" / "x"): "is not a writable directory",
    }
    for target, message in refused.items():
        with pytest.raises(UserError, match=message):
            check_target(target, str(workdir), overwrite=True)
    os.symlink(workdir, tmp_path / "link")
    with pytest.raises(UserError, match="is a symbolic link"):
        check_target(str(tmp_path / "link"), str(workdir), overwrite=True)


def test_new_or_empty_targets_are_accepted(workdir, tmp_path):
    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "empty", tmp_path / "new", tmp_path / "a" / "b"):
        check_target(str(target), str(workdir), overwrite=False)


def test_earlier_export_needs_overwrite_and_nothing_foreign(workdir, tmp_path):
    target = tmp_path / "hf"
    _write_export(target)
    marker = json.loads((target / MARKER).read_text())
    assert marker == {"step": 1, "written": ["model.safetensors"]}
    with pytest.raises(UserError, match="holds an earlier export; pass --overwrite"):
        check_target(str(target), str(workdir), overwrite=False)
    check_target(str(target), str(workdir), overwrite=True)
    (target / "README.md").write_text("the user's notes")
    with pytest.raises(
        UserError, match=r"holds README\.md, which the earlier export did not write"
    ):
        check_target(str(target), str(workdir), overwrite=True)


def test_replace_is_atomic_and_uses_the_umask(tmp_path):
    target = tmp_path / "hf"
    _write_export(target, 1.0)
    before = _tree(tmp_path)

    def fail(tmp):
        with open(os.path.join(tmp, "model.safetensors"), "w") as f:
            f.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_directory(str(target), fail)
    assert _tree(tmp_path) == before  # the earlier export is intact, no temporary is left

    _write_export(target, 2.0)
    assert load_file(target / "model.safetensors")["w"].tolist() == [2.0, 2.0]
    assert sorted(os.listdir(tmp_path)) == ["hf"]
    assert _umask_modes(target)


def _refused(workdir, target, *extra):
    """Runs a refused export; returns its stderr after checking nothing changed on disk."""
    watched = [workdir, target if os.path.isdir(target) else os.path.dirname(target)]
    before = [_tree(root) for root in watched]
    result = lorax_ft(
        "export", f"--config={TINY}", f"--workdir={workdir}", f"--export_dir={target}", *extra,
        check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorax-ft export: --export_dir="), lines
    assert [_tree(root) for root in watched] == before
    return lines[0]


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("workdir", "is the workdir"),
        ("checkpoints", "is inside the workdir"),
        ("parent", "contains the workdir"),
        ("file", "is a file"),
        ("folder", "not an earlier export"),
    ],
)
def test_cli_refuses_and_changes_nothing(tiny_run, tmp_path, where, message):  # noqa: F811
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "thesis.tex").write_text("mine")
    target = {
        "workdir": tiny_run,
        "checkpoints": tiny_run / "checkpoints",
        "parent": tiny_run.parent,
        "file": tmp_path / "notes.txt",
        "folder": tmp_path,
    }[where]
    assert message in _refused(tiny_run, str(target))


def test_cli_replaces_an_earlier_export_only_with_overwrite(tiny_run, tmp_path):  # noqa: F811
    target = tmp_path / "hf"
    args = ("export", f"--config={TINY}", f"--workdir={tiny_run}", f"--export_dir={target}")
    lorax_ft(*args)
    marker = json.loads((target / MARKER).read_text())
    assert marker["step"] == 4 and "adapter_model.safetensors" in marker["written"]
    assert "pass --overwrite" in _refused(tiny_run, str(target))
    assert _umask_modes(target)
    lorax_ft(*args, "--merged", "--overwrite")  # now the merged model replaces the adapters
    # The mean-pooled classifier: transformers' BertModel plus its head beside it.
    assert sorted(os.listdir(target)) == [MARKER, "classifier.json", "classifier.safetensors",
                                          "config.json", "model.safetensors",
                                          "tokenizer.json"]  # fmt: skip
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # no temporary left beside it
    assert _umask_modes(target)
