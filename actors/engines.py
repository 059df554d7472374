"""Generation engines behind one interface: vLLM (the default) and transformers `generate`.

A `RolloutWorker` holds one engine. Every engine loads new weights in place (safetensors bytes
or a shared-memory weight file), samples completions of token-id prompts with per-token
log-probs, and says what it is. vLLM runs its model in the worker's own process or in its
engine-core and worker processes (`rollout.engine_process`) and reloads weights through
`weight_sync.WeightReloadExtension`; the `hf` backend exists only as an
explicit, recorded choice (`rollout.backend: hf`), never as a fallback.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from stageflow.actors.dispatch import rpc_name
from stageflow.actors.weight_sync import WeightReloadExtension, read_shared_weights
from stageflow.core.config import RolloutSpec
from stageflow.core.models import attention_implementation

# lazy: vLLM (transformers for the hf backend) loads only in the engine's own process

Samples = list[tuple[list[list[int]], list[list[float]]]]  # per prompt: (ids [n], logprobs [n])


class Engine:
    """What a rollout worker needs of a generation engine."""

    name = "engine"

    def __init__(self, model_dir: str, spec: RolloutSpec, device: str, seed: int):
        self.model_dir, self.spec, self.device, self.seed = model_dir, spec, device, seed

    def describe(self) -> str:
        """The engine and its version, for the run's records."""
        raise NotImplementedError

    def engine_pid(self) -> int:
        """The process that runs the model."""
        return os.getpid()

    def load_bytes(self, payload: bytes) -> dict[str, float]:
        """Swap in a safetensors payload; counts and timings."""
        raise NotImplementedError

    def load_shared(self, path: str) -> dict[str, float]:
        """Swap in a shared-memory weight file (weight_sync.write_shared_weights)."""
        raise NotImplementedError

    def generate(
        self,
        prompt_ids: list[list[int]],
        n: int,
        temperature: float,
        top_p: float,
        max_tokens: int,
        seed: int,
        ignore_eos: bool,
    ) -> Samples:
        raise NotImplementedError

    def sleep(self) -> None:
        """Hand the accelerator memory back (colocated placement); a no-op where not possible."""

    def wake(self) -> None:
        """Take the memory again before the next generation."""

    def close(self) -> None:
        """Stop the engine (its processes included)."""


def engine_in_actor(spec: RolloutSpec, device: str) -> bool:
    """Whether vLLM runs in the rollout actor's process (`rollout.engine_process`)."""
    if spec.engine_process == "auto":
        return device == "cpu"
    return spec.engine_process == "in_actor"


class VLLMEngine(Engine):
    """vLLM's offline `LLM`, with the stageflow weight-reload extension in its worker."""

    name = "vllm"

    def __init__(self, model_dir: str, spec: RolloutSpec, device: str, seed: int):
        from vllm import LLM

        super().__init__(model_dir, spec, device, seed)
        self.in_actor = engine_in_actor(spec, device)
        extra: dict[str, Any] = {}
        if self.in_actor:
            # read when the engine is made; this process holds no other engine of another kind
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            extra["distributed_executor_backend"] = "uni"
        if device == "cpu":
            # vLLM 0.32 on CPU: a seeded request whose prefill is split across steps makes
            # the sampler call set_offset on a CPU generator, which kills the engine.
            extra["enable_chunked_prefill"] = False
            extra["max_num_batched_tokens"] = max(spec.max_model_len, 8192)
        else:
            extra["enable_sleep_mode"] = spec.placement == "colocated"
        self.llm = LLM(
            model=model_dir,
            dtype=spec.dtype,
            max_model_len=spec.max_model_len,
            gpu_memory_utilization=spec.gpu_memory_utilization,
            kv_cache_memory_bytes=int(spec.kv_cache_gib * 2**30),
            worker_extension_cls=f"{WeightReloadExtension.__module__}.WeightReloadExtension",
            logprobs_mode=spec.logprobs_mode,
            seed=seed,
            enforce_eager=device == "cpu",
            **extra,
        )
        self.asleep = False

    def describe(self) -> str:
        import vllm

        where = "in the actor's process" if self.in_actor else "in its own processes"
        return f"vllm {vllm.__version__}, {where}"

    def engine_pid(self) -> int:
        return self.llm.collective_rpc(rpc_name(WeightReloadExtension.process_id))[0]

    def load_bytes(self, payload: bytes) -> dict[str, float]:
        return self.llm.collective_rpc(
            rpc_name(WeightReloadExtension.reload_from_bytes), args=(payload,)
        )[0]

    def load_shared(self, path: str) -> dict[str, float]:
        return self.llm.collective_rpc(
            rpc_name(WeightReloadExtension.reload_from_shared), args=(path,)
        )[0]

    def generate(self, prompt_ids, n, temperature, top_p, max_tokens, seed, ignore_eos) -> Samples:
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
        return [
            (
                [list(c.token_ids) for c in out.outputs],
                [
                    [c.logprobs[t][tok].logprob for t, tok in enumerate(c.token_ids)]
                    for c in out.outputs
                ],
            )
            for out in outputs
        ]

    def score(self, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int]):
        """Teacher-forced log-probs of each sequence's tokens after its prompt (raw, T = 1)."""
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

    def sleep(self) -> None:
        if self.device == "cuda" and not self.asleep:
            self.llm.sleep(level=1)  # weights offloaded to CPU memory, KV cache dropped
            self.asleep = True

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def close(self) -> None:
        try:
            self.llm.llm_engine.engine_core.shutdown()
        except Exception:  # best effort: the process may already be gone
            pass


class HFEngine(Engine):
    """transformers `generate` in the worker's own process (`rollout.backend: hf`)."""

    name = "hf"

    def __init__(self, model_dir: str, spec: RolloutSpec, device: str, seed: int):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        super().__init__(model_dir, spec, device, seed)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        dtype = getattr(torch, spec.dtype)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, attn_implementation=attention_implementation(model_dir)
        )
        self.model.to(device).eval()

    def describe(self) -> str:
        return "transformers generate"

    def _load(self, weights: dict) -> dict[str, float]:
        self.model.load_state_dict(weights, strict=False)
        return {"tensors": len(weights)}

    def load_bytes(self, payload: bytes) -> dict[str, float]:
        from safetensors.torch import load

        return self._load(load(payload))

    def load_shared(self, path: str) -> dict[str, float]:
        return self._load(read_shared_weights(path))

    def generate(self, prompt_ids, n, temperature, top_p, max_tokens, seed, ignore_eos) -> Samples:
        import torch

        from stageflow.actors.batching import left_padded  # lazy: torch, in the engine's process

        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids, attention = left_padded(prompt_ids, pad)
        width = ids.shape[1]
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
        raw = self.spec.logprobs_mode == "raw_logprobs" or greedy
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

    def score(self, sequences, prompt_lens):
        raise NotImplementedError("score() uses vLLM prompt log-probs; the hf backend has none")


ENGINES: dict[str, type[Engine]] = {"vllm": VLLMEngine, "hf": HFEngine}
