"""Membership-inference scores as an AUC: how well an attack's per-row score tells the rows a
model was trained on (a set) from rows of the same distribution it never saw (its holdout set).

Pure Python: the evaluation (platform/engine) and the analysis (platform/results) both use it.
"""

from __future__ import annotations


def membership_auc(members: list[float], holdout: list[float]) -> float:
    """ROC AUC of the members' scores against the holdout's: the probability that a random
    member scores above a random holdout row, ties counted half (Mann-Whitney U / n m)."""
    if not members or not holdout:
        return float("nan")
    ranked = sorted([(v, 1) for v in members] + [(v, 0) for v in holdout])
    u, i = 0.0, 0
    while i < len(ranked):  # average ranks over ties
        j = i
        while j < len(ranked) and ranked[j][0] == ranked[i][0]:
            j += 1
        rank = (i + j + 1) / 2  # 1-based mean rank of positions i..j-1
        u += rank * sum(label for _, label in ranked[i:j])
        i = j
    n, m = len(members), len(holdout)
    return (u - n * (n + 1) / 2) / (n * m)


def reference_score(logprob: float, reference_logprob: float) -> float:
    """The Reference attack's score of a row: its mean log-prob minus the reference model's."""
    return logprob - reference_logprob


def reference_auc(ours: dict[str, list[float]], theirs: dict[str, list[float]], name: str) -> float:
    """`mia_reference` of set `name` from two evaluations' per-row values ("examples":
    `<set>/mean_logprob` and `<set>/holdout_mean_logprob`), the model's and the reference
    model's, over the same rows."""

    def scores(key: str) -> list[float]:
        pairs = zip(ours.get(f"{name}/{key}", []), theirs.get(f"{name}/{key}", []))
        return [reference_score(lp, ref) for lp, ref in pairs]

    return membership_auc(scores("mean_logprob"), scores("holdout_mean_logprob"))
