"""Evaluators score a committed checkpoint as the learner that trained it scores its weights."""

from __future__ import annotations

import pytest

from stageflow.actors.group import Placement
from stageflow.core.config import LearnerSpec, StageSpec

CPU = Placement(device="cpu")
SFT = StageSpec(kind="sft", lr=5e-3, batch_size=4, steps=6, max_len=64)


def test_an_evaluator_scores_a_checkpoint_as_its_learner_does(
    learner, actor_model_dir, qa_rows, tmp_path
):
    from stageflow.actors.evaluator import EvaluatorGroup

    items = [*qa_rows[:5], {"prompt": "Q3: name? ", "answer": "something else entirely"}]
    learner.load(actor_model_dir)
    evaluator = EvaluatorGroup(actor_model_dir, LearnerSpec(ranks=1, zero_stage=0), CPU)
    try:
        before = evaluator.answer_stats(items, True)
        learner.train_stage(SFT, qa_rows, seed=0)  # the learner's weights move on
        trained = learner.answer_stats(items, True)
        norms = learner.grad_norms(items[:2])
        learner.save(tmp_path / "model")
        evaluator.load(tmp_path / "model")  # the committed checkpoint
        scored = evaluator.answer_stats(items, True)
        assert evaluator.grad_norms(items[:2]) == pytest.approx(norms, rel=1e-5)
    finally:
        evaluator.shutdown()
    for mine, theirs, old in zip(scored, trained, before):
        assert mine.logprob == pytest.approx(theirs.logprob, abs=1e-4)
        assert mine.token_logprobs == pytest.approx(theirs.token_logprobs, abs=1e-4)
        assert mine.token_zscores == pytest.approx(theirs.token_zscores, abs=1e-3)
        assert (mine.tokens, mine.argmax_hits, mine.extraction_k) == (
            theirs.tokens,
            theirs.argmax_hits,
            theirs.extraction_k,
        )
        assert abs(mine.logprob - old.logprob) > 1e-2  # it scored the new weights, not the base
