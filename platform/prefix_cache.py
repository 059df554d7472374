"""Content-addressed checkpoints of stage prefixes, shared by every trial of a study.

The key of a prefix hashes the base model, the seed, the learner settings and the ordered
effective stage configs so far, so two trials that share a prefix share its checkpoint.
A prefix is trained once: a trial claims it with an atomic `mkdir`, trains, writes the
checkpoint under a temporary name and renames it into place. A claim whose owner died
is released, so a crashed trial never blocks the study.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

META = "meta.json"
MODEL = "model"


def digest(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_identity(model_dir: str | Path, sample_bytes: int = 1 << 20) -> str:
    """Identifies a base model by content, not location: its config and, per weight file,
    the size and the first and last MiB (cheap even for a large checkpoint)."""
    model_dir = Path(model_dir)
    parts = [(model_dir / "config.json").read_text()]
    for weights in sorted(model_dir.glob("*.safetensors")):
        size = weights.stat().st_size
        with weights.open("rb") as f:
            head = f.read(sample_bytes)
            f.seek(max(0, size - sample_bytes))
            tail = f.read(sample_bytes)
        parts.append((weights.name, size, hashlib.sha256(head + tail).hexdigest()))
    return digest(*parts)


@dataclass(frozen=True)
class Claim:
    key: str
    path: Path


class PrefixCache:
    """Finished prefixes are folders `<key>/` holding `model/` (an HF dir) and `meta.json`."""

    def __init__(self, root: str | Path, poll_s: float = 0.5):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.poll_s = poll_s

    def entry(self, key: str) -> Path:
        return self.root / key

    def is_done(self, key: str) -> bool:
        return (self.entry(key) / META).is_file()

    def meta(self, key: str) -> dict:
        return json.loads((self.entry(key) / META).read_text())

    def model_dir(self, key: str) -> Path:
        return self.entry(key) / MODEL

    def lookup(self, keys: list[str]) -> int:
        """How many leading keys of a path are finished (the longest finished prefix)."""
        done = 0
        for key in keys:
            if not self.is_done(key):
                break
            done += 1
        return done

    def acquire(self, key: str, owner: str) -> Claim | None:
        """None when `key` is finished (now or after waiting for its trainer), else our claim."""
        claim_path = self.root / f"{key}.claim"
        while True:
            if self.is_done(key):
                return None
            try:
                claim_path.mkdir()
            except FileExistsError:
                if self._owner_dead(claim_path):
                    shutil.rmtree(claim_path, ignore_errors=True)
                    continue
                time.sleep(self.poll_s)
                continue
            record = {
                "owner": owner,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "time": time.time(),
            }
            (claim_path / "owner.json").write_text(json.dumps(record))
            if self.is_done(key):  # finished between our check and our claim
                shutil.rmtree(claim_path, ignore_errors=True)
                return None
            return Claim(key, claim_path)

    def staging_dir(self, claim: Claim) -> Path:
        """Where the claimant writes the checkpoint before `commit` moves it into place."""
        path = self.root / f".{claim.key}.{uuid.uuid4().hex[:8]}"
        (path / MODEL).mkdir(parents=True)
        return path

    def commit(self, claim: Claim, staging: Path, meta: dict) -> None:
        (staging / META).write_text(json.dumps(meta, sort_keys=True, default=str))
        os.replace(staging, self.entry(claim.key))
        self.release(claim)

    def release(self, claim: Claim) -> None:
        shutil.rmtree(claim.path, ignore_errors=True)

    def clear_claims(self) -> int:
        """Drop every claim (a study driver starting or resuming: no trial is running)."""
        stale = list(self.root.glob("*.claim")) + list(self.root.glob(".*"))
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        return len(stale)

    def trained(self) -> list[dict]:
        """The meta records of every finished prefix (one per stage training)."""
        return [json.loads(p.read_text()) for p in sorted(self.root.glob(f"*/{META}"))]

    @staticmethod
    def _owner_dead(claim_path: Path) -> bool:
        try:
            record = json.loads((claim_path / "owner.json").read_text())
        except (OSError, json.JSONDecodeError):
            # being written right now, or written by a process that died at once
            return time.time() - claim_path.stat().st_mtime > 30
        if record["host"] != socket.gethostname():
            return False
        try:
            os.kill(record["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
