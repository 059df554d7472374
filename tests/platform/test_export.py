"""`stageflow export` and `export-model` given what is not there: one sentence, exit 2, nothing
written (tests/test_quickstart.py exports a real study: the table against the report's values,
a model against the log-likelihoods the study recorded)."""

from __future__ import annotations

from stageflow.platform.commands.cli import main


def test_export_of_a_directory_without_a_study(tmp_path, capsys):
    assert main(["export", str(tmp_path / "none"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "study_dir: no study.yaml here" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_export_model_of_an_unknown_trial(tmp_path, capsys):
    out = tmp_path / "model"
    assert (
        main(["export-model", str(tmp_path), "--trial", "a", "--stage", "s", "--out", str(out)])
        == 2
    )
    assert "study_dir: no study.yaml here" in capsys.readouterr().err
    (tmp_path / "study.yaml").write_text("name: nothing-ran\n")  # a study whose trials never ran
    code = main(
        ["export-model", str(tmp_path), "--trial", "abc", "--stage", "ga", "--out", str(out)]
    )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "--trial: no finished trial 'abc'; expected a finished trial (none here)" in err
    assert len(err.splitlines()) == 1 and not out.exists()
