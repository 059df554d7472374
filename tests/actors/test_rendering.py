"""Rows to token ids: plain prompts, and chat rows rendered exactly as the chat template does."""

from __future__ import annotations

import pytest

from stageflow.actors.batching import collate, collate_rows
from stageflow.actors.rendering import encode_prompts, encode_row, render_row, row_prompt
from stageflow.core.models import char_tokenizer


@pytest.fixture(scope="module")
def chat_tokenizer():
    from stageflow.core.arch_models import task_corpus, train_bpe_tokenizer

    return train_bpe_tokenizer(task_corpus(50))


def test_encode_row_masks_answer_and_eos():
    tok = char_tokenizer()
    ids, n_prompt = encode_row(tok, {"prompt": "ab", "answer": "xyz"}, max_len=64)
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
    ids, n_prompt = encode_row(tok, {"prompt": "abcd", "answer": "efgh"}, max_len=6)
    assert len(ids) == 6 and n_prompt == 5
    assert collate([ids], [n_prompt], tok.pad_token_id).mask.sum() == 1


def test_chat_row_is_the_templates_rendering(chat_tokenizer):
    tok = chat_tokenizer
    row = render_row(
        {"prompt": "Q: Ann has 3 pens. How many pens?\nA:", "answer": " 3"}, True, "Be brief."
    )
    messages = row["messages"]
    assert [m["role"] for m in messages] == ["system", "user"]
    ids, n_prompt = encode_row(tok, row, max_len=1 << 20)
    prompt_ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    full = tok.apply_chat_template(
        [*messages, {"role": "assistant", "content": " 3"}], return_dict=False
    )
    assert ids[:n_prompt] == list(prompt_ids)
    # the answer, then its end-of-turn token (EOS); the template's trailing newline is not trained
    assert ids == list(full)[: len(ids)] and ids[-1] == tok.eos_token_id
    assert len(ids) < len(full) and tok.decode(ids[n_prompt:-1]) == " 3"
    mask = collate_rows(tok, [row], 1 << 20).mask[0]
    assert mask.sum() == len(ids) - n_prompt  # answer tokens + end-of-turn, nothing else
    assert encode_prompts(tok, [row_prompt(row)]) == [list(prompt_ids)]


def test_plain_rendering_drops_turns_and_keeps_text(chat_tokenizer):
    row = {"prompt": "hi", "answer": "yo", "messages": [{"role": "user", "content": "hi"}]}
    plain = render_row(row, False, None)
    assert "messages" not in plain and row_prompt(plain) == "hi"
    ids, n_prompt = encode_row(chat_tokenizer, plain, 64)
    assert ids[:n_prompt] == chat_tokenizer("hi")["input_ids"]
    kept = render_row(row, True, "sys")  # the row's own turns, after the system prompt
    assert kept["messages"][0] == {"role": "system", "content": "sys"}
    assert kept["messages"][1:] == row["messages"]
