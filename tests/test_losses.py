"""Losses against values derived by hand."""

import math

import jax.numpy as jnp
import pytest

from nemojax.train.losses import lm_nll_sums, token_log_probs


def test_token_log_probs_hand_values():
    logits = jnp.array([[[0.0, math.log(3.0)], [2.0, 2.0]]])  # p = [1/4, 3/4], then [1/2, 1/2]
    lp = token_log_probs(logits, jnp.array([[1, 0]]))
    assert lp[0, 0] == pytest.approx(math.log(0.75), abs=1e-6)
    assert lp[0, 1] == pytest.approx(math.log(0.5), abs=1e-6)


def test_lm_nll_sums_skip_masked_positions():
    logits = jnp.array([[[0.0, math.log(3.0)], [2.0, 2.0], [50.0, -50.0]]])
    total, count = lm_nll_sums(logits, jnp.array([[1, 0, 1]]), jnp.array([[1.0, 1.0, 0.0]]))
    assert float(count) == 2.0
    assert float(total) == pytest.approx(-(math.log(0.75) + math.log(0.5)), abs=1e-6)
