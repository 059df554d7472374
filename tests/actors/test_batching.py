"""Collation: values placed at the completion tokens and read back."""

from __future__ import annotations

from stageflow.actors.batching import collate, completion_values, place_completion_values


def test_completion_values_round_trip():
    batch = collate([[1, 5, 6, 7], [1, 5, 8]], [2, 2], pad_id=0)
    values = [[-0.1, -0.2], [-0.3]]
    placed = place_completion_values(values, batch)
    assert placed.shape == batch.mask.shape
    assert (placed != 0).sum() == 3
    back = completion_values(placed, batch)
    assert [[round(v, 6) for v in row] for row in back] == values
