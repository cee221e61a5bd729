"""calm_jax.records: a JSON record written once, and every later use checked against it."""

import json
import os

import pytest

from calm_jax import records


def test_written_when_absent_and_the_same_record_passes(tmp_path):
    path = tmp_path / "sub" / "recipe.json"
    record = {"lr": 1e-3, "pairs": ((1, 2),), "train": {"steps": 10, "seed": 0}}
    records.check_or_write(str(path), record)
    assert json.loads(path.read_text()) == {"lr": 1e-3, "pairs": [[1, 2]], "train": {"steps": 10, "seed": 0}}
    records.check_or_write(str(path), record)  # tuples compare as the lists JSON reads back
    records.check_or_write(str(path), {**record, "new": None})  # an absent field counts as None
    assert os.listdir(path.parent) == ["recipe.json"]  # no temporary file left


def test_a_different_record_names_the_file_and_every_field(tmp_path):
    path = str(tmp_path / "recipe.json")
    records.check_or_write(path, {"lr": 1e-3, "train": {"steps": 10, "seed": 0}, "data": "a"})
    with pytest.raises(records.RecordMismatch) as e:
        records.check_or_write(path, {"lr": 3e-3, "train": {"steps": 20, "seed": 0}, "data": "a"},
                               what="another recipe")
    assert str(e.value) == (f"{path} holds another recipe: lr: made with 0.001, asked for 0.003; "
                            "train.steps: made with 10, asked for 20")
    # Own error class and words; or the whole error from the differences.
    with pytest.raises(KeyError, match="lr: trained with 0.001, given 0.003"):
        records.check_or_write(path, {"lr": 3e-3, "train": {"steps": 10, "seed": 0}, "data": "a"},
                               error=KeyError, was="trained with", now="given")
    with pytest.raises(ValueError, match=r"^rerun \(data: made with 'a', asked for 'b'\)$"):
        records.check_or_write(path, {"lr": 1e-3, "train": {"steps": 10, "seed": 0}, "data": "b"},
                               mismatch=lambda diffs: ValueError(f"rerun ({'; '.join(diffs)})"))
    assert json.loads(open(path).read())["lr"] == 1e-3  # never overwritten


def test_diff_flattens_mappings_only():
    assert records.diff({"a": {"b": {"c": 1}}, "l": [1, 2]}, {"a": {"b": {"c": 2}}, "l": [1, 3]}) == [
        "a.b.c: made with 1, asked for 2", "l: made with [1, 2], asked for [1, 3]"]
    assert records.diff({"a": {"x": 1}}, {"a": None}) == ["a: made with {'x': 1}, asked for None"]
    assert records.diff({"a": 1}, {"a": 1, "b": None}) == []


def test_upgrade_check_and_write_switch(tmp_path):
    path = str(tmp_path / "r.json")
    records.check_or_write(path, {"x": 1}, write=False)  # another process writes it
    assert not os.path.exists(path)
    records.check_or_write(path, {"old_x": 1})
    records.check_or_write(path, {"x": 1}, upgrade=lambda saved: {"x": saved["old_x"]})
    seen = []
    records.check_or_write(path, {"x": 2}, check=lambda saved, given: seen.append((saved, given)))
    assert seen == [({"old_x": 1}, {"x": 2})]
    with open(path, "w") as f:
        f.write("{not json")
    with pytest.raises(records.RecordMismatch, match=r"r\.json is not a readable JSON record"):
        records.check_or_write(path, {"x": 1})


def test_the_write_is_atomic(tmp_path, monkeypatch):
    """A write that fails midway leaves nothing: the next use writes the record afresh, never reads half of one."""
    path = tmp_path / "r.json"

    def broken_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        records.check_or_write(str(path), {"x": 1})
    assert os.listdir(tmp_path) == []  # neither the record nor its temporary file
    monkeypatch.undo()
    records.check_or_write(str(path), {"x": 2})
    assert json.loads(path.read_text()) == {"x": 2}
