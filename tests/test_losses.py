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


# --------------------------------------------------------------------------- post-training losses

import jax  # noqa: E402
import numpy as np  # noqa: E402

from nemojax.train.losses import (PREFERENCE_KINDS, bernoulli_kl, implicit_reward_margin,  # noqa: E402
                                  pairwise_accuracy, preference_accuracy, preference_loss,
                                  preference_metric_sums, reward_metrics, reward_mse, reward_regression_sums,
                                  reward_stat_sums, sequence_log_probs, sft_loss)

# One pair: policy log-probs -3 (chosen) / -5 (rejected), reference -4 / -4.5, so
# Delta = (-3 + 4) - (-5 + 4.5) = 1.5; rewards 2 / 1 with eta 1 give dr = 1.
PAIR = dict(chosen_logps=jnp.array([-3.0]), rejected_logps=jnp.array([-5.0]),
            ref_chosen_logps=jnp.array([-4.0]), ref_rejected_logps=jnp.array([-4.5]))
REWARDS = dict(chosen_rewards=jnp.array([2.0]), rejected_rewards=jnp.array([1.0]))


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _kl(a: float, b: float) -> float:  # KL(Bern(sig(a)) || Bern(sig(b))), written out by hand
    pa, pb = _sig(a), _sig(b)
    return pa * math.log(pa / pb) + (1 - pa) * math.log((1 - pa) / (1 - pb))


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_preference_losses_hand_values(beta: float) -> None:
    z, dr = beta * 1.5, 1.0
    expected = {
        "dpo": math.log(1 + math.exp(-z)),
        "ipo": (1.5 - 1 / (2 * beta)) ** 2,
        "rpo_sq": (z - dr) ** 2,
        "rpo_bwd_kl": _kl(dr, z),
        "rpo_fwd_kl": _kl(z, dr),
    }
    for kind in PREFERENCE_KINDS:
        got = preference_loss(kind, **PAIR, beta=beta, **REWARDS)
        assert got.shape == (1,)
        assert float(got[0]) == pytest.approx(expected[kind], rel=1e-5, abs=1e-7), kind


def test_beta_is_applied_exactly_once() -> None:
    """An implementation that scales Delta by beta twice (beta^2) fails every line here."""
    beta = 0.5  # Delta = 1.5: once gives z = 0.75, twice would give 0.375
    assert float(preference_loss("dpo", **PAIR, beta=beta)[0]) == pytest.approx(math.log(1 + math.exp(-0.75)), rel=1e-6)
    assert float(preference_loss("rpo_sq", **PAIR, beta=beta, **REWARDS)[0]) == pytest.approx(0.0625, rel=1e-6)
    assert float(implicit_reward_margin(**PAIR, beta=beta)[0]) == pytest.approx(0.75, rel=1e-6)
    # RPO reaches zero exactly where beta * Delta equals the reward gap, and only there.
    zero = preference_loss("rpo_bwd_kl", **PAIR, beta=1 / 1.5, **REWARDS)
    assert float(zero[0]) == pytest.approx(0.0, abs=1e-7)
    assert float(preference_loss("rpo_bwd_kl", **PAIR, beta=(1 / 1.5) ** 2, **REWARDS)[0]) > 1e-3


def test_eta_scales_the_reward_gap() -> None:
    got = preference_loss("rpo_sq", **PAIR, beta=1.0, eta=3.0, **REWARDS)
    assert float(got[0]) == pytest.approx((1.5 - 3.0) ** 2, rel=1e-6)


def test_preference_gradients_match_hand_derivations() -> None:
    beta = 0.3
    c = jnp.array([-3.0, -1.0, -7.0])
    rest = dict(rejected_logps=jnp.array([-5.0, -2.0, -6.0]), ref_chosen_logps=jnp.array([-4.0, -1.5, -6.5]),
                ref_rejected_logps=jnp.array([-4.5, -2.5, -5.0]))
    rw = dict(chosen_rewards=jnp.array([2.0, 0.0, 1.0]), rejected_rewards=jnp.array([1.0, 0.5, 3.0]))
    delta = (c - rest["ref_chosen_logps"]) - (rest["rejected_logps"] - rest["ref_rejected_logps"])
    z, dr = beta * delta, rw["chosen_rewards"] - rw["rejected_rewards"]
    hand = {  # d loss / d chosen_logps = d loss / d Delta (d Delta / d chosen_logps = 1)
        "dpo": -beta * jax.nn.sigmoid(-z),
        "ipo": 2 * (delta - 1 / (2 * beta)),
        "rpo_sq": 2 * beta * (z - dr),
        "rpo_bwd_kl": beta * (jax.nn.sigmoid(z) - jax.nn.sigmoid(dr)),
    }
    for kind in PREFERENCE_KINDS:
        grad = jax.grad(lambda x: preference_loss(kind, x, **rest, beta=beta, **rw).sum())(c)
        # Central finite differences of the loss itself as a second, independent check.
        eps = 1e-3
        fd = np.array([(float(preference_loss(kind, c.at[i].add(eps), **rest, beta=beta, **rw)[i])
                        - float(preference_loss(kind, c.at[i].add(-eps), **rest, beta=beta, **rw)[i])) / (2 * eps)
                       for i in range(3)])
        np.testing.assert_allclose(grad, fd, rtol=2e-2, atol=2e-4, err_msg=kind)
        if kind in hand:
            np.testing.assert_allclose(grad, hand[kind], rtol=1e-5, atol=1e-6, err_msg=kind)
        # Rejected log-probs move the loss the opposite way.
        g_rej = jax.grad(lambda x: preference_loss(kind, c, x, rest["ref_chosen_logps"], rest["ref_rejected_logps"],
                                                   beta=beta, **rw).sum())(rest["rejected_logps"])
        np.testing.assert_allclose(g_rej, -grad, rtol=1e-5, atol=1e-6, err_msg=kind)


def test_preference_loss_errors_name_the_fix() -> None:
    """Kills, in `preference_loss`, the kinds listed as "dpoXX, XXipo..." (`'XX, XX'.join`) and
    `chosen_rewards is None or rejected_rewards is None` -> `and` (one missing reward array then
    reaches `jnp.asarray(None)`: a TypeError that names nothing)."""
    with pytest.raises(ValueError, match="choose one of dpo, ipo, rpo_bwd_kl, rpo_fwd_kl, rpo_sq$"):
        preference_loss("rpo", **PAIR, beta=0.1)
    with pytest.raises(ValueError, match="chosen_rewards"):
        preference_loss("rpo_sq", **PAIR, beta=0.1)
    for one_missing in (dict(chosen_rewards=REWARDS["chosen_rewards"]), dict(rejected_rewards=REWARDS["rejected_rewards"])):
        with pytest.raises(ValueError, match="needs chosen_rewards and rejected_rewards"):
            preference_loss("rpo_bwd_kl", **PAIR, beta=0.1, **one_missing)
    with pytest.raises(ValueError, match="beta"):
        preference_loss("dpo", **PAIR, beta=0.0)


def test_bernoulli_kl_is_stable_and_nonnegative() -> None:
    a = jnp.array([-80.0, -3.0, 0.0, 2.0, 80.0])
    b = jnp.array([80.0, 1.0, 0.0, -2.0, 79.0])
    kl = bernoulli_kl(a, b)
    assert bool(jnp.all(jnp.isfinite(kl))) and bool(jnp.all(kl >= -1e-7))
    assert float(kl[2]) == pytest.approx(0.0, abs=1e-7)
    assert float(kl[1]) == pytest.approx(_kl(-3.0, 1.0), rel=1e-5)


def test_sequence_log_probs_sum_and_average_over_the_response() -> None:
    logits = jnp.array([[[0.0, math.log(3.0)], [2.0, 2.0], [0.0, 0.0]],
                        [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]])
    targets = jnp.array([[1, 0, 1], [0, 0, 0]])
    mask = jnp.array([[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    total = sequence_log_probs(logits, targets, mask)
    assert float(total[0]) == pytest.approx(2 * math.log(0.5), abs=1e-6)
    assert float(total[1]) == 0.0
    avg = sequence_log_probs(logits, targets, mask, average=True)
    assert float(avg[0]) == pytest.approx(math.log(0.5), abs=1e-6) and float(avg[1]) == 0.0
    assert float(sft_loss(total)[0]) == pytest.approx(-2 * math.log(0.5), abs=1e-6)


def test_preference_metrics() -> None:
    c, r = jnp.array([-1.0, -5.0, -2.0]), jnp.array([-2.0, -4.0, -2.0])
    ref = jnp.zeros(3)
    assert preference_accuracy(c, r, ref, ref).tolist() == [1.0, 0.0, 0.0]  # a tie is not a win
    sums = preference_metric_sums(c, r, ref, ref, beta=0.5, example_mask=jnp.array([1.0, 1.0, 0.0]))
    assert float(sums["pairs"]) == 2 and float(sums["accuracy"]) == 1
    assert float(sums["margin"]) == pytest.approx(0.5 * (1.0 - 1.0))
    assert float(sums["chosen_logps"]) == -6.0 and float(sums["rejected_logps"]) == -6.0


def test_masked_reward_regression() -> None:
    pred = jnp.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    labels = jnp.array([[2.0, 2.0, -100.0], [1.0, 3.0, 4.0]])
    mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    total, count = reward_regression_sums(pred, labels, mask)
    assert float(count) == 4 and float(total) == pytest.approx(1 + 0 + 1 + 16)
    assert float(reward_mse(pred, labels, mask)) == pytest.approx(18 / 4)
    grad = jax.grad(lambda p: reward_regression_sums(p, labels, mask)[0])(pred)
    np.testing.assert_allclose(grad, 2 * (pred - labels) * mask)  # masked labels: exactly zero gradient


def test_reward_metrics_match_numpy() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, size=(40, 2)).astype(np.float32)
    p = y + rng.normal(0, 0.7, size=y.shape).astype(np.float32)
    mask = np.ones_like(y)
    mask[::4, 1] = 0  # a quarter of attribute 1's labels missing
    halves = [reward_stat_sums(jnp.asarray(p[s]), jnp.asarray(y[s]), jnp.asarray(mask[s]))
              for s in (slice(0, 17), slice(17, 40))]
    sums = {k: halves[0][k] + halves[1][k] for k in halves[0]}  # sums add across batches / hosts
    m = reward_metrics(sums, ["a", "b"])
    keep = mask[:, 1] > 0
    assert m["pearson/a"] == pytest.approx(np.corrcoef(p[:, 0], y[:, 0])[0, 1], rel=1e-5)
    assert m["pearson/b"] == pytest.approx(np.corrcoef(p[keep, 1], y[keep, 1])[0, 1], rel=1e-5)
    assert m["mse/b"] == pytest.approx(np.mean((p[keep, 1] - y[keep, 1]) ** 2), rel=1e-5)
    assert math.isnan(reward_metrics(reward_stat_sums(jnp.ones((1, 1)), jnp.ones((1, 1)), jnp.ones((1, 1))),
                                     ["a"])["pearson/a"])
    assert float(pairwise_accuracy(jnp.array([2.0, 1.0, 3.0]), jnp.array([1.0, 1.0, 4.0]))) == pytest.approx(1 / 3)


def test_loss_sums_for_the_train_step() -> None:
    from nemojax.train.losses import preference_loss_sums, reward_loss_sums

    c, r = jnp.array([-3.0, -1.0, -9.0]), jnp.array([-5.0, -2.0, 0.0])
    ref = dict(ref_chosen_logps=jnp.array([-4.0, -1.0, 0.0]), ref_rejected_logps=jnp.array([-4.5, -2.0, 0.0]))
    mask = jnp.array([1.0, 1.0, 0.0])  # the third pair is padding
    num, den, extras = preference_loss_sums("dpo", c, r, **ref, beta=0.5, example_mask=mask, sft_weight=0.1)
    pref = preference_loss("dpo", c, r, **ref, beta=0.5)
    assert float(den) == 2.0
    assert float(num) == pytest.approx(float(pref[0] + pref[1] + 0.1 * (3.0 + 1.0)), rel=1e-6)
    assert float(extras["sft_loss"]) == pytest.approx(4.0) and float(extras["pairs"]) == 2.0
    assert float(extras["preference_loss"]) == pytest.approx(float(pref[0] + pref[1]), rel=1e-6)
    scores, labels = jnp.array([[1.0, 2.0], [3.0, 4.0]]), jnp.array([[0.0, 2.0], [0.0, 0.0]])
    total, count, stats = reward_loss_sums(scores, labels, jnp.ones((2, 2)), example_mask=jnp.array([1.0, 0.0]))
    assert float(total) == 1.0 and float(count) == 2.0 and stats["n"].tolist() == [1.0, 1.0]


# --------------------------------------------------------------------------- guards and defaults
# The tests below were written for the mutants `python scripts/mutation.py losses` found alive
# (docs/TESTING.md); each names the mutants it kills.


@pytest.mark.filterwarnings("error")  # a 0/0 the guards should have avoided is a RuntimeWarning
def test_reward_metrics_guards_and_float64_host_math() -> None:
    """`reward_metrics` where its guards decide, against numpy on the raw labels: an attribute with
    three labels whose sums are exact in fp32 but whose n * sum(p^2) - sum(p)^2 is not (a: 3 *
    12016010 rounds to a multiple of 4 in fp32, so fp32 host math reads the variance as 16, not
    14, and Pearson r as 0.919, not 0.982), exactly two labels with a
    variance below 1 (b), one label (c), none (d), constant predictions (e), and no labels at all.

    Kills: `np.float64` -> the sums' own fp32 (`np.asarray(v, None)` / `np.asarray(v, )`);
    `n >= 2` -> `n > 2` / `n >= 3`; `var > 0` -> `var > 1` / `var >= 0`; `and` -> `or`; a guard
    dropped (`... or True`: 0/0); `float("nan")` -> `float(None)` / `float("XXnanXX")`; the overall
    `mse` dropped, renamed, or computed as `sum * total`.
    """
    nan = float("nan")
    p = np.array([[2000, 0.0, 1, 9, 2], [2001, 0.5, 9, 9, 2], [2003, 9, 9, 9, 2]], np.float32)
    y = np.array([[1, 0.0, 2, 9, 1], [2, 0.25, 9, 9, 2], [3, 9, 9, 9, 4]], np.float32)
    mask = np.array([[1, 1, 1, 0, 1], [1, 1, 0, 0, 1], [1, 0, 0, 0, 1]], np.float32)
    m = reward_metrics(reward_stat_sums(jnp.asarray(p), jnp.asarray(y), jnp.asarray(mask)), list("abcde"))
    keep = mask > 0
    for i, a in enumerate("abcde"):
        sq = (p[keep[:, i], i].astype(np.float64) - y[keep[:, i], i]) ** 2
        assert m[f"mse/{a}"] == (pytest.approx(sq.mean(), rel=1e-6) if len(sq) else pytest.approx(nan, nan_ok=True))
    assert m["pearson/a"] == pytest.approx(np.corrcoef(p[:, 0], y[:, 0])[0, 1], rel=1e-6)  # 9 / sqrt(14 * 6)
    assert m["pearson/b"] == pytest.approx(1.0, rel=1e-6)  # two labels on a line, variance 1/64 * 1/4
    assert all(math.isnan(m[f"pearson/{a}"]) for a in "cde")  # one label, none, constant predictions
    sq_all = ((p.astype(np.float64) - y) ** 2)[keep]
    assert m["mse"] == pytest.approx(sq_all.mean(), rel=1e-6)
    empty = reward_metrics(reward_stat_sums(jnp.asarray(p), jnp.asarray(y), jnp.zeros_like(jnp.asarray(mask))),
                           list("abcde"))
    assert all(math.isnan(v) for v in empty.values())


def test_pairwise_accuracy_masks_pairs_and_divides_by_their_count() -> None:
    """Kills: the example mask ignored (`example_mask is None or True`), `hit * m` -> `hit / m`,
    `jnp.maximum(sum(m), 1.0)` -> `2.0` (one pair)."""
    chosen, rejected = jnp.array([2.0, 1.0, 3.0, 5.0]), jnp.array([1.0, 1.0, 4.0, 0.0])
    assert float(pairwise_accuracy(chosen, rejected, jnp.array([1.0, 1.0, 1.0, 0.0]))) == pytest.approx(1 / 3)
    assert float(pairwise_accuracy(jnp.array([2.0]), jnp.array([1.0]))) == 1.0
    assert float(pairwise_accuracy(chosen, rejected, jnp.zeros(4))) == 0.0


def test_missing_labels_contribute_nothing_whatever_they_hold() -> None:
    """A missing label (mask 0) may hold anything (NeMo's -100, NaN): neither the loss nor its
    gradient sees it, and one present label is its own mean. Kills: `mask > 0` -> `mask >= 0` in
    `reward_regression_sums` (NaN * 0 is NaN), `jnp.maximum(count, 1.0)` -> `2.0` in `reward_mse`."""
    pred = jnp.array([[1.0, 2.0], [0.5, 3.0]])
    labels = jnp.array([[2.0, jnp.nan], [-100.0, jnp.inf]])
    mask = jnp.array([[1.0, 0.0], [0.0, 0.0]])
    total, count = reward_regression_sums(pred, labels, mask)
    assert (float(total), float(count)) == (1.0, 1.0)
    assert float(reward_mse(pred, labels, mask)) == 1.0
    grad = jax.grad(lambda q: reward_regression_sums(q, labels, mask)[0])(pred)
    np.testing.assert_array_equal(grad, [[-2.0, 0.0], [0.0, 0.0]])


def test_preference_loss_sums_defaults_are_no_sft_term_and_eta_one() -> None:
    """Called without them, `preference_loss_sums` has eta = 1 and no SFT term (NeMo-Aligner's
    defaults). Kills the defaults `eta: float = 1.0` -> `2.0` and `sft_weight: float = 0.0` -> `1.0`."""
    from nemojax.train.losses import preference_loss_sums

    mask = jnp.ones(1)
    num, den, _ = preference_loss_sums("rpo_sq", **PAIR, beta=0.5, example_mask=mask, **REWARDS)
    assert float(num) == pytest.approx((0.5 * 1.5 - 1.0) ** 2, rel=1e-6) and float(den) == 1.0


def test_average_log_probs_of_a_one_token_response_is_that_token() -> None:
    """`average=True` divides by the response's token count, floored at 1 only for an empty
    response. Kills `jnp.maximum(sum(mask), 1.0)` -> `2.0` in `sequence_log_probs`."""
    logits = jnp.array([[[0.0, math.log(3.0)], [2.0, 2.0]]])
    avg = sequence_log_probs(logits, jnp.array([[1, 0]]), jnp.array([[1.0, 0.0]]), average=True)
    assert float(avg[0]) == pytest.approx(math.log(0.75), abs=1e-6)


def test_preference_losses_compute_in_fp32_whatever_the_input_dtype() -> None:
    """bf16 log-probs (a bf16 forward) are upcast before Delta is formed: (-256) - (-1.0078125) is
    -254.9921875 in fp32 but -255 in bf16. Kills `jnp.asarray(x, f32)` -> `jnp.asarray(x, None)` /
    `jnp.asarray(x, )` (and `f32 = None`) in `preference_loss`, and the same in `sft_loss`."""
    bf = dict(chosen_logps=jnp.array([-256.0], jnp.bfloat16), rejected_logps=jnp.array([-2.0], jnp.bfloat16),
              ref_chosen_logps=jnp.array([-1.0078125], jnp.bfloat16), ref_rejected_logps=jnp.array([-2.0], jnp.bfloat16))
    delta = -256.0 + 1.0078125  # exact in fp32 (and in float64)
    for kind, want in (("ipo", (delta - 1.0) ** 2), ("rpo_sq", (0.5 * delta - 1.0) ** 2)):
        loss = preference_loss(kind, **bf, beta=0.5, **REWARDS)
        assert loss.dtype == jnp.float32 and float(loss[0]) == pytest.approx(want, rel=1e-7), kind
    assert sft_loss(bf["chosen_logps"]).dtype == jnp.float32


def test_preference_metric_sums_without_a_mask_count_every_pair_in_fp32() -> None:
    """No example mask means every pair is real, counted in fp32 whatever the log-probs' dtype:
    257 bf16 pairs count 257 (bf16 holds 256 or 258). Kills, in `preference_metric_sums`, the
    default mask dropped (`example_mask is None and False`: None.astype), built from None
    (`jnp.ones_like(None)`, `jnp.asarray(None, f32)`, `jnp.asarray(jnp.float32)`), or in the
    log-probs' own dtype (`jnp.asarray(chosen_logps, None)` / `jnp.asarray(chosen_logps, )`)."""
    n = 257
    c = jnp.full((n,), -1.0, jnp.bfloat16)
    r = jnp.full((n,), -2.0, jnp.bfloat16)
    ref = jnp.zeros((n,), jnp.bfloat16)
    sums = preference_metric_sums(c, r, ref, ref, beta=0.5)
    assert sums["pairs"].dtype == jnp.float32 and float(sums["pairs"]) == n
    assert float(sums["accuracy"]) == n and float(sums["margin"]) == pytest.approx(0.5 * n, rel=1e-2)
