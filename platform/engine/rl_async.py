"""Asynchronous RL (`params.max_staleness: k >= 1`): rollouts stream while the learner trains.

A `RolloutStream` thread samples the stage's batches in order, each with the newest weights
the learner has published, and waits only when it would run more than k policy versions ahead:
batch t (trained at learner version t + 1) may be sampled once version t + 1 - k exists. The
learner takes batch t when it is ready, trains on it with the engines' behaviour log-probs as
pi_old (`GRPOLoop.learn`, which refuses any sample older than k versions), and publishes the
new version; the engines load it at the start of their next batch, off the learner's path.
Engines and learner are separate actors, so on a machine with a core each they work at once.

Faults: an engine lost mid-stage is replaced inside the rollout call (as in the synchronous
loop); any error on either side stops both and propagates, so the trial is retried from its
last finished prefix.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from stageflow.actors.weight_sync import Weights


class RolloutStream(threading.Thread):
    """Samples `batches` in order on its own thread, never more than `max_staleness` versions
    ahead of the learner; `take(t)` hands batch t over once it is ready."""

    def __init__(self, loop: Any, batches: list, max_staleness: int):
        super().__init__(name=f"rollout-stream-{loop.owner}", daemon=True)
        self.loop, self.batches, self.max_staleness = loop, batches, max_staleness
        self.changed = threading.Condition()
        self.latest: tuple[Weights | None, int] = (loop.weights, loop.version)
        self.ready: dict[int, Any] = {}
        self.error: BaseException | None = None
        self.stopped = False
        self.idle_s = 0.0  # waiting on the staleness bound

    def offer(self, weights: Weights, version: int) -> None:
        """The learner published `version`: later batches sample with it."""
        with self.changed:
            self.latest = (weights, version)
            self.changed.notify_all()

    def take(self, t: int) -> Any:
        """Batch t's `Rollout`, waiting until it is sampled; re-raises the stream's error."""
        with self.changed:
            self.changed.wait_for(lambda: t in self.ready or self.error is not None)
            if t not in self.ready:
                raise RuntimeError("the rollout stream failed") from self.error
            return self.ready.pop(t)

    def stop(self) -> None:
        """Sample no further batch; returns once the one being sampled (if any) is done."""
        with self.changed:
            self.stopped = True
            self.changed.notify_all()
        if self.is_alive():
            self.join()

    def run(self) -> None:
        try:
            for t, (batch, seed) in enumerate(self.batches):
                start, oldest = time.perf_counter(), t + 1 - self.max_staleness
                with self.changed:
                    self.changed.wait_for(lambda v=oldest: self.stopped or self.latest[1] >= v)
                    if self.stopped:
                        return
                    weights, version = self.latest
                self.idle_s += time.perf_counter() - start
                rollout = self.loop.sample(batch, seed, weights, version)
                with self.changed:
                    self.ready[t] = rollout
                    self.changed.notify_all()
        except BaseException as err:  # handed to the learner's side by `take`
            with self.changed:
                self.error = err
                self.changed.notify_all()


def run_streamed(loop: Any, batches: list) -> list[dict[str, float]]:
    """The stage with rollouts streaming ahead of the learner; per-step metrics in order.

    Per step: staleness (versions behind, mean and max over its samples), the learner's idle
    share (waiting for the batch), the rollout side's idle share (waiting on the staleness
    bound), samples/s and step time (from the previous step's end to this one's), sync_s (the
    learner's publishing plus the engines' load of the batch's weights).
    """
    loop.publish()
    stream = RolloutStream(loop, batches, loop.max_staleness)
    stream.start()
    metrics = []
    try:
        last, rollout_idle = time.perf_counter(), 0.0
        for t in range(len(batches)):
            waiting = time.perf_counter()
            rollout = stream.take(t)
            learner_idle = time.perf_counter() - waiting
            result = loop.learn(rollout)
            publish_s = loop.publish()
            stream.offer(loop.weights, loop.version)
            now = time.perf_counter()
            step_s, last = now - last, now
            idle, rollout_idle = stream.idle_s - rollout_idle, stream.idle_s
            result.update(
                sync_s=publish_s + rollout.load_s,
                step_time_s=step_s,
                samples_per_s=len(rollout.samples) / step_s,
                learner_idle=learner_idle / step_s,
                rollout_idle=min(1.0, idle / step_s),
            )
            metrics.append(result)
    finally:
        stream.stop()
    return metrics
