"""Tokenisation and collation: the loss mask falls on the answer tokens exactly."""

from __future__ import annotations

from stageflow.actors.batching import (
    collate,
    collate_rows,
    completion_values,
    encode_row,
    place_completion_values,
)
from stageflow.platform.models import char_tokenizer


def test_encode_row_masks_answer_and_eos():
    tok = char_tokenizer()
    ids, n_prompt = encode_row(tok, "ab", "xyz", max_len=64)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert n_prompt == 3  # <s> a b
    assert tok.decode(ids[n_prompt:-1]) == "xyz"
    batch = collate_rows(
        tok, [{"prompt": "ab", "answer": "xyz"}, {"prompt": "a", "answer": "b"}], 64
    )
    targets = batch.targets[0][batch.mask[0].bool()].tolist()
    assert targets == ids[n_prompt:]  # x y z </s>
    assert batch.mask[1].sum() == 2  # b </s>
    assert batch.num_target_tokens == 6


def test_truncation_keeps_prompt_and_cuts_answer():
    tok = char_tokenizer()
    ids, n_prompt = encode_row(tok, "abcd", "efgh", max_len=6)
    assert len(ids) == 6 and n_prompt == 5
    assert collate([ids], [n_prompt], tok.pad_token_id).mask.sum() == 1


def test_completion_values_round_trip():
    batch = collate([[1, 5, 6, 7], [1, 5, 8]], [2, 2], pad_id=0)
    values = [[-0.1, -0.2], [-0.3]]
    placed = place_completion_values(values, batch)
    assert placed.shape == batch.mask.shape
    assert (placed != 0).sum() == 3
    back = completion_values(placed, batch)
    assert [[round(v, 6) for v in row] for row in back] == values
