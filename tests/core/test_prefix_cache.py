from __future__ import annotations

import json
import multiprocessing
import os
import time

from stageflow.core.prefix_cache import PrefixCache


def finish(cache: PrefixCache, key: str, owner: str) -> bool:
    """Claim and commit `key`; True when this caller trained it."""
    claim = cache.acquire(key, owner)
    if claim is None:
        return False
    staging = cache.staging_dir(claim)
    (staging / "model" / "weights").write_text(owner)
    time.sleep(0.2)
    cache.commit(claim, staging, {"key": key, "trial_id": owner})
    return True


def _worker(root: str, key: str, owner: str, out) -> None:
    out.put((owner, finish(PrefixCache(root, poll_s=0.05), key, owner)))


def test_concurrent_claimants_train_a_prefix_once(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(str(tmp_path), "k1", f"t{i}", out)) for i in range(4)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join()
    assert sum(trained for _, trained in results) == 1
    cache = PrefixCache(tmp_path)
    assert cache.is_done("k1") and len(cache.trained()) == 1
    winner = next(owner for owner, trained in results if trained)
    assert (cache.model_dir("k1") / "weights").read_text() == winner


def test_a_dead_owners_claim_is_released(tmp_path):
    cache = PrefixCache(tmp_path, poll_s=0.05)
    stale = tmp_path / "k2.claim"
    stale.mkdir()
    dead = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(0,))
    dead.start()
    dead.join()
    (stale / "owner.json").write_text(
        json.dumps({"owner": "x", "host": os.uname().nodename, "pid": dead.pid, "time": 0})
    )
    assert finish(cache, "k2", "me")
    assert cache.meta("k2")["trial_id"] == "me"


def test_lookup_and_clear(tmp_path):
    cache = PrefixCache(tmp_path)
    assert finish(cache, "a", "t") and finish(cache, "b", "t")
    assert cache.lookup(["a", "b", "c"]) == 2 and cache.lookup(["c", "a"]) == 0
    (tmp_path / "c.claim").mkdir()
    assert cache.clear_claims() == 1 and not (tmp_path / "c.claim").exists()


def test_a_retried_trial_takes_its_own_claim_over(tmp_path):
    """A claim left by an earlier attempt of the same trial (its node lost) is taken over at once."""
    cache = PrefixCache(tmp_path, poll_s=0.05)
    claim = tmp_path / "k3.claim"
    claim.mkdir()
    record = {"owner": "trial-1", "host": "another-host", "pid": 1, "time": time.time()}
    (claim / "owner.json").write_text(json.dumps(record))
    start = time.monotonic()
    assert finish(cache, "k3", "trial-1")
    assert time.monotonic() - start < 5


def test_another_hosts_claim_is_released_when_its_heartbeat_stops(tmp_path, monkeypatch):
    from stageflow.core import prefix_cache

    cache = PrefixCache(tmp_path, poll_s=0.05)
    claim = tmp_path / "k4.claim"
    claim.mkdir()
    record = {"owner": "trial-2", "host": "another-host", "pid": 1, "time": 0}
    (claim / "owner.json").write_text(json.dumps(record))
    monkeypatch.setattr(prefix_cache, "CLAIM_STALE_S", 1.0)
    old = time.time() - 2
    os.utime(claim / "owner.json", (old, old))  # its owner stopped touching it
    assert finish(cache, "k4", "trial-3")


def test_a_held_claim_is_kept_alive(tmp_path, monkeypatch):
    """The holder touches its claims, so other hosts do not take them over while it trains."""
    from stageflow.core import prefix_cache

    monkeypatch.setattr(prefix_cache, "HEARTBEAT_S", 0.1)
    cache = PrefixCache(tmp_path)
    claim = cache.acquire("k5", "me")
    owner = claim.path / "owner.json"
    old = time.time() - 1000
    os.utime(owner, (old, old))
    deadline = time.time() + 10
    while owner.stat().st_mtime < time.time() - 5 and time.time() < deadline:
        time.sleep(0.1)
    assert owner.stat().st_mtime > time.time() - 5
    cache.release(claim)


def test_evaluations_are_kept_beside_the_prefixes(tmp_path):
    cache = PrefixCache(tmp_path)
    assert cache.read_eval("k") is None
    cache.write_eval("k", {"metrics": {"a/b": 1.0}, "examples": {}})
    assert cache.read_eval("k")["metrics"] == {"a/b": 1.0}
    assert not list(tmp_path.glob(".*"))  # written through a temporary file, nothing left
