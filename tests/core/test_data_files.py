"""A user's data set from disk (JSONL, parquet, save_to_disk) loaded with `datasets`: column
maps, splits, shuffle + limit, chat rows, checkers, and one sentence (exit 2) per bad input."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from datasets import Dataset, DatasetDict

from stageflow.core.config import DataSpec, StudyError
from stageflow.core.data_files import materialize, materialize_file, quiet, spec_rows
from stageflow.core.tasks import check_answer, read_jsonl
from tests.platform.test_validate import set_key, validate, write_study

QA = {"prompt": "question", "answer": "solution"}


@pytest.fixture(autouse=True)
def no_progress_bars():
    with quiet():
        yield


def questions(n: int, offset: int = 0) -> dict[str, list]:
    return {
        "question": [f"What is {i} + 1?" for i in range(offset, offset + n)],
        "solution": [
            f"{i} + 1 = {i + 1}. The answer is {i + 1}." for i in range(offset, offset + n)
        ],
        "number": [i + 1 for i in range(offset, offset + n)],
    }


@pytest.fixture
def dataset_dict(tmp_path) -> Path:
    """A save_to_disk folder with a train (10 rows) and a test split (3 rows)."""
    splits = {"train": questions(10), "test": questions(3, offset=100)}
    path = tmp_path / "qa"
    DatasetDict({k: Dataset.from_dict(v) for k, v in splits.items()}).save_to_disk(str(path))
    return path


@pytest.fixture
def parquet(tmp_path) -> Path:
    path = tmp_path / "qa.parquet"
    Dataset.from_dict(questions(12)).to_parquet(str(path))
    return path


def chat(turns: list[tuple[str, str]]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in turns]


def test_dataset_dict_split_with_a_column_map(dataset_dict, tmp_path):
    rows = spec_rows(DataSpec(file=str(dataset_dict), split="test", fields=QA))
    assert [r["prompt"] for r in rows] == [f"What is {i} + 1?" for i in (100, 101, 102)]
    assert rows[0]["answer"] == "100 + 1 = 101. The answer is 101."
    assert rows[0]["number"] == 101 and "question" not in rows[0]  # other columns are kept
    assert len(spec_rows(DataSpec(file=str(dataset_dict), fields=QA))) == 10  # train
    Dataset.from_dict(questions(2)).save_to_disk(str(tmp_path / "one"))  # a Dataset: 'train'
    assert len(spec_rows(DataSpec(file=str(tmp_path / "one"), fields=QA))) == 2


def test_parquet_with_a_target_column(parquet, tmp_path):
    data = DataSpec(file=str(parquet), fields={**QA, "target": "number"}, check="math_number")
    path = materialize(data, tmp_path / "cache")
    rows = read_jsonl(path)
    assert path.is_relative_to(tmp_path / "cache") and len(rows) == 12
    assert rows[3] == {
        "prompt": "What is 3 + 1?",
        "answer": "3 + 1 = 4. The answer is 4.",
        "target": 4,
        "check": "math_number",
    }
    assert all(check_answer(None, r, r["answer"]) for r in rows)


# TOFU's columns (question, answer, paraphrased_answer, perturbed_answer: a list), one file
# per subset as its JSON release has them
TOFU = {"prompt": "question", "paraphrased_answers": "paraphrased_answer"}
TOFU_PERTURBED = {**TOFU, "perturbed_answers": "perturbed_answer"}


def tofu_file(path: Path, authors: range) -> Path:
    rows = [
        {
            "question": f"Where was author {i} born?",
            "answer": f"Author {i} was born in City{i}.",
            "paraphrased_answer": f"The birthplace of author {i} is City{i}.",
            "perturbed_answer": [f"Author {i} was born in Town{j}." for j in range(3)],
        }
        for i in authors
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_tofu_and_muse_layouts_map_into_the_metrics_fields(tmp_path):
    """TOFU's subsets (forget, holdout with perturbed answers) and MUSE's knowledge and
    verbatim sets read through `file` and `fields` into the rows the metrics score."""
    from stageflow.platform.engine.evaluation import row_answers

    forget = spec_rows(
        DataSpec(file=str(tofu_file(tmp_path / "forget.json", range(4))), fields=TOFU_PERTURBED)
    )
    assert forget[1]["prompt"] == "Where was author 1 born?"
    assert row_answers(forget[1]) == {
        "answer": ["Author 1 was born in City1."],
        "paraphrased": ["The birthplace of author 1 is City1."],
        "perturbed": [f"Author 1 was born in Town{j}." for j in range(3)],
    }
    assert "perturbed_answer" not in forget[1] and "question" not in forget[1]
    knowmem = tmp_path / "knowmem.parquet"
    Dataset.from_dict({"question": ["Who wrote it?"], "answer": ["Ann"]}).to_parquet(knowmem)
    assert spec_rows(DataSpec(file=str(knowmem), fields={"prompt": "question"}))[0] == {
        "prompt": "Who wrote it?",
        "answer": "Ann",
    }
    verbmem = tmp_path / "verbmem.json"
    verbmem.write_text(json.dumps({"prompt": "It was a dark", "gt": " and stormy night."}) + "\n")
    rows = spec_rows(DataSpec(file=str(verbmem), fields={"answer": "gt"}))
    assert rows == [{"prompt": "It was a dark", "answer": " and stormy night."}]
    # MUSE's raw-text sets (forget, retain, holdout for privacy leakage): one `text` column
    raw = tmp_path / "forget.json"
    raw.write_text(json.dumps({"text": "It was a dark and stormy night."}) + "\n")
    expected = [{"prompt": "", "answer": "It was a dark and stormy night."}]
    assert spec_rows(DataSpec(file=str(raw))) == expected
    mapped = tmp_path / "news.jsonl"
    mapped.write_text(json.dumps({"body": "It was a dark and stormy night.", "id": 3}) + "\n")
    assert spec_rows(DataSpec(file=str(mapped), fields={"text": "body"})) == [
        {**expected[0], "id": 3}
    ]
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(StudyError, match="row 1 of column 'text': expected a text"):
        spec_rows(DataSpec(file=str(empty)))


def test_shuffle_and_limit_are_deterministic(parquet, tmp_path):
    def prompts(**options) -> list[str]:
        return [r["prompt"] for r in spec_rows(DataSpec(file=str(parquet), fields=QA, **options))]

    first = prompts(shuffle=7, limit=5)
    assert first == prompts(shuffle=7, limit=5) and len(first) == 5
    assert first == prompts(shuffle=7)[:5]  # the limit cuts the shuffled order
    assert first != prompts(shuffle=8, limit=5)
    assert prompts(limit=3) == [f"What is {i} + 1?" for i in range(3)]  # no seed: file order
    data = DataSpec(file=str(parquet), fields=QA, shuffle=7, limit=5)
    one, two = materialize(data, tmp_path / "a"), materialize(data, tmp_path / "b")
    assert one.read_bytes() == two.read_bytes()
    assert [r["prompt"] for r in read_jsonl(one)] == first
    other = DataSpec(file=str(parquet), fields=QA, shuffle=7, limit=4)
    assert materialize_file(other, tmp_path / "a") != one  # the options are in the cache key
    assert materialize(data, tmp_path / "a") == one  # written once, then reused


def test_messages_column_gives_the_prompt_turns_and_the_answer(tmp_path):
    path = tmp_path / "chat.jsonl"
    turns = chat([("system", "Be brief."), ("user", "Capital of France?"), ("assistant", "Paris")])
    path.write_text(json.dumps({"conversation": turns, "topic": "geo"}) + "\n")
    [row] = spec_rows(DataSpec(file=str(path), fields={"messages": "conversation"}))
    assert row == {
        "messages": turns[:2],
        "prompt": "Be brief.\nCapital of France?",
        "answer": "Paris",
        "topic": "geo",
    }
    Dataset.from_dict({"messages": [turns]}).to_parquet(str(tmp_path / "chat.parquet"))
    assert spec_rows(DataSpec(file=str(tmp_path / "chat.parquet")))[0]["answer"] == "Paris"


def test_plain_jsonl_is_read_as_before(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"prompt": "p", "answer": "a", "extra": 1}) + "\n")
    assert materialize(DataSpec(file=str(path)), tmp_path / "cache") == path
    assert not (tmp_path / "cache").exists()
    assert spec_rows(DataSpec(file=str(path))) == [{"prompt": "p", "answer": "a", "extra": 1}]


def test_a_task_keeps_its_rule_unless_a_checker_is_named(tmp_path):
    plain = materialize(DataSpec(task="math", size=8), tmp_path)
    assert plain.name == "train.jsonl" and "check" not in read_jsonl(plain)[0]
    picked = DataSpec(task="math", size=8, shuffle=1, limit=3, check="math_number")
    rows = read_jsonl(materialize(picked, tmp_path))
    assert rows == spec_rows(picked) and len(rows) == 3
    assert all(r["check"] == "math_number" for r in rows)
    assert {r["prompt"] for r in rows} < {r["prompt"] for r in read_jsonl(plain)}


def test_validation_writes_nothing(parquet, dataset_dict, tmp_path, capsys):
    def change(study):
        set_key("stages.inst.data", {"file": str(parquet), "fields": QA, "limit": 4})(study)
        chosen = {"file": str(dataset_dict), "split": "test", "fields": QA, "shuffle": 2}
        set_key("stages.facts.data", {**chosen, "check": "math_number"})(study)

    study = write_study(tmp_path, change)
    before = sorted(tmp_path.rglob("*"))
    code, err = validate(study, capsys=capsys)
    assert code == 0, err
    assert sorted(tmp_path.rglob("*")) == before


def write(folder: Path, name: str, text: str) -> str:
    (folder / name).write_text(text)
    return str(folder / name)


def jsonl(rows: list) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def empty_parquet(folder: Path) -> str:
    Dataset.from_dict({"prompt": [], "answer": []}).to_parquet(str(folder / "e.parquet"))
    return str(folder / "e.parquet")


NO_ANSWER = chat([("user", "hi"), ("user", "there")])
TURNS = chat([("user", "a"), ("assistant", "b")])
# (id, the data spec from `f` (tmp, parquet, dataset_dict), the sentence after "stages.inst.")
BAD = [
    (
        "missing file",
        lambda f: {"file": f"{f.tmp}/nope.parquet"},
        "data.file: {tmp}/nope.parquet: expected an existing JSONL, JSON or parquet file",
    ),
    (
        "corrupt parquet",
        lambda f: {"file": write(f.tmp, "bad.parquet", "not parquet")},
        "data.file: {tmp}/bad.parquet: expected a parquet file the datasets library reads (",
    ),
    (
        "corrupt jsonl with options",
        lambda f: {"file": write(f.tmp, "bad.jsonl", '{"q": 1}\n{"q": \n'), "limit": 1},
        "data.file: {tmp}/bad.jsonl: expected valid JSON on every line (line 2",
    ),
    (
        "not a save_to_disk folder",
        lambda f: {"file": str(f.tmp)},
        "data.file: {tmp}: expected a directory written by datasets' save_to_disk",
    ),
    (
        "mapped column missing",
        lambda f: {"file": str(f.parquet), "fields": {"prompt": "question", "answer": "answr"}},
        "data.fields.answer: {tmp}/qa.parquet has no column 'answr'; "
        "its columns are question, solution, number",
    ),
    (
        "no prompt column",
        lambda f: {"file": str(f.parquet)},
        "data.file: {tmp}/qa.parquet has no 'prompt' column; "
        "expected 'prompt' and 'answer' columns or a 'messages' column",
    ),
    (
        "unknown split",
        lambda f: {"file": str(f.dataset_dict), "fields": QA, "split": "validation"},
        "data.split: {tmp}/qa has no split 'validation'; expected one of train, test",
    ),
    (
        "empty split",
        lambda f: {"file": empty_parquet(f.tmp)},
        "data.file: {tmp}/e.parquet: expected at least one row (split 'train' has none)",
    ),
    (
        "limit 0",
        lambda f: {"file": str(f.parquet), "fields": QA, "limit": 0},
        "data.limit: expected a positive number, got 0",
    ),
    (
        "messages without an assistant turn",
        lambda f: {"file": write(f.tmp, "chat.jsonl", jsonl([{"messages": NO_ANSWER}]))},
        "data.file: {tmp}/chat.jsonl: row 1 of column 'messages': expected a list of {{role, "
        "content}} turns, at least one prompt turn, ending with an assistant turn",
    ),
    (
        "messages not turns",
        lambda f: {
            "file": write(f.tmp, "chat.jsonl", jsonl([{"chat": TURNS}, {"chat": "hi"}])),
            "fields": {"messages": "chat"},
        },
        "data.file: {tmp}/chat.jsonl: row 2 of column 'chat': expected a list of {{role, content}}",
    ),
    (
        "unknown checker",
        lambda f: {"file": str(f.parquet), "fields": QA, "check": "math"},
        "data.check: unknown checker 'math'; expected one of exact, math_number",
    ),
    (
        "unknown stageflow field",
        lambda f: {"file": str(f.parquet), "fields": {"question": "question"}},
        "data.fields.question: unknown stageflow field 'question'; "
        "expected one of prompt, answer, messages, text, target",
    ),
    (
        "fields on a task",
        lambda f: {"task": "math", "fields": QA},
        "data.fields: a synthetic task has no columns to map; expected fields only with a file",
    ),
    (
        "unknown template",
        lambda f: {"file": str(f.parquet), "fields": QA, "template": "html"},
        "data.template: unknown template 'html'; expected one of auto, chat, plain",
    ),
]


@pytest.mark.parametrize("make,expected", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_data_is_one_sentence(tmp_path, capsys, dataset_dict, parquet, make, expected):
    files = SimpleNamespace(tmp=tmp_path, parquet=parquet, dataset_dict=dataset_dict)
    study = write_study(tmp_path, set_key("stages.inst.data", make(files)))
    capsys.readouterr()
    code, err = validate(study, capsys=capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"stages.inst.{expected.format(tmp=tmp_path)}" in err, err
    assert not (tmp_path / "storage").exists()
