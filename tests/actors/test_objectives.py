"""Objective registry metadata and formulas; the learner's log-prob head against transformers."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from stageflow.actors.objectives import LossInputs
from stageflow.core.registry import OBJECTIVES, LayerStates, VocabStat


def _inputs(seed: int = 0, ref: bool = True, retain: bool = True) -> LossInputs:
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(3, 7, generator=g) > 0.3).float()
    mask[:, 0] = 1
    return LossInputs(
        logprobs=-torch.rand(3, 7, generator=g) * 3,
        mask=mask,
        ref_logprobs=-torch.rand(3, 7, generator=g) * 3 if ref else None,
        retain_logprobs=-torch.rand(2, 5, generator=g) * 3 if retain else None,
        retain_mask=torch.ones(2, 5) if retain else None,
    )


def test_registry_metadata():
    expected = {
        "sft": (("sft",), {}, False),
        "ga": (("unlearn",), {}, False),
        "abl": (("unlearn",), {"isolate": 0.1}, False),
        "graddiff": (("unlearn",), {"gamma": 1.0, "alpha": 1.0}, False),
        "npo": (("unlearn",), {"beta": 0.1, "alpha": 0.0}, True),
        "simnpo": (("unlearn",), {"beta": 4.5, "delta": 0.0, "alpha": 0.0}, False),
        "wga": (("unlearn",), {"beta": 1.0, "gamma": 1.0, "alpha": 1.0}, False),
        "satimp": (("unlearn",), {"beta1": 5.0, "beta2": 1.0, "gamma": 1.0, "alpha": 0.1}, False),
        "ceu": (("unlearn",), {"skip_first": 1, "gamma": 1.0, "alpha": 0.0}, False),
        "undial": (("unlearn",), {"beta": 10.0, "gamma": 1.0, "alpha": 0.0}, False),
        "dpo": (
            ("unlearn",),
            {"alternative": None, "beta": 0.1, "gamma": 1.0, "alpha": 1.0},
            True,
        ),
        "idkdpo": (("unlearn",), {"beta": 0.1, "gamma": 1.0, "alpha": 1.0}, True),
        "altpo": (
            ("unlearn",),
            {"beta": 0.1, "gamma": 1.0, "alpha": 1.0, "samples": 4, "max_new_tokens": 32},
            True,
        ),
        "pdu": (
            ("unlearn",),
            {"eps": None, "dual_step": 1.0, "alpha": 1.0, "gamma": 1.0},
            False,
        ),
        "rmu": (
            ("unlearn",),
            {"layer": 1, "trainable_layers": None, "steering": 20.0, "gamma": 1.0, "alpha": 100.0},
            False,
        ),
    }
    for name, (kinds, params, needs_ref) in expected.items():
        entry = OBJECTIVES[name]
        assert entry.kinds == kinds
        assert entry.params == params
        assert entry.needs_ref is needs_ref
        assert entry.fn.__doc__


def _seq(x: LossInputs) -> tuple[torch.Tensor, torch.Tensor]:
    return (x.logprobs * x.mask).sum(-1), x.mask.sum(-1)


def test_formulas_match_docs_formulas_md():
    x = _inputs()
    nll_tok = -(x.logprobs * x.mask).sum() / x.mask.sum()
    retain_nll = -(x.retain_logprobs * x.retain_mask).sum() / x.retain_mask.sum()
    seq, length = _seq(x)
    ref_seq = (x.ref_logprobs * x.mask).sum(-1)
    torch.testing.assert_close(OBJECTIVES["sft"].fn(x), nll_tok)
    torch.testing.assert_close(OBJECTIVES["ga"].fn(x), -nll_tok)
    torch.testing.assert_close(OBJECTIVES["abl"].fn(x), -nll_tok)  # on the isolated rows
    assert OBJECTIVES["abl"].isolate == "isolate"
    torch.testing.assert_close(
        OBJECTIVES["graddiff"].fn(x, gamma=0.5, alpha=2.0), 0.5 * -nll_tok + 2.0 * retain_nll
    )
    beta = 0.1
    npo = (-(2 / beta) * torch.nn.functional.logsigmoid(-beta * (seq - ref_seq))).mean()
    torch.testing.assert_close(OBJECTIVES["npo"].fn(x, beta=beta, alpha=0.0), npo)
    torch.testing.assert_close(
        OBJECTIVES["npo"].fn(x, beta=beta, alpha=0.5), npo + 0.5 * retain_nll
    )
    b, d = 4.5, 0.3
    simnpo = (-(2 / b) * torch.nn.functional.logsigmoid(b * (-seq / length - d))).mean()
    torch.testing.assert_close(OBJECTIVES["simnpo"].fn(x, beta=b, delta=d), simnpo)
    p = x.logprobs.exp()
    wga = -(p**0.5 * -x.logprobs * x.mask).sum() / x.mask.sum()
    torch.testing.assert_close(
        OBJECTIVES["wga"].fn(x, beta=0.5, gamma=2.0, alpha=0.3), 2.0 * wga + 0.3 * retain_nll
    )
    sat = (p**3 * (1 - p) ** 2 * x.logprobs * x.mask).sum() / x.mask.sum()
    torch.testing.assert_close(OBJECTIVES["satimp"].fn(x, beta1=3.0, beta2=2.0, alpha=0.0), sat)


def test_full_vocabulary_objectives_declare_their_target():
    """CE-U: the policy's own logits, true token removed, first answer token skipped; UNDIAL:
    pi_ref's logits lowered by beta on the true token (so the stage keeps pi_ref). Their loss is
    gamma * the token mean of the head's cross-entropies, plus alpha * NLL_r."""
    ceu, undial, npo = OBJECTIVES["ceu"], OBJECTIVES["undial"], OBJECTIVES["npo"]
    assert ceu.statistic(ceu.typed()) == VocabStat("cross_entropy", "self", math.inf, 1)
    assert not ceu.needs_reference(ceu.typed())
    assert undial.statistic(undial.typed({"beta": 3})) == VocabStat(
        "cross_entropy", "reference", 3.0, 0
    )
    assert undial.needs_reference(undial.typed()) and npo.statistic(npo.typed()) is None
    x = _inputs()
    x.vocab_stat, x.vocab_stat_mask = torch.rand(3, 7) * 4, x.mask
    retain_nll = -(x.retain_logprobs * x.retain_mask).sum() / x.retain_mask.sum()
    mean_ce = (x.vocab_stat * x.mask).sum() / x.mask.sum()
    for name in ("ceu", "undial"):
        got = OBJECTIVES[name].fn(x, gamma=2.0, alpha=0.5)
        torch.testing.assert_close(got, 2.0 * mean_ce + 0.5 * retain_nll)
    assert dict(undial.problems({"beta": 0})) == {"beta": "expected a positive number, got 0.0"}
    assert dict(ceu.problems({"skip_first": -1})) == {
        "skip_first": "expected a non-negative number, got -1"
    }
    with pytest.raises(ValueError, match="vocab_stat"):
        OBJECTIVES["ceu"].fn(_inputs())


def test_preference_objectives_prefer_the_alternative_to_the_forget_answer():
    """DPO, IdkDPO and AltPO: gamma * the DPO loss with the stage's answers rejected and the
    chosen ones preferred, + alpha * NLL_r; `alternatives` says where the chosen answers come
    from (AltPO: sampled from the model)."""
    from stageflow.kernels.losses import dpo_loss

    def alternatives(name: str, params: dict | None = None) -> str | None:
        return OBJECTIVES[name].alternatives(OBJECTIVES[name].typed(params))

    assert alternatives("idkdpo") == "idk"
    assert alternatives("altpo", {"samples": 2}) == "generated"
    assert alternatives("dpo", {"alternative": "perturbed_answers"}) == "perturbed_answers"
    assert alternatives("dpo") is None and alternatives("npo") is None
    x, other = _inputs(1), _inputs(2)
    x.chosen_logprobs, x.chosen_mask = other.logprobs, other.mask
    x.chosen_ref_logprobs = other.ref_logprobs
    retain_nll = -(x.retain_logprobs * x.retain_mask).sum() / x.retain_mask.sum()
    pref = dpo_loss(
        other.logprobs, other.ref_logprobs, other.mask, x.logprobs, x.ref_logprobs, x.mask, 0.3
    )
    for name in ("dpo", "idkdpo", "altpo"):
        got = OBJECTIVES[name].fn(x, beta=0.3, gamma=2.0, alpha=0.5)
        torch.testing.assert_close(got, 2.0 * pref + 0.5 * retain_nll)
    with pytest.raises(ValueError, match="chosen answers"):
        OBJECTIVES["idkdpo"].fn(_inputs())


def test_rmu_steers_the_forget_states_and_keeps_the_retain_states():
    """gamma * d(h(forget), c u) + alpha * d(h(retain), h_ref(retain)); its layers: the named
    one, and it with the two before it training unless `trainable_layers` says otherwise."""
    from stageflow.kernels.losses import activation_loss

    entry = OBJECTIVES["rmu"]
    assert entry.states(entry.typed({"layer": 7})) == LayerStates(7, (5, 6, 7))
    assert entry.states(entry.typed({"layer": 0})) == LayerStates(0, (0,))
    assert entry.states(entry.typed({"layer": 3, "trainable_layers": [1]})) == LayerStates(3, (1,))
    assert entry.needs_reference(entry.typed())
    assert not entry.needs_reference(entry.typed({"alpha": 0}))
    g = torch.Generator().manual_seed(0)
    x = _inputs()
    x.states, x.direction = torch.randn(3, 7, 4, generator=g), torch.rand(4, generator=g)
    x.retain_states, x.ref_retain_states = torch.randn(2, 2, 5, 4, generator=g)
    got = entry.fn(x, steering=6.5, gamma=2.0, alpha=3.0)
    want = 2.0 * activation_loss(x.states, 6.5 * x.direction, x.mask) + 3.0 * activation_loss(
        x.retain_states, x.ref_retain_states, x.retain_mask
    )
    torch.testing.assert_close(got, want)
    x.retain_states = None
    with pytest.raises(ValueError, match="retain states"):
        entry.fn(x)


def test_pdu_is_a_primal_dual_step_on_the_retain_constraint():
    """gamma * mean margin^2 + lambda (NLL_r - eps); lambda starts at alpha and moves by
    dual_step * (NLL_r - eps) after each step, never below 0; eps null: the first NLL_r."""
    entry = OBJECTIVES["pdu"]
    assert entry.statistic(entry.typed()) == VocabStat("margin")
    assert entry.uses_retain(entry.typed({"alpha": 0.0}))
    x = _inputs()
    x.vocab_stat, x.vocab_stat_mask = torch.rand(3, 7) * 4, x.mask
    x.state, x.mean_over_ranks = {}, lambda v: v
    retain_nll = float(-(x.retain_logprobs * x.retain_mask).sum() / x.retain_mask.sum())
    margin2 = (x.vocab_stat**2 * x.mask).sum() / x.mask.sum()
    first = entry.fn(x, dual_step=0.5, alpha=2.0, gamma=3.0)  # eps = this NLL_r: a zero term
    torch.testing.assert_close(first, 3.0 * margin2)
    assert x.state == pytest.approx({"dual": 2.0, "eps": retain_nll})
    x.state["eps"] = retain_nll - 0.4  # the retain loss now exceeds its bound by 0.4
    second = entry.fn(x, dual_step=0.5, alpha=2.0, gamma=3.0)
    torch.testing.assert_close(second, 3.0 * margin2 + 2.0 * 0.4, rtol=1e-6, atol=1e-6)
    assert x.state["dual"] == pytest.approx(2.0 + 0.5 * 0.4)
    x.state.update(dual=0.1, eps=retain_nll + 1.0)  # within the bound: lambda falls, floor 0
    entry.fn(x, dual_step=0.5)
    assert x.state["dual"] == 0.0
    fixed = {}
    x.state = fixed
    entry.fn(x, eps=0.25)
    assert fixed["eps"] == 0.25
    assert dict(entry.problems({"eps": "low"})) == {"eps": "expected a number, got 'low'"}


def test_npo_at_equal_policies_is_2_log2_over_beta():
    x = _inputs()
    x.ref_logprobs = x.logprobs.clone()
    assert float(OBJECTIVES["npo"].fn(x, beta=0.1)) == pytest.approx(20 * math.log(2), rel=1e-6)


def test_missing_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="retain"):
        OBJECTIVES["graddiff"].fn(_inputs(retain=False))
    with pytest.raises(ValueError, match="pi_ref"):
        OBJECTIVES["npo"].fn(_inputs(ref=False))
    with pytest.raises(ValueError, match="no parameter gamma"):
        OBJECTIVES["npo"].typed({"gamma": 1})


def test_parameters_are_typed_once_and_say_what_the_stage_needs():
    entry = OBJECTIVES["npo"]
    params = entry.typed({"beta": 1})
    assert params.loss == entry.Params(beta=1.0, alpha=0.0) and params.loop is None
    assert isinstance(params.loss.beta, float) and params.flat() == {"beta": 1.0, "alpha": 0.0}
    assert entry.needs_reference(params) and not entry.uses_retain(params)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.loss.beta = 2.0
    assert OBJECTIVES["graddiff"].uses_retain(OBJECTIVES["graddiff"].typed())
    grpo = OBJECTIVES["grpo"].typed({"beta": 0.01, "group_size": 4})
    assert OBJECTIVES["grpo"].needs_reference(grpo) and grpo.loop.group_size == 4
    assert not OBJECTIVES["grpo"].needs_reference(OBJECTIVES["grpo"].typed({"beta": 0}))
    abl = OBJECTIVES["abl"]
    assert abl.isolated_share(abl.typed({"isolate": 1})) == 1.0
    assert OBJECTIVES["altpo"].typed({"samples": 2}).extra.samples == 2
    with pytest.raises(ValueError, match="expected a whole number"):
        OBJECTIVES["altpo"].typed({"samples": 2.5})
    purge = OBJECTIVES["purge"]
    rewards = purge.default_rewards(purge.typed({"forget_terms": ["x"]}))
    assert rewards[0]["params"] == {"terms": ["x"]}


@pytest.mark.parametrize("impl", ["fused", "naive"])
def test_policy_head_matches_transformers_logits(actor_model_dir, impl):
    from transformers import AutoModelForCausalLM

    from stageflow.actors.batching import collate
    from stageflow.actors.policy import PolicyModule

    lm = AutoModelForCausalLM.from_pretrained(actor_model_dir)
    batch = collate([[1, 10, 11, 12, 13, 14], [1, 20, 21]], [2, 2], pad_id=0)
    with torch.no_grad():
        logits = lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        expected = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch.targets[..., None])[
            ..., 0
        ]
        got = PolicyModule(lm, impl)(batch.input_ids, batch.attention_mask, batch.mask)
    torch.testing.assert_close(got, expected * batch.mask, atol=1e-5, rtol=1e-5)
