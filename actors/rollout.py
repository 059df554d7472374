"""Rollout workers: one generation engine per Ray actor, generation with log-probs, in-place weights.

The engine (`actors/engines.py`: vLLM, or transformers when `backend: hf` is asked for) is
created once per actor and reused across stages and trials: a worker asked to generate with a
`Weights` handle loads it in place first unless it already serves that tag. A `RolloutGroup`
is N workers behind one `ActorGroup` (a trial's own engines, or the study's shared pool).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ray

from stageflow.actors.dispatch import ALL, SPLIT, dispatch, rpc_name
from stageflow.actors.engines import ENGINES
from stageflow.actors.group import ModelGroup, check_fits, resolve_device
from stageflow.actors.rendering import Prompt, encode_prompts
from stageflow.actors.weight_sync import Weights
from stageflow.core.config import RolloutSpec, StudyError
from stageflow.core.models import check_model_dir
from stageflow.core.serving import serving_problem

# lazy: transformers and safetensors load in the rollout worker, not in the process that starts
# the group

# Config keys that may differ between two checkpoints served by one engine.
_NON_ARCH_KEYS = {"torch_dtype", "dtype", "transformers_version", "_name_or_path", "architectures"}


def check_rollout_model(model_dir: str | Path, spec: RolloutSpec, device: str) -> None:
    """Raise StudyError (one sentence) when the engine could not serve `model_dir` (validation
    checked the study's model already; this guards a group started on its own)."""
    spec.check("rollout")
    why = check_model_dir(model_dir)
    if why:
        raise StudyError("", f"model directory '{model_dir}'", f"expected {why}")
    problem = serving_problem(model_dir, spec.backend, device, spec.max_model_len)
    if problem:
        raise StudyError("", problem[0], f"expected {problem[1]}")


def _architecture(model_dir: str | Path) -> dict[str, Any]:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return {k: v for k, v in config.items() if k not in _NON_ARCH_KEYS}


def read_weights_bytes(model_dir: str | Path) -> bytes:
    """The directory's weights as one safetensors payload (single- or multi-file checkpoints)."""
    from safetensors.torch import load_file, save

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if len(files) == 1:
        return files[0].read_bytes()
    merged: dict[str, Any] = {}
    for f in files:
        merged.update(load_file(f))
    return save(merged)


ENGINE_STARTS = 0  # engines started in this process: a rollout actor should start exactly one


class RolloutWorker:
    """A Ray actor holding one generation engine; it serves one `Weights` tag at a time."""

    def __init__(
        self,
        model_dir: str | Path,
        spec: RolloutSpec,
        device: str = "auto",
        seed: int = 0,
    ):
        self.spec, self.device, self.seed = spec, resolve_device(device), seed
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # the KV cache size comes from the spec
        self.host = ray.util.get_node_ip_address() if ray.is_initialized() else "localhost"
        self.engine: Any = None
        self.weights_version = 0
        self._start(str(model_dir))

    def _start(self, model_dir: str) -> None:
        global ENGINE_STARTS
        from transformers import AutoTokenizer

        self.close()
        self.model_dir = model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.engine = ENGINES[self.spec.backend](model_dir, self.spec, self.device, self.seed)
        self.serving = f"dir:{model_dir}"
        self._arch = _architecture(model_dir)
        ENGINE_STARTS += 1

    @dispatch(ALL)
    def close(self) -> None:
        """Stop the engine (and its processes, where it runs in its own)."""
        if self.engine is not None:
            self.engine.close()
        self.engine = None

    @dispatch(ALL)
    def info(self) -> dict[str, Any]:
        """What this worker runs, for the run's records (backend, device, dtype, engine starts...)."""
        return {
            "backend": self.spec.backend,
            "engine": self.engine.describe(),
            "device": self.device,
            "dtype": self.spec.dtype,
            "logprobs_mode": self.spec.logprobs_mode,
            "engine_starts": ENGINE_STARTS,
            "weights_version": self.weights_version,
            "serving": self.serving,
            "model_dir": self.model_dir,
            "host": self.host,
            "pid": os.getpid(),
            "engine_pid": self.engine.engine_pid(),
        }

    # ----- weights ---------------------------------------------------------------------------
    @dispatch(ALL)
    def serve(self, weights: Weights) -> dict[str, float]:
        """Load `weights` in place unless this engine serves their tag already; timings."""
        if weights.tag == self.serving:
            return {"seconds": 0.0}
        start = time.perf_counter()
        if weights.shm_path and weights.host == self.host:
            stats = self.engine.load_shared(weights.shm_path)
            stats["bytes"] = float(os.path.getsize(weights.shm_path))
        elif weights.payload:
            payload = ray.get(weights.payload[0])
            stats = {**self.engine.load_bytes(payload), "bytes": float(len(payload))}
        elif weights.model_dir:
            stats = self._serve_dir(weights.model_dir)
        else:
            raise RuntimeError(
                f"rollout engine on {self.host} cannot load weights '{weights.tag}': "
                + (
                    "they were pushed into an engine that has restarted since"
                    if weights.pushed
                    else f"their shared-memory file is on {weights.host}"
                )  # fmt: skip
            )
        self.serving = weights.tag
        self.weights_version += 1
        return {**stats, "seconds": time.perf_counter() - start}

    def _serve_dir(self, model_dir: str) -> dict[str, float]:
        """A checkpoint: reloaded in place when the architecture matches, else a new engine."""
        if _architecture(model_dir) != self._arch:
            self._start(model_dir)
            return {"restarted": 1.0}
        payload = read_weights_bytes(model_dir)
        self.model_dir = model_dir
        return {**self.engine.load_bytes(payload), "bytes": float(len(payload))}

    def load_model(self, model_dir: str | Path) -> dict[str, Any]:
        """Serve the checkpoint `model_dir`."""
        self.serve(Weights.of_dir(model_dir))
        return self.info()

    def load_weights(self, payload: Any) -> dict[str, float]:
        """Serve a safetensors payload (bytes, or an ObjectRef to them) as a new version."""
        ref = payload if isinstance(payload, ray.ObjectRef) else ray.put(payload)
        return self.serve(Weights(f"payload/{ref.hex()}", payload=[ref]))

    def rpc(self, method: Callable[..., Any], *args: Any, tag: str | None = None) -> Any:
        """`method`, a `WeightReloadExtension` method, in vLLM's worker process; `tag`: what the
        engine serves afterwards."""
        result = self.engine.llm.collective_rpc(rpc_name(method), args=args)[0]
        if tag is not None:
            self.serving, self.weights_version = tag, self.weights_version + 1
        return result

    @dispatch(ALL)
    def sleep(self) -> None:
        self.engine.sleep()

    @dispatch(ALL)
    def wake(self) -> None:
        self.engine.wake()

    # ----- generation ------------------------------------------------------------------------
    @dispatch(SPLIT)
    def generate(
        self,
        prompts: Sequence[Prompt],
        weights: Weights | None = None,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_tokens: int = 32,
        seed: int | None = None,
        ignore_eos: bool = False,
    ) -> dict[str, list]:
        """Sample `n` completions per prompt (with `weights` loaded first, when given).

        Returns per prompt: `texts` [n], `token_ids` [n][len], `logprobs` [n][len] (log-prob of
        each sampled token under the sampling distribution, see `logprobs_mode`), and
        `prompt_token_ids` (the ids the engine saw, BOS included); `load_s`: the weight load
        this call needed. `ignore_eos` samples exactly `max_tokens` tokens (benchmarks).
        """
        load = self.serve(weights) if weights is not None else {"seconds": 0.0}
        prompt_ids = encode_prompts(self.tokenizer, prompts)
        out: dict[str, Any] = {"texts": [], "token_ids": [], "logprobs": []}
        out.update(prompt_token_ids=prompt_ids, load_s=[load["seconds"]])
        if not prompt_ids:
            return out
        seed = self.seed if seed is None else seed
        samples = self.engine.generate(
            prompt_ids, n, temperature, top_p, max_tokens, seed, ignore_eos
        )
        for ids, lps in samples:
            out["texts"].append([self.tokenizer.decode(s, skip_special_tokens=True) for s in ids])
            out["token_ids"].append(ids)
            out["logprobs"].append(lps)
        return out

    def score(
        self, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int]
    ) -> list[list[float]]:
        """Teacher-forced log-probs of each sequence's tokens after its prompt (raw, T = 1)."""
        return self.engine.score(sequences, prompt_lens)


class RolloutGroup(ModelGroup):
    """`spec.workers` rollout actors behind one ActorGroup; prompts are split across them.

    The group remembers the latest `Weights` it was asked to serve, so a call without weights
    (or a replaced worker) generates with them.
    """

    worker, name = RolloutWorker, "rollout"

    def __init__(self, model_dir: str | Path, *args: Any, **kwargs: Any):
        super().__init__(model_dir, *args, **kwargs)
        self.latest = Weights.of_dir(model_dir)

    @property
    def ranks(self) -> int:
        return self.spec.workers

    def check(self, model_dir: str | Path, cpus: float) -> None:
        check_rollout_model(model_dir, self.spec, self.device)
        check_fits("rollout.workers", self.spec.workers, cpus)

    def hosts(self) -> list[str]:
        return [info["host"] for info in self.info()]

    def serve(self, weights: Weights) -> list[dict[str, float]]:
        """Every worker loads `weights` now (unless it serves them already)."""
        self.latest = weights
        return self.group.run(RolloutWorker.serve, weights)

    def generate(
        self, prompts: Sequence[Prompt], weights: Weights | None = None, **sampling: Any
    ) -> dict[str, list]:
        """`RolloutWorker.generate` with the prompts split across workers (results in order)."""
        self.latest = weights or self.latest
        return self.group.run(RolloutWorker.generate, list(prompts), self.latest, **sampling)

    def load_weights(self, payload: Any) -> list[dict[str, float]]:
        """Every worker serves a safetensors payload (bytes or an ObjectRef to them)."""
        ref = payload if isinstance(payload, ray.ObjectRef) else ray.put(payload)
        return self.serve(Weights(f"payload/{ref.hex()}", payload=[ref]))

    def load_model(self, model_dir: str | Path) -> list[dict[str, float]]:
        """Every worker serves the checkpoint `model_dir`."""
        return self.serve(Weights.of_dir(model_dir))

    def shutdown(self) -> None:
        try:
            self.close()
        except Exception:  # a dead worker has nothing left to close
            pass
        self.group.shutdown()
