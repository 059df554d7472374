"""Collation, shared by learners and rollout workers.

Rows become token ids as actors/rendering.py says. A `TokenBatch` holds right-padded ids and a
mask over the *targets* (ids shifted by one): position t of `mask` is 1 when token t+1 is an
answer / completion token. Which rows each step trains on is the stage's plan
(actors/batch_plan.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from stageflow.actors.rendering import encode_row


@dataclass
class TokenBatch:
    """Right-padded sequences: `input_ids`/`attention_mask` [B, T], target `mask` [B, T-1]."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mask: torch.Tensor
    prompt_lens: list[int]
    lengths: list[int]

    @property
    def targets(self) -> torch.Tensor:
        return self.input_ids[:, 1:]

    @property
    def num_target_tokens(self) -> int:
        return int(self.mask.sum())


def collate(seqs: Sequence[Sequence[int]], prompt_lens: Sequence[int], pad_id: int) -> TokenBatch:
    """Right-pad `seqs`; the target mask covers each sequence's tokens after its prompt."""
    width = max(2, max((len(s) for s in seqs), default=2))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width - 1), dtype=torch.float32)
    for i, (seq, n_prompt) in enumerate(zip(seqs, prompt_lens)):
        ids[i, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        attention[i, : len(seq)] = 1
        # target t predicts token t+1: answer tokens n_prompt .. len-1 sit at t = n_prompt-1 .. len-2
        mask[i, max(n_prompt - 1, 0) : len(seq) - 1] = 1.0
    return TokenBatch(ids, attention, mask, list(prompt_lens), [len(s) for s in seqs])


def collate_rows(
    tokenizer: Any, rows: Sequence[dict[str, Any]], max_len: int, pad_id: int | None = None
) -> TokenBatch:
    """Tokenise and collate prompt/answer rows (loss mask on the answer tokens)."""
    encoded = [encode_row(tokenizer, r, max_len) for r in rows]
    pad = tokenizer.pad_token_id if pad_id is None else pad_id
    return collate([e[0] for e in encoded], [e[1] for e in encoded], pad if pad is not None else 0)


def place_completion_values(values: Sequence[Sequence[float]], batch: TokenBatch) -> torch.Tensor:
    """Per-completion-token values (one list per sequence) placed at their target positions [B, T-1]."""
    out = torch.zeros(batch.mask.shape, dtype=torch.float32)
    for i, vals in enumerate(values):
        start = batch.prompt_lens[i] - 1
        n = min(len(vals), batch.lengths[i] - batch.prompt_lens[i])
        if n > 0:
            out[i, start : start + n] = torch.as_tensor(list(vals[:n]), dtype=torch.float32)
    return out


def completion_values(per_target: torch.Tensor, batch: TokenBatch) -> list[list[float]]:
    """Inverse of `place_completion_values`: each sequence's values over its completion tokens."""
    out = []
    for i in range(per_target.shape[0]):
        start, stop = batch.prompt_lens[i] - 1, batch.lengths[i] - 1
        out.append(per_target[i, start:stop].tolist())
    return out


def left_padded(
    prompt_ids: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts padded on the left to one width (what `generate` takes): ids and attention mask."""
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for i, p in enumerate(prompt_ids):
        ids[i, width - len(p) :] = torch.tensor(p)
        attention[i, width - len(p) :] = 1
    return ids, attention
