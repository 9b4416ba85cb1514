"""Sampling filters and the seeded sampler on hand-made logits (no model involved)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax.inference.sampling import (SamplingError, SamplingParams, filter_logits, min_p_mask,
                                        sample, top_k_mask, top_p_mask)

# Probabilities 0.5, 0.25, 0.125, 0.0625, 0.0625 (logits are their logs), in shuffled order.
PROBS = np.array([0.125, 0.5, 0.0625, 0.25, 0.0625])
LOGITS = jnp.log(jnp.asarray(PROBS, jnp.float32))[None, :]


def keep(mask: jax.Array) -> list[bool]:
    return [bool(x) for x in np.asarray(mask)[0]]


def test_top_k_keeps_the_k_largest():
    assert keep(top_k_mask(LOGITS, jnp.array([1]))) == [False, True, False, False, False]
    assert keep(top_k_mask(LOGITS, jnp.array([3]))) == [True, True, False, True, False]
    assert all(keep(top_k_mask(LOGITS, jnp.array([0]))))  # 0 = off
    assert all(keep(top_k_mask(LOGITS, jnp.array([99]))))  # k > vocab = off


def test_top_p_keeps_smallest_set_reaching_the_mass():
    # sorted probs 0.5, 0.25, 0.125, 0.0625, 0.0625; mass before each: 0, .5, .75, .875, .9375
    assert keep(top_p_mask(LOGITS, jnp.array([0.5]))) == [False, True, False, False, False]
    assert keep(top_p_mask(LOGITS, jnp.array([0.6]))) == [False, True, False, True, False]
    assert keep(top_p_mask(LOGITS, jnp.array([0.8]))) == [True, True, False, True, False]
    assert keep(top_p_mask(LOGITS, jnp.array([0.01]))) == [False, True, False, False, False]
    assert all(keep(top_p_mask(LOGITS, jnp.array([1.0]))))


def test_min_p_is_relative_to_the_most_likely_token():
    # max prob 0.5: min_p 0.3 keeps p >= 0.15 -> 0.5, 0.25; min_p 0.2 keeps p >= 0.1 -> + 0.125
    assert keep(min_p_mask(LOGITS, jnp.array([0.3]))) == [False, True, False, True, False]
    assert keep(min_p_mask(LOGITS, jnp.array([0.2]))) == [True, True, False, True, False]
    assert all(keep(min_p_mask(LOGITS, jnp.array([0.0]))))


def test_temperature_scales_logits_and_rows_are_independent():
    logits = jnp.concatenate([LOGITS, LOGITS, LOGITS])
    out = filter_logits(logits, temperature=jnp.array([1.0, 0.5, 2.0]), top_k=jnp.array([0, 0, 2]),
                        top_p=jnp.array([1.0, 1.0, 1.0]), min_p=jnp.array([0.0, 0.0, 0.0]))
    out = np.asarray(out)
    np.testing.assert_allclose(out[0], np.log(PROBS), rtol=1e-6)
    np.testing.assert_allclose(out[1], np.log(PROBS) / 0.5, rtol=1e-6)
    # row 2: temperature 2 then top-2 (the 0.5 and 0.25 tokens survive)
    np.testing.assert_allclose(out[2][[1, 3]], np.log(PROBS[[1, 3]]) / 2, rtol=1e-6)
    assert np.all(np.isneginf(out[2][[0, 2, 4]]))
    # temperature 2 flattens: softmax of row 2's survivors is closer to uniform than 2:1
    p = np.exp(out[2][[1, 3]]) / np.exp(out[2][[1, 3]]).sum()
    np.testing.assert_allclose(p, [math.sqrt(2) / (1 + math.sqrt(2)), 1 / (1 + math.sqrt(2))], rtol=1e-5)


def test_top_p_applies_after_top_k():
    # top-k 3 renormalises to 0.5/.875, .25/.875, .125/.875 = .571, .286, .143; top-p .8 then keeps 2
    out = filter_logits(LOGITS, temperature=jnp.array([1.0]), top_k=jnp.array([3]),
                        top_p=jnp.array([0.8]), min_p=jnp.array([0.0]))
    assert keep(jnp.isfinite(out)) == [False, True, False, True, False]


SAMPLE = jax.jit(sample)  # one compile per shape instead of op-by-op dispatch


def _sample(logits, temperature, top_k=0, top_p=1.0, min_p=0.0, seed=0, sample_index=0, token_index=0):
    b = logits.shape[0]
    full = lambda v, dt: jnp.full((b,), v, dt)  # noqa: E731
    return SAMPLE(logits, temperature=full(temperature, jnp.float32), top_k=full(top_k, jnp.int32),
                  top_p=full(top_p, jnp.float32), min_p=full(min_p, jnp.float32),
                  seed=full(seed, jnp.uint32), sample_index=full(sample_index, jnp.int32),
                  token_index=full(token_index, jnp.int32))


def test_greedy_is_argmax_and_logprob_is_the_models():
    tok, lp = _sample(LOGITS, 0.0)
    assert int(tok[0]) == 1
    np.testing.assert_allclose(float(lp[0]), math.log(0.5), rtol=1e-6)


def test_sampled_frequencies_follow_filtered_distribution():
    # 4000 draws with distinct token indices: top-k 2 at T=1 -> tokens 1 and 3 at 2:1
    n = 4000
    logits = jnp.broadcast_to(LOGITS, (n, 5))
    tok, lp = sample(logits, temperature=jnp.ones((n,)), top_k=jnp.full((n,), 2, jnp.int32),
                     top_p=jnp.ones((n,)), min_p=jnp.zeros((n,)), seed=jnp.full((n,), 3, jnp.uint32),
                     sample_index=jnp.zeros((n,), jnp.int32), token_index=jnp.arange(n, dtype=jnp.int32))
    counts = np.bincount(np.asarray(tok), minlength=5)
    assert counts[[0, 2, 4]].sum() == 0
    assert abs(counts[1] / n - 2 / 3) < 0.03
    # reported log-probs are the unfiltered model's, not the renormalised top-k ones
    np.testing.assert_allclose(np.asarray(lp)[np.asarray(tok) == 3], math.log(0.25), rtol=1e-6)


def test_same_seed_and_index_same_token_regardless_of_row():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(6, 50)), jnp.float32)
    # Row 4 of a batch vs the same row alone in a batch of one: same (seed, sample, token) key.
    tok_batch, _ = sample(logits, temperature=jnp.ones((6,)), top_k=jnp.zeros((6,), jnp.int32),
                          top_p=jnp.ones((6,)), min_p=jnp.zeros((6,)),
                          seed=jnp.array([1, 2, 3, 4, 77, 5], jnp.uint32),
                          sample_index=jnp.zeros((6,), jnp.int32), token_index=jnp.full((6,), 9, jnp.int32))
    draws = [int(_sample(logits[4:5], 1.0, seed=77, token_index=9)[0][0]) for _ in range(3)]
    assert draws == [int(tok_batch[4])] * 3
    # different token indices (or sample indices) give different draws somewhere
    seq = [int(_sample(logits[4:5], 1.0, seed=77, token_index=t)[0][0]) for t in range(20)]
    assert len(set(seq)) > 1
    other = [int(_sample(logits[4:5], 1.0, seed=77, sample_index=1, token_index=t)[0][0]) for t in range(20)]
    assert other != seq


def test_sampling_params_validation_names_the_field():
    with pytest.raises(SamplingError, match="temperature"):
        SamplingParams(temperature=-0.1).validate()
    with pytest.raises(SamplingError, match="top_p"):
        SamplingParams(top_p=0).validate()
    with pytest.raises(SamplingError, match="top_k"):
        SamplingParams(top_k=1.5).validate()
    with pytest.raises(SamplingError, match="max_tokens"):
        SamplingParams(max_tokens=0).validate()
    with pytest.raises(SamplingError, match="stop"):
        SamplingParams(stop=[""]).validate()
    with pytest.raises(SamplingError, match="n="):
        SamplingParams(n=0).validate()
    assert SamplingParams(stop="###").validate().stop == ["###"]
    p = SamplingParams.from_dict({"temperature": 0, "top_k": 5, "prompt": "ignored"},
                                 SamplingParams(max_tokens=7, stop=["a"]))
    assert (p.temperature, p.top_k, p.max_tokens, p.stop) == (0.0, 5, 7, ["a"])
