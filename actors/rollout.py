"""Rollout workers: one vLLM engine per Ray actor, generation with log-probs, in-place weight reload.

The engine is created once per actor and reused across stages and trials: new weights are loaded
into the running engine through `weight_sync.WeightReloadExtension` (a vLLM worker extension
whose methods run inside vLLM's worker process via `llm.collective_rpc`). The transformers
`generate` backend exists only as an explicit choice (`backend: hf`); the worker reports which
backend it runs (`info()`), so the run can record it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

from stageflow.actors.batching import encode_prompts
from stageflow.actors.group import ActorGroup, ActorSetupError, check_fits
from stageflow.platform.models import check_model_dir

# vLLM-CPU attention kernels support only these head sizes (vllm/v1/attention/backends/cpu_attn.py).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
BACKENDS = ("vllm", "hf")
COMMON_ARCHITECTURES = {
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "Phi3ForCausalLM",
}
LOGPROBS_MODES = ("processed_logprobs", "raw_logprobs")
# Config keys that may differ between two checkpoints served by one engine.
_NON_ARCH_KEYS = {"torch_dtype", "dtype", "transformers_version", "_name_or_path", "architectures"}


@dataclass(frozen=True)
class RolloutOptions:
    """Engine options (the fields of RolloutSpec that a worker needs)."""

    backend: str = "vllm"
    dtype: str = "float32"
    max_model_len: int = 512
    kv_cache_gib: float = 0.5
    gpu_memory_utilization: float = 0.25
    logprobs_mode: str = "processed_logprobs"

    @classmethod
    def from_spec(cls, spec: Any = None, **overrides: Any) -> RolloutOptions:
        """From a RolloutSpec (or dict), keeping only the fields a worker uses."""
        values = asdict(spec) if is_dataclass(spec) else dict(spec or {})
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in {**values, **overrides}.items() if k in names})


def resolve_device(device: str = "auto") -> str:
    """'cuda' or 'cpu'; 'auto' picks cuda when the Ray cluster (or this process) has a GPU."""
    if device == "auto":
        import ray
        import torch

        if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0:
            return "cuda"
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ActorSetupError(f"resources.device: expected auto, cpu or cuda, got '{device}'")
    return device


def check_rollout_model(model_dir: str | Path, options: RolloutOptions, device: str) -> None:
    """Raise ActorSetupError (one sentence) when the engine could not serve `model_dir`."""
    why = check_model_dir(model_dir)
    if why:
        raise ActorSetupError(f"model directory '{model_dir}': expected {why}")
    if options.backend not in BACKENDS:
        raise ActorSetupError(f"rollout.backend: expected vllm or hf, got '{options.backend}'")
    if options.logprobs_mode not in LOGPROBS_MODES:
        raise ActorSetupError(
            f"rollout logprobs_mode: expected one of {LOGPROBS_MODES}, got '{options.logprobs_mode}'"
        )
    config = json.loads((Path(model_dir) / "config.json").read_text())
    if options.backend == "vllm":
        unknown = [a for a in config.get("architectures") or [] if a not in COMMON_ARCHITECTURES]
        if unknown:  # importing vLLM's registry costs seconds: only for uncommon architectures
            from vllm import ModelRegistry

            supported = set(ModelRegistry.get_supported_archs())
            if not any(a in supported for a in config.get("architectures")):
                raise ActorSetupError(
                    f"model directory '{model_dir}': vLLM does not support its architecture "
                    f"{', '.join(config['architectures'])} (use backend: hf)"
                )
    if options.backend == "vllm" and device == "cpu":
        hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
        head_dim = config.get("head_dim") or (hidden // heads if hidden and heads else None)
        if head_dim is not None and head_dim not in CPU_HEAD_SIZES:
            raise ActorSetupError(
                f"model directory '{model_dir}': vLLM-CPU supports attention head sizes "
                f"{', '.join(map(str, CPU_HEAD_SIZES))}, this model has {head_dim} "
                "(use backend: hf or a model with another hidden_size / num_heads)"
            )
    max_pos = config.get("max_position_embeddings")
    if max_pos is not None and options.max_model_len > max_pos:
        raise ActorSetupError(
            f"rollout.max_model_len: {options.max_model_len} exceeds the model's "
            f"max_position_embeddings {max_pos}"
        )


def _architecture(model_dir: str | Path) -> dict[str, Any]:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return {k: v for k, v in config.items() if k not in _NON_ARCH_KEYS}


def _read_weights_bytes(model_dir: str | Path) -> bytes:
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
    """A Ray actor holding one generation engine (vLLM, or transformers when asked for `hf`)."""

    def __init__(
        self,
        model_dir: str | Path,
        options: RolloutOptions | dict | None = None,
        device: str = "auto",
        seed: int = 0,
    ):
        self.options = (
            options if isinstance(options, RolloutOptions) else RolloutOptions.from_spec(options)
        )
        self.device = resolve_device(device)
        self.seed = seed
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # the KV cache size comes from options
        self.llm: Any = None
        self.model: Any = None
        self.weights_version = 0
        self._start(str(model_dir))

    # ----- engine ----------------------------------------------------------------------------
    def _start(self, model_dir: str) -> None:
        global ENGINE_STARTS
        from transformers import AutoTokenizer

        self.close()
        self.model_dir = model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if self.options.backend == "vllm":
            from vllm import LLM

            extra: dict[str, Any] = {}
            if self.device == "cpu":
                # vLLM 0.32 on CPU: a seeded request whose prefill is split across steps makes
                # the sampler call set_offset on a CPU generator, which kills the engine.
                extra = {
                    "enable_chunked_prefill": False,
                    "max_num_batched_tokens": max(self.options.max_model_len, 8192),
                }
            self.llm = LLM(
                model=model_dir,
                dtype=self.options.dtype,
                max_model_len=self.options.max_model_len,
                gpu_memory_utilization=self.options.gpu_memory_utilization,
                kv_cache_memory_bytes=int(self.options.kv_cache_gib * 2**30),
                worker_extension_cls="stageflow.actors.weight_sync.WeightReloadExtension",
                logprobs_mode=self.options.logprobs_mode,
                seed=self.seed,
                enforce_eager=self.device == "cpu",
                **extra,
            )
        else:
            import torch
            from transformers import AutoModelForCausalLM

            dtype = getattr(torch, self.options.dtype)
            self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
            self.model.to(self.device).eval()
        self._arch = _architecture(model_dir)
        ENGINE_STARTS += 1

    def close(self) -> None:
        """Stop the engine (its engine-core process included)."""
        if self.llm is not None:
            try:
                self.llm.llm_engine.engine_core.shutdown()
            except Exception:  # best effort: the process may already be gone
                pass
        self.llm = self.model = None

    def info(self) -> dict[str, Any]:
        """What this worker runs, for the run's records (backend, device, dtype, engine starts...)."""
        engine = "transformers generate"
        if self.options.backend == "vllm":
            import vllm

            engine = f"vllm {vllm.__version__}"
        return {
            "backend": self.options.backend,
            "engine": engine,
            "device": self.device,
            "dtype": self.options.dtype,
            "logprobs_mode": self.options.logprobs_mode,
            "engine_starts": ENGINE_STARTS,
            "weights_version": self.weights_version,
            "model_dir": self.model_dir,
            "pid": os.getpid(),
            "engine_pid": self._engine_pid(),
        }

    def _engine_pid(self) -> int:
        """The process that runs the model (vLLM's engine-core worker, or this actor for hf)."""
        if self.llm is None:
            return os.getpid()
        return self.llm.collective_rpc("process_id")[0]

    # ----- weights ---------------------------------------------------------------------------
    def load_weights(self, payload: bytes) -> dict[str, float]:
        """Swap in new weights (a safetensors payload) without restarting the engine."""
        start = time.perf_counter()
        if self.options.backend == "vllm":
            stats = self.llm.collective_rpc("reload_from_bytes", args=(payload,))[0]
        else:
            from safetensors.torch import load

            weights = load(payload)
            self.model.load_state_dict(weights, strict=False)
            stats = {"tensors": len(weights)}
        self.weights_version += 1
        return {**stats, "bytes": len(payload), "seconds": time.perf_counter() - start}

    def load_shared_weights(self, path: str) -> dict[str, float]:
        """Swap in weights from a shared-memory file written by learner rank 0 (same node)."""
        start = time.perf_counter()
        if self.options.backend == "vllm":
            stats = self.llm.collective_rpc("reload_from_shared", args=(path,))[0]
        else:
            from stageflow.actors.weight_sync import read_shared_weights

            weights = read_shared_weights(path)
            self.model.load_state_dict(weights, strict=False)
            stats = {"tensors": len(weights)}
        self.weights_version += 1
        size = float(os.path.getsize(path))
        return {**stats, "bytes": size, "seconds": time.perf_counter() - start}

    def load_model(self, model_dir: str | Path) -> dict[str, Any]:
        """Serve `model_dir`: reload weights when the architecture matches, else restart."""
        model_dir = str(model_dir)
        if model_dir == self.model_dir and self.weights_version == 0:
            return self.info()
        if _architecture(model_dir) == self._arch:
            self.load_weights(_read_weights_bytes(model_dir))
            self.model_dir = model_dir
        else:
            self._start(model_dir)
        return self.info()

    # ----- generation ------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[str],
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_tokens: int = 32,
        seed: int | None = None,
        ignore_eos: bool = False,
    ) -> dict[str, list]:
        """Sample `n` completions per prompt.

        Returns per prompt: `texts` [n], `token_ids` [n][len], `logprobs` [n][len] (log-prob of
        each sampled token under the sampling distribution, see `logprobs_mode`), and
        `prompt_token_ids` (the ids the engine saw, BOS included). `ignore_eos` samples exactly
        `max_tokens` tokens (benchmarks).
        """
        prompt_ids = encode_prompts(self.tokenizer, prompts)
        if not prompt_ids:
            return {"texts": [], "token_ids": [], "logprobs": [], "prompt_token_ids": []}
        seed = self.seed if seed is None else seed
        if self.options.backend == "vllm":
            run = self._generate_vllm
        else:
            run = self._generate_hf
        samples = run(prompt_ids, n, temperature, top_p, max_tokens, seed, ignore_eos)
        texts = [
            [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in s] for s, _ in samples
        ]
        return {
            "texts": texts,
            "token_ids": [s for s, _ in samples],
            "logprobs": [lp for _, lp in samples],
            "prompt_token_ids": prompt_ids,
        }

    def _generate_vllm(self, prompt_ids, n, temperature, top_p, max_tokens, seed, ignore_eos):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [
            SamplingParams(
                n=n,
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_tokens,
                logprobs=0,
                seed=seed + i,
                ignore_eos=ignore_eos,
            )
            for i in range(len(prompt_ids))
        ]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params, use_tqdm=False
        )
        samples = []
        for out in outputs:
            ids = [list(c.token_ids) for c in out.outputs]
            lps = [
                [c.logprobs[t][tok].logprob for t, tok in enumerate(c.token_ids)]
                for c in out.outputs
            ]
            samples.append((ids, lps))
        return samples

    def _generate_hf(self, prompt_ids, n, temperature, top_p, max_tokens, seed, ignore_eos):
        import torch

        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        width = max(len(p) for p in prompt_ids)
        ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for i, p in enumerate(prompt_ids):  # left padding
            ids[i, width - len(p) :] = torch.tensor(p)
            attention[i, width - len(p) :] = 1
        torch.manual_seed(seed)
        greedy = temperature <= 0
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=attention.to(self.device),
                do_sample=not greedy,
                temperature=None if greedy else temperature,
                top_p=None if greedy else top_p,
                top_k=None,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens if ignore_eos else None,
                num_return_sequences=n,
                pad_token_id=pad,
                eos_token_id=tok.eos_token_id,
                return_dict_in_generate=True,
                output_scores=True,
                output_logits=True,
            )
        new = out.sequences[:, width:].cpu()
        raw = self.options.logprobs_mode == "raw_logprobs" or greedy
        steps = torch.stack(list(out.logits if raw else out.scores), dim=1).float().cpu()
        logps = torch.log_softmax(steps, dim=-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
        samples = []
        for i in range(len(prompt_ids)):
            seqs, lps = [], []
            for j in range(i * n, (i + 1) * n):
                row = new[j].tolist()
                stop = len(row)
                if not ignore_eos and tok.eos_token_id in row:
                    stop = row.index(tok.eos_token_id) + 1
                seqs.append(row[:stop])
                lps.append(logps[j, :stop].tolist())
            samples.append((seqs, lps))
        return samples

    def score(
        self, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int]
    ) -> list[list[float]]:
        """Teacher-forced log-probs of each sequence's tokens after its prompt (raw, T = 1)."""
        if self.options.backend != "vllm":
            raise NotImplementedError("score() uses vLLM prompt log-probs; the hf backend has none")
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(s)) for s in sequences], params, use_tqdm=False
        )
        return [
            [out.prompt_logprobs[t][seq[t]].logprob for t in range(n_prompt, len(seq))]
            for out, seq, n_prompt in zip(outputs, sequences, prompt_lens)
        ]


class RolloutGroup:
    """`workers` rollout actors behind one ActorGroup; prompts are split across them."""

    def __init__(
        self,
        model_dir: str | Path,
        spec: Any = None,
        *,
        device: str = "auto",
        cpus_per_actor: float = 1.0,
        seed: int = 0,
        **overrides: Any,
    ):
        options = RolloutOptions.from_spec(spec, **overrides)
        workers = spec.get("workers", 1) if isinstance(spec, dict) else getattr(spec, "workers", 1)
        self.device = resolve_device(device)
        check_rollout_model(model_dir, options, self.device)
        check_fits("rollout.workers", workers, cpus_per_actor)
        self._latest: tuple[str, Any] | None = None  # what a replaced worker must load again
        self.group = ActorGroup(
            RolloutWorker,
            workers,
            args=(str(model_dir), options, self.device, seed),
            num_cpus=cpus_per_actor,
            num_gpus=1.0 if self.device == "cuda" else 0.0,
            name="rollout",
            on_replace=self._restore,
        )

    def _restore(self, group: ActorGroup, rank: int) -> None:
        """A replaced worker starts from the base model: give it the latest weights again."""
        import ray

        if self._latest is not None:
            method, arg = self._latest
            if method == "load_shared_weights" and not os.path.exists(arg):
                raise RuntimeError(
                    f"rollout worker {rank} was replaced but its weights' shared file is closed; "
                    "sync the weights again"
                )
            ray.get(getattr(group.actors[rank], method).remote(arg))

    @property
    def actors(self) -> list[Any]:
        return self.group.actors

    def generate(self, prompts: Sequence[str], **sampling: Any) -> dict[str, list]:
        """`RolloutWorker.generate` with the prompts split across workers (results in order)."""
        return self.group.call_split("generate", list(prompts), **sampling)

    def load_weights(self, payload: Any) -> list[dict[str, float]]:
        """Every worker loads `payload` (safetensors bytes or an ObjectRef to them)."""
        import ray

        ref = payload if isinstance(payload, ray.ObjectRef) else ray.put(payload)
        self._latest = ("load_weights", ref)
        return self.group.call("load_weights", ref)

    def load_shared_weights(self, path: str) -> list[dict[str, float]]:
        """Every worker reloads from the shared-memory file `path` (same node as the writer)."""
        self._latest = ("load_shared_weights", path)
        return self.group.call("load_shared_weights", path)

    def load_model(self, model_dir: str | Path) -> list[dict[str, Any]]:
        """Every worker serves `model_dir` (weights reloaded in place when the architecture fits)."""
        self._latest = ("load_model", str(model_dir))
        return self.group.call("load_model", str(model_dir))

    def info(self) -> list[dict[str, Any]]:
        """Each worker's `info()` (backend, engine, device, dtype...), for the run's records."""
        return self.group.call("info")

    def shutdown(self) -> None:
        try:
            self.group.call("close")
        except Exception:  # a dead worker has nothing left to close
            pass
        self.group.shutdown()
