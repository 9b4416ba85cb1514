"""Sampling filters and the seeded sampler on hand-made logits (no model involved)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from nemojax.inference.sampling import filter_logits, min_p_mask, sample, top_k_mask, top_p_mask

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


def test_a_draw_is_the_inverse_cdf_of_the_request_keys_uniform():
    """The token drawn for (seed, sample, token index) computed independently: the key folded
    with the sample index then the token index, one uniform, numpy's inverse CDF over the
    filtered distribution. Guards swapped or dropped fold-ins, the row max added or taken over the
    batch, and a clamp that cuts off the last token."""
    seeds, samples, tokens = np.arange(8, dtype=np.uint32) * 7 + 3, np.arange(8) % 3, np.arange(8) * 5 + 1
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(8, 11)).astype(np.float32)
    logits[5] += 80.0  # exp(80 + max) overflows fp32: the max must be subtracted, not added
    logits[6] -= 150.0  # 150 below the others: a max over the whole batch would underflow this row
    logits[7, -1] += 30.0  # the last token all but certain: a clamp below vocab - 1 would miss it
    got, _ = sample(jnp.asarray(logits), temperature=jnp.full((8,), 0.7), top_k=jnp.zeros((8,), jnp.int32),
                    top_p=jnp.ones((8,)), min_p=jnp.zeros((8,)), seed=jnp.asarray(seeds),
                    sample_index=jnp.asarray(samples, jnp.int32), token_index=jnp.asarray(tokens, jnp.int32))
    for row in range(8):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(int(seeds[row])), int(samples[row])),
                                 int(tokens[row]))
        u = float(jax.random.uniform(key, (), jnp.float32))
        p = np.exp((logits[row].astype(np.float64) - logits[row].max()) / 0.7)
        cdf = np.cumsum(p / p.sum())
        assert int(got[row]) == int(np.searchsorted(cdf, u, side="right")), row
    assert int(got[7]) == 10


def test_greedy_takes_the_first_of_tied_maxima_and_ignores_the_filters():
    """argmax_first: ties go to the lowest id; a temperature-0 row in a sampled batch stays greedy
    and filter_logits leaves its logits unscaled."""
    logits = jnp.asarray([[0.0, 2.0, 1.0, 2.0], [0.0, 2.0, 1.0, 2.0]], jnp.float32)
    tok, _ = sample(logits, temperature=jnp.asarray([0.0, 1.0]), top_k=jnp.asarray([1, 1], jnp.int32),
                    top_p=jnp.ones((2,)), min_p=jnp.zeros((2,)), seed=jnp.zeros((2,), jnp.uint32),
                    sample_index=jnp.zeros((2,), jnp.int32), token_index=jnp.zeros((2,), jnp.int32))
    assert int(tok[0]) == 1 and int(tok[1]) in (1, 3)
    out = filter_logits(logits, temperature=jnp.asarray([0.0, 0.5]), top_k=jnp.zeros((2,), jnp.int32),
                        top_p=jnp.ones((2,)), min_p=jnp.zeros((2,)))
    np.testing.assert_allclose(np.asarray(out), [[0, 2, 1, 2], [0, 4, 2, 4]])


def test_top_logprobs_are_the_k_best_model_log_probs_only_when_asked():
    """Per row (two rows: a softmax over the batch would mix them), over the last axis of any
    leading shape, in fp32 from bf16 logits; zeros of the right shape when no row asks."""
    from nemojax.inference.sampling import top_logprobs
    logits = jnp.concatenate([LOGITS, 2.0 * LOGITS[:, ::-1]])
    ids, values = top_logprobs(logits, jnp.asarray([1, 0]), k=3)
    assert np.asarray(ids).tolist() == [[1, 3, 0], [3, 1, 4]]
    np.testing.assert_allclose(np.asarray(values)[0], np.log([0.5, 0.25, 0.125]), rtol=1e-6)
    row = 2.0 * np.log(PROBS[::-1])
    want = row - np.log(np.exp(row).sum())
    np.testing.assert_allclose(np.asarray(values)[1], np.sort(want)[::-1][:3], rtol=1e-5)
    ids3, values3 = top_logprobs(logits.reshape(1, 2, 5).astype(jnp.bfloat16), jnp.asarray([1]), k=3)
    assert ids3.shape == (1, 2, 3) and values3.dtype == jnp.float32
    assert np.asarray(ids3)[0].tolist() == np.asarray(ids).tolist()
    ids, values = top_logprobs(logits.reshape(1, 2, 5), jnp.asarray([0]), k=3)
    assert ids.shape == values.shape == (1, 2, 3) and not np.asarray(ids).any() and not np.asarray(values).any()


def test_argmax_first_works_along_the_last_axis_of_any_shape():
    from nemojax.inference.sampling import argmax_first
    """Ties go to the lowest index; a max over another axis would pick [1, 0, 0]'s first entry in
    the second row (the first column's largest value) instead of its own maximum."""
    x = jnp.asarray([[[0.0, 9.0, 9.0], [1.0, 5.0, 0.0]], [[2.0, 2.0, 2.0], [0.0, 0.0, 9.0]]])
    assert np.asarray(argmax_first(x)).tolist() == [[1, 1], [0, 2]]


def test_filters_are_per_row_and_their_bounds_are_exact():
    """Each filter on a batch of rows with different scales (a max or softmax taken over the whole
    batch would mix them), at the exact bounds: min_p keeps a token exactly at min_p * max prob;
    top_k = 0 with top_p < 1 is top-p alone; top_k = 1 alone still filters (the sort is skipped
    only when no row asks for top-k or top-p); top-p after top-k renormalises over the k kept
    tokens only (top_p 0.82 keeps 2 of top-3's renormalised .571/.286/.143, 3 if a 4th leaked)."""
    half = float(jnp.log(jnp.float32(0.5)))
    two = jnp.asarray([[0.0, half, -5.0], [10.0, 9.0, 0.0]], jnp.float32)
    assert np.asarray(min_p_mask(two, jnp.asarray([0.5, 0.5]))).tolist() == [[True, True, False], [True, False, False]]
    scaled = jnp.concatenate([LOGITS, 3.0 * LOGITS])
    assert np.asarray(top_p_mask(scaled, jnp.asarray([0.6, 0.6]))).tolist() == [
        [False, True, False, True, False], [False, True, False, False, False]]

    def kept(top_k, top_p, temperature=1.0):
        out = filter_logits(LOGITS, temperature=jnp.asarray([temperature]), top_k=jnp.asarray([top_k]),
                            top_p=jnp.asarray([top_p]), min_p=jnp.asarray([0.0]))
        return keep(jnp.isfinite(out))

    assert kept(0, 0.6) == [False, True, False, True, False]
    assert kept(1, 1.0) == [False, True, False, False, False]
    assert kept(3, 0.82) == [False, True, False, True, False]
