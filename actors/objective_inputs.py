"""What an objective reads besides its batch's log-probs, built on a learner rank: the head's
full-vocabulary statistic (with pi_ref's hidden states as a target's source), RMU's steering
direction and partial training, and the mean of a value over the ranks (a stateful objective's).
"""

from __future__ import annotations

import torch

from stageflow.actors import lora
from stageflow.actors.batching import TokenBatch
from stageflow.actors.policy import PolicyModule, decoder_layers
from stageflow.core.config import StageSpec
from stageflow.core.registry import VocabStat
from stageflow.kernels.vocab_stats import HeadStatistic


def head_statistic(
    stat: VocabStat, batch: TokenBatch, split: int, rest: int, ref: PolicyModule | None, device
) -> HeadStatistic:
    """What the head computes for `stat` over the answer tokens of the forget rows (the first
    `split`; or, for `rows: retain`, the retain rows from `rest` on), less each answer's first
    `skip_first`; with pi_ref's hidden states as the source of a cross-entropy from the
    reference."""
    mask = batch.mask.to(device).clone()
    if stat.rows == "retain":
        mask[:rest] = 0
    else:
        mask[split:] = 0
    if stat.skip_first:
        mask *= mask.cumsum(-1) > stat.skip_first
    if stat.kind != "cross_entropy" or stat.source == "self":
        return HeadStatistic(mask, stat.kind, stat.shift)
    if ref is None:  # internal: begin_stage keeps pi_ref for a reference source
        raise RuntimeError("a statistic from pi_ref without pi_ref")
    with torch.no_grad():
        hidden = ref.hidden_states(
            batch.input_ids[:split].to(device), batch.attention_mask[:split].to(device)
        )
    hidden = torch.nn.functional.pad(hidden, (0, 0, 0, 0, 0, mask.shape[0] - split))
    head = ref.lm.lm_head
    return HeadStatistic(mask, stat.kind, stat.shift, hidden, head.weight, head.bias)


def steering_direction(seed: int, stage: StageSpec, hidden_size: int, device) -> torch.Tensor:
    """The stage's fixed random unit vector u [H] (RMU), uniform in [0, 1)^H then normed, as
    the WMDP code draws it; from the trial's seed and the stage's settings."""
    gen = torch.Generator().manual_seed(lora.adapter_seed(seed, stage))
    u = torch.rand(hidden_size, generator=gen)
    return (u / u.norm()).to(device)


def train_only(policy: PolicyModule, layers: tuple[int, ...]) -> None:
    """Freeze every parameter outside decoder layers `layers` (embeddings, final norm and LM
    head included; under LoRA the adapters of the other layers)."""
    blocks = decoder_layers(policy.lm)
    keep = {id(p) for i in layers for p in blocks[i].parameters()}
    for p in policy.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """`value`'s mean over the learner's ranks (a collective: every rank calls it)."""
    total = value.detach().clone()
    torch.distributed.all_reduce(total)
    return total / torch.distributed.get_world_size()
