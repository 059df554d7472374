"""The study directory: its layout in one place, atomic writes, trial records."""

from __future__ import annotations

import pytest

from stageflow.core.config import StudySpec
from stageflow.core.expand import Trial
from stageflow.core.files import read_json, staged_dir, write_atomic
from stageflow.core.study_dir import StudyDir


def test_layout_and_records(tmp_path):
    study = StudyDir.of(StudySpec(name="s", storage_dir=str(tmp_path / "s")))
    assert study.root == tmp_path / "s" and study.spec_file == study.root / "study.yaml"
    assert study.tracking_uri == f"sqlite:///{study.root / 'mlflow.db'}"
    assert StudyDir.of(StudySpec(name="q")).root.parts[-2:] == ("runs", "q")
    done, pending = Trial(("a", "b"), 0), Trial(("b", "a"), 0)
    record = {"metrics": {"x": 1.0}, "fingerprint": "f1"}
    study.write_record(done.trial_id, record)
    current = {done.trial_id: "f1", pending.trial_id: "f0"}
    assert study.records([pending, done], current) == [(done, record)]
    changed = {**current, done.trial_id: "f2"}  # its plan changed: the record is stale
    assert study.records([pending, done], changed) == []
    assert study.stale_records([pending, done], changed) == [done]
    assert read_json(study.trial_record(pending.trial_id)) is None


def test_write_atomic_leaves_no_partial_file(tmp_path):
    path = write_atomic(tmp_path / "deep" / "f.txt", "hello")
    assert path.read_text() == "hello" and [p.name for p in path.parent.iterdir()] == ["f.txt"]


def test_staged_dir_publishes_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with staged_dir(target) as staging:
            (staging / "half").write_text("x")
            raise RuntimeError("interrupted")
    assert not target.exists() and not list(tmp_path.iterdir())  # no half-written folder
    with staged_dir(target) as staging:
        (staging / "weights").write_text("first")
    with staged_dir(target) as staging:  # written meanwhile by another process: theirs stays
        (staging / "weights").write_text("second")
    assert (target / "weights").read_text() == "first"
    with staged_dir(target, replace=True) as staging:
        (staging / "weights").write_text("third")
    assert (target / "weights").read_text() == "third" and len(list(tmp_path.iterdir())) == 1
