"""Content-addressed checkpoints of stage prefixes, shared by every trial of a study.

A prefix's key (core/keys.py) covers everything that made its weights, so two trials that
share a prefix share its checkpoint and a changed study never reads another's.
A prefix is trained once: a trial claims it with an atomic `mkdir`, trains, evaluates, writes
the checkpoint under a temporary name and renames it into place. A claim whose owner died
is released: on the owner's host by its pid, elsewhere by its heartbeat (the owner touches
its claims while it holds them); a retried trial takes its own earlier claim over. So a
crashed trial or a lost node never blocks the study.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stageflow.core.files import read_json, write_json

META = "meta.json"
MODEL = "model"
HEARTBEAT_S = 20.0
CLAIM_STALE_S = 180.0  # a claim of another host untouched this long: its owner is gone


@dataclass(frozen=True)
class Claim:
    key: str
    path: Path


class PrefixCache:
    """Finished prefixes are folders `<key>/` holding `model/` (an HF dir) and `meta.json`;
    each evaluation set's result on a checkpoint is `<evaluation key>.eval.json` beside them."""

    def __init__(self, root: str | Path, poll_s: float = 0.5):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.poll_s = poll_s
        self._held: dict[str, Claim] = {}
        self._lock = threading.Lock()
        self._heartbeat: threading.Thread | None = None

    def entry(self, key: str) -> Path:
        return self.root / key

    def is_done(self, key: str) -> bool:
        return (self.entry(key) / META).is_file()

    def meta(self, key: str) -> dict:
        return json.loads((self.entry(key) / META).read_text())

    def model_dir(self, key: str) -> Path:
        return self.entry(key) / MODEL

    def eval_path(self, key: str) -> Path:
        return self.root / f"{key}.eval.json"

    def read_eval(self, key: str) -> dict | None:
        """{"metrics": ..., "examples": ...} of the evaluation stored for `key`, if any."""
        return read_json(self.eval_path(key))

    def write_eval(self, key: str, result: dict) -> None:
        write_json(self.eval_path(key), result)

    def lookup(self, keys: list[str]) -> int:
        """How many leading keys of a path are finished (the longest finished prefix)."""
        done = 0
        for key in keys:
            if not self.is_done(key):
                break
            done += 1
        return done

    def acquire(self, key: str, owner: str, done: Any = None) -> Claim | None:
        """None when `key` is finished (now or after waiting for its holder), else our claim.

        `done()` says whether the work is finished (default: the prefix checkpoint exists).
        """
        done = done or (lambda: self.is_done(key))
        claim_path = self.root / f"{key}.claim"
        while True:
            if done():
                return None
            try:
                claim_path.mkdir()
            except FileExistsError:
                holder = self._holder(claim_path)
                if holder is not None and holder.get("owner") == owner:
                    break  # our own earlier attempt (a retried trial): it is gone
                if self._holder_gone(claim_path, holder):
                    shutil.rmtree(claim_path, ignore_errors=True)
                    continue
                time.sleep(self.poll_s)
                continue
            break
        record = {"owner": owner, "host": socket.gethostname(), "pid": os.getpid()}
        (claim_path / "owner.json").write_text(json.dumps({**record, "time": time.time()}))
        if done():  # finished between our check and our claim
            shutil.rmtree(claim_path, ignore_errors=True)
            return None
        claim = Claim(key, claim_path)
        with self._lock:
            self._held[key] = claim
        self._start_heartbeat()
        return claim

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
        with self._lock:
            self._held.pop(claim.key, None)
        shutil.rmtree(claim.path, ignore_errors=True)

    def remove(self, key: str) -> None:
        """Remove a finished prefix's checkpoint (meta.json first: a half-removed entry is never
        read as finished); its evaluations stay."""
        entry = self.entry(key)
        (entry / META).unlink(missing_ok=True)
        shutil.rmtree(entry, ignore_errors=True)

    def checkpoints(self) -> list[str]:
        """The keys of every finished prefix checkpoint."""
        return sorted(p.parent.name for p in self.root.glob(f"*/{META}"))

    def clear_claims(self) -> int:
        """Drop every claim (a study driver starting or resuming: no trial is running)."""
        stale = list(self.root.glob("*.claim")) + list(self.root.glob(".*"))
        for path in stale:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()
        return len(stale)

    def trained(self) -> list[dict]:
        """The meta records of every finished prefix (one per stage training)."""
        return [json.loads(p.read_text()) for p in sorted(self.root.glob(f"*/{META}"))]

    # ----- liveness of claims -----------------------------------------------------------------
    def _start_heartbeat(self) -> None:
        if self._heartbeat is None or not self._heartbeat.is_alive():
            self._heartbeat = threading.Thread(target=self._beat, daemon=True)
            self._heartbeat.start()

    def _beat(self) -> None:
        """Touch the held claims every HEARTBEAT_S (other hosts judge liveness by it)."""
        while True:
            time.sleep(HEARTBEAT_S)
            with self._lock:
                held = list(self._held.values())
            for claim in held:
                try:
                    os.utime(claim.path / "owner.json")
                except OSError:  # released meanwhile
                    pass

    @staticmethod
    def _holder(claim_path: Path) -> dict | None:
        try:
            return json.loads((claim_path / "owner.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None  # being written right now, or its writer died at once

    @staticmethod
    def _holder_gone(claim_path: Path, holder: dict | None) -> bool:
        try:
            age = time.time() - (claim_path / ("owner.json" if holder else "")).stat().st_mtime
        except OSError:
            return False
        if holder is None:
            return age > 30
        if holder["host"] != socket.gethostname():
            return age > CLAIM_STALE_S
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
