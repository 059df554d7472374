"""A user's data set from disk: a JSONL/JSON file, a parquet file or a `datasets.save_to_disk`
folder (a Dataset or a DatasetDict), loaded with the `datasets` library into stageflow rows.

A row is `prompt` and `answer` (strings), optionally `messages` (the chat turns before the
answer), `target` and the answer lists `paraphrased_answers` and `perturbed_answers` (TOFU's
`paraphrased_answer` and `perturbed_answer` columns map there; a string is a list of one),
plus the file's other JSON-serialisable columns (unmapped ones named like those, `task` or
`check` are dropped) and `check` when the spec names a checker. A raw-text row (a `text`
column, mapped or found alone) has an empty prompt and its text as the answer: MUSE's verbatim
and privacy sets, scored as a whole by the log-likelihood metrics and membership attacks.
`DataSpec.fields` maps stageflow's names to the file's columns. A `messages` row's answer is
its last (assistant) turn; its prompt is the earlier turns' contents joined by newlines.
`shuffle` (a seed) and `limit` select the rows. Problems are `StudyError`s keyed relative to
the DataSpec.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from stageflow.core.config import ANSWER_LISTS, DATA_FIELDS, DataSpec, StudyError
from stageflow.core.files import staged_dir, write_atomic
from stageflow.core.keys import tree_digest
from stageflow.core.tasks import check_jsonl, dumps, generate, read_jsonl, write_task

# lazy: `datasets` (seconds to import) loads only for a user's data files

# what stageflow reads from a row: a file's own columns of these names are not kept
RESERVED_COLUMNS = (*DATA_FIELDS, "task", "check")
ANY_FILE = "an existing JSONL, JSON or parquet file or a datasets save_to_disk directory"
READABLE = {
    "disk": "a directory written by datasets' save_to_disk",
    "parquet": "a parquet file the datasets library reads",
    "json": "a JSON file the datasets library reads",
    "jsonl": "a JSONL file the datasets library reads",
}
FORMAT = 1  # bump when the normalised rows change, so cached copies are rebuilt
MESSAGES = (
    "a list of {role, content} turns, at least one prompt turn, ending with an assistant turn"
)


def file_format(path: Path) -> str:
    """How `path` is read: 'disk' (a save_to_disk folder), 'parquet', 'json' or 'jsonl'."""
    if path.is_dir():
        return "disk"
    return {".parquet": "parquet", ".pq": "parquet", ".json": "json"}.get(path.suffix, "jsonl")


def is_plain(data: DataSpec) -> bool:
    """A JSONL file read as it is, as before: no column map, split, selection or checker, and
    its first row (when it is one) has `prompt` and `answer`."""
    path = Path(data.file)
    if file_format(path) != "jsonl" or data.fields or data.split != "train":
        return False
    if data.shuffle is not None or data.limit is not None or data.check is not None:
        return False
    try:
        with path.open(encoding="utf-8") as lines:
            first = json.loads(next(line for line in lines if line.strip()))
    except (OSError, StopIteration, ValueError):
        return True  # check_jsonl says what is wrong, as before
    return not isinstance(first, dict) or {"prompt", "answer"} <= first.keys()


def spec_rows(data: DataSpec) -> list[dict]:
    """The rows a checked data spec stands for, without writing them anywhere."""
    if data.file is None:
        return select(
            generate(data.task, data.seed, data.size, dict(data.params))[data.split], data
        )
    return read_jsonl(data.file) if is_plain(data) else load_rows(data)


def select(rows: list[dict], data: DataSpec) -> list[dict]:
    """`rows` shuffled by `data.shuffle`, cut to `data.limit`, tagged with `data.check`."""
    chosen = [rows[i] for i in order(len(rows), data.shuffle, data.limit)]
    return [{**row, "check": data.check} for row in chosen] if data.check else chosen


def order(size: int, shuffle: int | None, limit: int | None) -> list[int]:
    """Row indices: file order, or the permutation `Dataset.shuffle(seed=shuffle)` uses; the
    first `limit` of them."""
    indices = (
        list(range(size))
        if shuffle is None
        else np.random.default_rng(shuffle).permutation(size).tolist()
    )
    return indices if limit is None else indices[:limit]


def materialize_file(data: DataSpec, cache_dir: str | Path) -> Path:
    """The JSONL file of a file spec's rows: the user's own when plain, else the normalised
    rows written once (atomically) under `cache_dir`; datasets' own cache stays inside it."""
    if is_plain(data):
        return Path(data.file).absolute()
    out = Path(cache_dir) / f"{Path(data.file).stem}-{file_key(data)}"
    if not out.is_dir():
        with staged_dir(out) as staging:  # written concurrently elsewhere: theirs is identical
            rows = load_rows(data, scratch=staging)
            (staging / "rows.jsonl").write_text("".join(dumps(row) + "\n" for row in rows))
    return out / "rows.jsonl"


def materialize_task(data: DataSpec, split_file: Path) -> Path:
    """A task split's selected rows (`shuffle`, `limit`, `check`), written once beside it."""
    if data.shuffle is None and data.limit is None and data.check is None:
        return split_file
    key = json.dumps([data.shuffle, data.limit, data.check])
    out = split_file.with_name(
        f"{split_file.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.jsonl"
    )
    if not out.is_file():
        write_atomic(
            out, "".join(dumps(row) + "\n" for row in select(read_jsonl(split_file), data))
        )
    return out


def file_key(data: DataSpec) -> str:
    """A digest of the file's (or folder's) content and the options that select its rows."""
    options = [sorted(data.fields.items()), data.split, data.shuffle, data.limit, data.check]
    key = json.dumps([FORMAT, tree_digest(Path(data.file).resolve()), options])
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def load_rows(data: DataSpec, scratch: Path | None = None) -> list[dict]:
    """The normalised, selected rows of a file spec; datasets' cache lives in a temporary
    folder inside `scratch` (default: the system's) and is removed."""
    path = Path(data.file)
    if not path.exists():
        raise StudyError("", "file", f"{path}: expected {ANY_FILE}")
    if file_format(path) == "jsonl":  # the line-numbered problems of a JSONL file first
        problem = check_jsonl(path, required=())
        if problem:
            raise StudyError("", "file", f"{path}: expected {problem}")
    with tempfile.TemporaryDirectory(prefix=".datasets-", dir=scratch) as cache:
        table = open_split(path, data.split, cache)
    columns = resolve_columns(path, data.fields, table.column_names)
    indices = order(len(table), data.shuffle, data.limit)
    chosen = table.select(indices, keep_in_memory=True).to_list()
    rows = [normalise(path, columns, row, index + 1) for row, index in zip(chosen, indices)]
    return [{**row, "check": data.check} for row in rows] if data.check else rows


def open_split(path: Path, split: str, cache: str) -> Any:
    """The rows of `split` in the file or folder at `path` as a `datasets.Dataset` (a file's
    only split is 'train'); an unknown or empty split is a StudyError."""
    import datasets

    kind = file_format(path)
    with quiet():
        try:
            if kind == "disk":
                loaded = datasets.load_from_disk(str(path), keep_in_memory=True)
                parts = loaded if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
                sizes = {name: len(part) for name, part in parts.items()}
            else:
                builder = datasets.load_dataset_builder(
                    "json" if kind == "jsonl" else kind, data_files=str(path), cache_dir=cache
                )
                builder.download_and_prepare()
                sizes = {name: info.num_examples for name, info in builder.info.splits.items()}
        except Exception as err:  # the library's errors vary by format and version
            detail = "" if kind == "disk" and isinstance(err, FileNotFoundError) else reason(err)
            problem = f"{READABLE[kind]} ({detail})" if detail else READABLE[kind]
            raise StudyError("", "file", f"{path}: expected {problem}") from None
        if split not in sizes:
            raise StudyError(
                "", "split", f"{path} has no split '{split}'; expected one of {', '.join(sizes)}"
            )
        if not sizes[split]:
            raise StudyError(
                "", "file", f"{path}: expected at least one row (split '{split}' has none)"
            )
        return parts[split] if kind == "disk" else builder.as_dataset(split=split, in_memory=True)


def resolve_columns(path: Path, fields: dict[str, str], columns: list[str]) -> dict[str, str]:
    """{stageflow name: the file's column}: `fields` first, then the columns named alike."""
    for name, column in fields.items():
        if column not in columns:
            raise StudyError(
                "",
                f"fields.{name}",
                f"{path} has no column '{column}'; its columns are {', '.join(columns)}",
            )
    chosen = dict(fields)

    def alone(name: str) -> bool:  # mapped, or the file's column with no prompt and answer
        return name in fields or (
            not {"prompt", "answer", "messages", "text"} & set(fields)
            and name in columns
            and not {"prompt", "answer"} <= set(columns)
        )

    wanted = ("messages",) if alone("messages") else ("text",) if alone("text") else None
    wanted = wanted or ("prompt", "answer")
    for name in (*wanted, "target", *ANSWER_LISTS):
        if name not in chosen and name in columns:
            chosen[name] = name
    missing = [name for name in wanted if name not in chosen]
    if missing:
        raise StudyError(
            "",
            "file",
            f"{path} has no '{missing[0]}' column; expected 'prompt' and 'answer' columns or a "
            f"'messages' column, or a 'text' column (map yours with fields), its columns are "
            f"{', '.join(columns)}",
        )
    return chosen


def normalise(path: Path, columns: dict[str, str], row: dict, number: int) -> dict:
    """One stageflow row from the file's row `number` (1-based)."""
    used = set(columns.values())
    out = {
        k: v
        for k, v in row.items()
        if k not in used and k not in RESERVED_COLUMNS and v is not None
    }
    out = {k: v for k, v in out.items() if serialisable(v)}
    if "messages" in columns:
        turns = row[columns["messages"]]
        if not chat_turns(turns):
            raise StudyError(
                "",
                "file",
                f"{path}: row {number} of column '{columns['messages']}': expected {MESSAGES}",
            )
        prompt_turns = [{"role": t["role"], "content": t["content"]} for t in turns[:-1]]
        out["messages"] = prompt_turns
        out["prompt"] = "\n".join(t["content"] for t in prompt_turns)
        out["answer"] = turns[-1]["content"]
    elif "text" in columns:
        value = row[columns["text"]]
        if not isinstance(value, str) or not value:
            raise StudyError(
                "", "file", f"{path}: row {number} of column '{columns['text']}': expected a text"
            )
        out["prompt"], out["answer"] = "", value
    else:
        for name in ("prompt", "answer"):
            value = row[columns[name]]
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = str(value)
            if not isinstance(value, str):
                raise StudyError(
                    "",
                    "file",
                    f"{path}: row {number} of column '{columns[name]}': expected a string",
                )
            out[name] = value
    if "target" in columns and row[columns["target"]] is not None:
        out["target"] = row[columns["target"]]
    for name in ANSWER_LISTS:
        if name in columns and row[columns[name]] is not None:
            value = row[columns[name]]
            answers = [value] if isinstance(value, str) else value
            if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
                raise StudyError(
                    "",
                    "file",
                    f"{path}: row {number} of column '{columns[name]}': expected a string or a list of strings",
                )
            out[name] = answers
    return out


def chat_turns(turns: Any) -> bool:
    """Whether `turns` is a list of {role, content} strings ending with an assistant turn."""
    return (
        isinstance(turns, list)
        and len(turns) >= 2
        and all(
            isinstance(t, dict)
            and isinstance(t.get("role"), str)
            and isinstance(t.get("content"), str)
            for t in turns
        )
        and turns[-1]["role"] == "assistant"
    )


def serialisable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def reason(err: BaseException) -> str:
    """The first sentence of the innermost cause of `err` (the library wraps the parser's)."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    lines = str(err).strip().splitlines()
    return lines[0].split(". ")[0].rstrip(".") if lines else type(err).__name__


@contextmanager
def quiet() -> Iterator[None]:
    """No progress bars or log lines from the datasets library (a problem is one sentence)."""
    import datasets
    from datasets.utils import logging

    bars_off, level = datasets.are_progress_bars_disabled(), logging.get_verbosity()
    datasets.disable_progress_bars()
    logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if not bars_off:
            datasets.enable_progress_bars()


def materialize(data, cache_dir: str | Path) -> Path:
    """The JSONL file of a `DataSpec`'s rows: a plain user JSONL itself, else the normalised
    file rows or the task's split (with its selection) written once under `cache_dir`."""
    if data.file is not None:
        return materialize_file(data, cache_dir)
    folder = write_task(cache_dir, data.task, data.seed, data.size, dict(data.params))
    return materialize_task(data, folder / f"{data.split}.jsonl")
