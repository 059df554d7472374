"""How a row becomes token ids: the same ids in the learner, the rollout engines and evaluation.

A row {"prompt", "answer"} becomes tokenizer(prompt) (with the tokenizer's BOS) followed by
tokenizer(answer) (no special tokens) and EOS, truncated to `max_len`. Prompt and answer are
tokenised separately so the loss mask falls exactly on the answer tokens for any tokenizer.
A row with `messages` (its prompt turns; the trial puts them there when its data is rendered
through the model's chat template) becomes the template's rendering of those turns with the
generation prompt, then the assistant's answer up to and including its end-of-turn token (EOS):
the loss covers the answer and that token only. Torch-free: the trial process imports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

Prompt = str | list[dict[str, str]]  # plain text, or chat turns [{"role", "content"}, ...]


def row_prompt(row: dict[str, Any]) -> Prompt:
    """What a row's prompt is rendered from: its chat turns when it has them, else its text."""
    return row["messages"] if row.get("messages") else row["prompt"]


def render_row(row: dict, chat: bool, system: str | None) -> dict:
    """`row` with its chat turns (`messages`: a system prompt, then its turns or its prompt as the
    user's) when `chat`, else without them (its prompt text is rendered as it is)."""
    plain = {k: v for k, v in row.items() if k != "messages"}
    if not chat:
        return plain
    turns = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
    if system and turns[0]["role"] != "system":
        turns = [{"role": "system", "content": system}, *turns]
    return {**plain, "messages": turns}


def renders_chat(template: str, model_has_template: bool) -> bool:
    """Whether a data set's rows are rendered as chat (`data.template`: auto, chat, plain)."""
    return template == "chat" or (template == "auto" and model_has_template)


def chat_ids(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    """`tokenizer.apply_chat_template` of `messages` as a list of token ids."""
    ids = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=generation_prompt, return_dict=False
    )
    return list(ids)


def encode_prompt(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Prompt token ids as the learner and the rollout engines see them: the chat template's
    rendering with the generation prompt, or the text with the tokenizer's special tokens. A
    text that gives no token (an empty prompt: a raw-text row, MUSE's verbatim sets) starts
    with BOS, else EOS, so the answer's first token has a context to be scored in."""
    if isinstance(prompt, str):
        ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        bos = tokenizer.bos_token_id
        start = bos if bos is not None else tokenizer.eos_token_id
        return ids or ([start] if start is not None else [])
    return chat_ids(tokenizer, list(prompt), generation_prompt=True)


def encode_answer(tokenizer: Any, prompt: Prompt, prompt_ids: list[int], answer: str) -> list[int]:
    """The answer's token ids after `prompt_ids`, ending with EOS (the end-of-turn token)."""
    eos = tokenizer.eos_token_id
    if not isinstance(prompt, str):
        turn = {"role": "assistant", "content": answer}
        full = chat_ids(tokenizer, [*prompt, turn], generation_prompt=False)
        if full[: len(prompt_ids)] == prompt_ids:  # templates that render a turn as a suffix
            ids = full[len(prompt_ids) :]
            return ids[: ids.index(eos) + 1] if eos in ids else ids
    ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    return ids + [eos] if eos is not None else ids


def encode_row(tokenizer: Any, row: dict[str, Any], max_len: int) -> tuple[list[int], int]:
    """(token ids of prompt + answer + EOS truncated to max_len, number of prompt tokens)."""
    prompt = row_prompt(row)
    prompt_ids = encode_prompt(tokenizer, prompt)
    ids = prompt_ids + encode_answer(tokenizer, prompt, prompt_ids, row["answer"])
    return ids[:max_len], min(len(prompt_ids), max_len)


@dataclass
class Completion:
    """A sampled completion as the learner scores and trains on it (the RL loop's unit): token
    ids, its group's advantage A (or one advantage per completion token, with an entropy
    bonus), and pi_old's and pi_ref's log-probs of its tokens when known."""

    prompt_token_ids: list[int]
    completion_token_ids: list[int]
    advantage: float = 0.0
    token_advantages: list[float] | None = None
    old_logprobs: list[float] | None = None
    ref_logprobs: list[float] | None = None
    sampled_logprobs: list[float] | None = None  # the engine's, for the learner-engine gap only


def encode_item(
    tokenizer: Any, item: dict[str, Any] | Completion, max_len: int = 1 << 30
) -> tuple[list[int], int]:
    """A `prompt`/`answer` row, or a `Completion`'s token ids."""
    if isinstance(item, Completion):
        prompt = list(item.prompt_token_ids)
        return (prompt + list(item.completion_token_ids))[:max_len], min(len(prompt), max_len)
    return encode_row(tokenizer, item, max_len)


def encode_prompts(tokenizer: Any, prompts: Sequence[Prompt]) -> list[list[int]]:
    """Prompt token ids as the learner sees them (`encode_prompt` of each)."""
    return [encode_prompt(tokenizer, p) for p in prompts]
