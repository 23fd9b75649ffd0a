"""Validity-preserving shaping and the ranking rule: properties over all finite scores (fast tier, no torch)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.shaping import ranking, shape, sigmoid, softplus

finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False)


@given(valid_score=finite, invalid_score=st.one_of(st.none(), finite))
def test_every_valid_reward_beats_every_invalid_reward(valid_score: float, invalid_score: float | None) -> None:
    assert shape(valid_score, True) > shape(invalid_score, False)


@given(a=finite, b=finite)
def test_softplus_is_monotone(a: float, b: float) -> None:
    low, high = sorted((a, b))
    assert shape(low, True) <= shape(high, True)


@given(score=finite)
def test_rewards_are_finite_and_positive(score: float) -> None:
    reward = shape(score, True)
    assert math.isfinite(reward) and reward > 0
    assert math.isfinite(shape(score, True, "none"))


@pytest.mark.parametrize("score", [-1e4, -800.0, -745.0, -50.0, 0.0, 50.0, 710.0, 1e4])
def test_softplus_is_stable_at_the_extremes(score: float) -> None:
    value = softplus(score)
    assert math.isfinite(value) and value > 0
    if score >= 50:
        assert value == pytest.approx(score)


@pytest.mark.parametrize("score", [-3.0, -0.03, 0.0, 1.5, 6.54])
def test_softplus_matches_its_definition(score: float) -> None:
    assert softplus(score) == pytest.approx(math.log(1 + math.exp(score)), rel=1e-12)


def test_invalid_gets_zero_under_softplus_and_the_configured_reward_under_none() -> None:
    assert shape(3.0, False) == 0.0
    assert shape(None, False, "softplus", invalid_reward=-5.0) == 0.0
    assert shape(None, False, "none", invalid_reward=-5.0) == -5.0
    assert shape(2.5, True, "none") == 2.5


def test_unknown_policy_and_non_finite_scores_are_refused() -> None:
    with pytest.raises(ValueError):
        shape(1.0, True, "sigmoid")
    with pytest.raises(ValueError):
        shape(float("nan"), True)


@pytest.mark.parametrize("score", [-1e4, -5.0, 0.0, 5.0, 1e4])
def test_sigmoid_is_stable(score: float) -> None:
    value = sigmoid(score)
    assert 0.0 <= value <= 1.0
    assert sigmoid(0.0) == 0.5


@pytest.mark.parametrize("rewards,expected", [
    ([0.0, 2.5, 1.0], [1, 2, 0]),          # highest first
    ([1.0, 0.0, 1.0, 1.0], [0, 2, 3, 1]),  # ties keep the lower index first
    ([0.0, 0.0], [0, 1]),                  # all invalid: input order
    ([7.0], [0]),
])
def test_ranking_is_by_reward_then_index(rewards: list[float], expected: list[int]) -> None:
    assert ranking(rewards) == expected
