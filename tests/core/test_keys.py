"""Cache keys cover everything that made a result; seeds do not depend on keys."""

from __future__ import annotations

import dataclasses
import json
import shutil

from stageflow.core.config import LearnerSpec, LoraSpec, RolloutSpec, StageSpec, StudySpec
from stageflow.core.keys import (
    base_key,
    code_version,
    digest,
    eval_key,
    model_identity,
    rows_digest,
    stage_key,
    stage_seed,
)

DATA = {"data": "d1", "retain": None, "probe": None}


def test_model_identity_is_every_file_of_the_directory(tmp_path, tiny_model_dir):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    assert model_identity(copy) == model_identity(tiny_model_dir)  # content, not location
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1  # the middle of the weights, not only their ends
    weights.write_bytes(bytes(data))
    assert model_identity(copy) != model_identity(tiny_model_dir)
    shutil.copy(tiny_model_dir / "model.safetensors", weights)
    assert model_identity(copy) == model_identity(tiny_model_dir)
    config = copy / "tokenizer_config.json"
    settings = json.loads(config.read_text())
    settings["chat_template"] = "{{ messages[0]['content'] }}"  # a template added
    config.write_text(json.dumps(settings))
    assert model_identity(copy) != model_identity(tiny_model_dir)


def test_model_identity_memo_reads_unchanged_weights_once(tmp_path, tiny_model_dir):
    copy, memo = tmp_path / "copy", tmp_path / "memo.json"
    shutil.copytree(tiny_model_dir, copy)
    first = model_identity(copy, memo)
    assert str(copy / "model.safetensors") in json.loads(memo.read_text())
    assert model_identity(copy, memo) == first
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[100] ^= 1
    weights.write_bytes(bytes(data))  # new mtime: the memo does not hide the change
    assert model_identity(copy, memo) != first


def test_stage_key_covers_data_learner_seed_and_sampling():
    spec, stage = StudySpec(name="k"), StageSpec(kind="sft")

    def key(**change) -> str:
        args = {
            "parent": "p",
            "seed": 1,
            "stage": stage,
            "spec": spec,
            "data": DATA,
            "samples": False,
        }
        return stage_key(**{**args, **change})

    variants = [
        key(),
        key(parent="q"),
        key(seed=2),
        key(stage=dataclasses.replace(stage, lr=2e-3)),
        key(data={**DATA, "data": "d2"}),  # the same spec, other rows
        key(data={**DATA, "retain": "r"}),
        key(spec=dataclasses.replace(spec, learner=LearnerSpec(zero_stage=2))),
        key(spec=dataclasses.replace(spec, learner=LearnerSpec(lora=LoraSpec(r=4)))),
    ]
    assert len(set(variants)) == len(variants)
    other_engines = dataclasses.replace(spec, rollout=RolloutSpec(max_model_len=320))
    assert key(spec=other_engines) == key()  # a stage that does not sample
    assert key(spec=other_engines, samples=True) != key(samples=True)
    placed = dataclasses.replace(spec, rollout=RolloutSpec(workers=3, placement="per_trial"))
    assert key(spec=placed, samples=True) == key(samples=True)  # where engines run: not a key
    threads = dataclasses.replace(
        spec, resources=dataclasses.replace(spec.resources, threads_per_actor=3)
    )
    assert key(spec=threads) != key()


def test_eval_key_covers_the_whole_set_spec_and_its_rows():
    from stageflow.core.config import EvalSetSpec

    spec, eval_set = StudySpec(name="k"), EvalSetSpec(metrics=["accuracy"])

    def key(**change) -> str:
        args = {
            "checkpoint": "c",
            "seed": 1,
            "name": "facts",
            "eval_set": eval_set,
            "spec": spec,
            "rows": "r",
            "truth_ratios": False,
            "generates": True,
        }
        return eval_key(**{**args, **change})

    variants = [
        key(),
        key(checkpoint="d"),
        key(eval_set=dataclasses.replace(eval_set, max_new_tokens=40)),
        key(eval_set=dataclasses.replace(eval_set, samples=5)),
        key(rows="s"),
        key(truth_ratios=True),
        key(spec=dataclasses.replace(spec, rollout=RolloutSpec(dtype="bfloat16"))),
        key(spec=dataclasses.replace(spec, learner=LearnerSpec(kernels="naive"))),
    ]
    assert len(set(variants)) == len(variants)


def test_seeds_come_from_the_trial_seed_and_the_path_not_from_keys():
    assert stage_seed(0, ["pretrain"]) == stage_seed(0, ["pretrain"])
    seeds = {
        stage_seed(0, ["a"]),
        stage_seed(1, ["a"]),
        stage_seed(0, ["a", "b"]),
        stage_seed(0, ["b", "a"]),
    }
    assert len(seeds) == 4 and all(0 <= s < 2**31 for s in seeds)
    # a key is a function of its seed and more; the seed is a function of (seed, names) only
    assert base_key("m", 0, "c") != base_key("m", 0, "d") != base_key("m", 1, "c")


def test_rows_digest_and_code_version():
    rows = [{"prompt": "a", "answer": "b"}]
    assert rows_digest(rows) == rows_digest([{"answer": "b", "prompt": "a"}])
    assert rows_digest(rows) != rows_digest([{"prompt": "a", "answer": "c"}])
    assert rows_digest(None) is None and rows_digest([]) != rows_digest(rows)
    assert code_version() == code_version() and len(code_version()) == 16
    assert digest(1, "a") == digest(1, "a") != digest(2, "a")
