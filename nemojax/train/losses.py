"""Every loss nemojax trains with, as pure functions of logits / log-probs and masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(target) per position, [batch, seq], computed in fp32.

    The target's logit is picked with a one-hot mask (exact: one nonzero term per sum), not a
    gather: with the vocabulary split over `tensor` this is the vocab-parallel cross-entropy's
    local pick + all-reduce, and the SPMD partitioner cannot partition the gather inside the
    data-parallel manual region (nemojax.parallel.data_parallel)."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.sum(jnp.where(jnp.arange(logits.shape[-1]) == targets[..., None], logits, 0.0), axis=-1)
    return picked - lse


def lm_nll_sums(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of next-token NLL over masked-in positions, their count).

    Sums rather than a mean so that microbatches, pipeline stages and hosts can add them up and
    divide once: the update is then the same however the batch was split.
    """
    mask = loss_mask.astype(jnp.float32)
    return -jnp.sum(token_log_probs(logits, targets) * mask), jnp.sum(mask)


# --------------------------------------------------------------------------- post-training
# Preference optimisation (NeMo-Aligner conventions, see docs/DATA.md and NEMOTRON_FACTS):
# with per-example response log-probs under the policy (pi) and the frozen reference (ref),
#     Delta = [log pi(y_c) - log ref(y_c)] - [log pi(y_r) - log ref(y_r)]      (no beta inside)
# and beta multiplies Delta exactly once, where a loss needs it.

PREFERENCE_KINDS = ("dpo", "ipo", "rpo_bwd_kl", "rpo_fwd_kl", "rpo_sq")


def sequence_log_probs(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array, *,
                       average: bool = False) -> jax.Array:
    """Per-example log-prob of the masked target tokens (the response), [batch], fp32.

    Summed over the response by default (NeMo-Aligner's default); `average=True` divides by the
    number of response tokens (an example without any gives 0).
    """
    mask = loss_mask.astype(jnp.float32)
    total = jnp.sum(token_log_probs(logits, targets) * mask, axis=-1)
    return total / jnp.maximum(jnp.sum(mask, axis=-1), 1.0) if average else total


def preference_delta(chosen_logps: jax.Array, rejected_logps: jax.Array, ref_chosen_logps: jax.Array,
                     ref_rejected_logps: jax.Array) -> jax.Array:
    """Delta = (log pi - log ref)(chosen) - (log pi - log ref)(rejected), per pair; no beta."""
    return (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)


def preference_loss(kind: str, chosen_logps: jax.Array, rejected_logps: jax.Array, ref_chosen_logps: jax.Array,
                    ref_rejected_logps: jax.Array, *, beta: float, chosen_rewards: jax.Array | None = None,
                    rejected_rewards: jax.Array | None = None, eta: float = 1.0) -> jax.Array:
    """Per-pair preference loss [batch] from per-example response log-probs.

    With Delta from `preference_delta`, z = beta * Delta and, for the RPO kinds, the target
    reward gap dr = eta * (chosen_rewards - rejected_rewards):
      dpo         -log sigmoid(z)
      ipo         (Delta - 1 / (2 beta))^2
      rpo_sq      (z - dr)^2
      rpo_bwd_kl  KL(Bern(sigmoid(dr)) || Bern(sigmoid(z)))   (the Nemotron-4 report's RPO)
      rpo_fwd_kl  KL(Bern(sigmoid(z)) || Bern(sigmoid(dr)))
    where KL(Bern(sigmoid(a)) || Bern(sigmoid(b))) = sigmoid(a) (logsig(a) - logsig(b))
    + sigmoid(-a) (logsig(-a) - logsig(-b)). Computed in fp32.
    """
    if kind not in PREFERENCE_KINDS:
        raise ValueError(f"preference loss kind {kind!r} is unknown; choose one of {', '.join(PREFERENCE_KINDS)}")
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    f32 = jnp.float32
    delta = preference_delta(*(jnp.asarray(x, f32) for x in (chosen_logps, rejected_logps, ref_chosen_logps,
                                                              ref_rejected_logps)))
    z = beta * delta
    if kind == "dpo":
        return -jax.nn.log_sigmoid(z)
    if kind == "ipo":
        return jnp.square(delta - 1.0 / (2.0 * beta))
    if chosen_rewards is None or rejected_rewards is None:
        raise ValueError(f"preference loss {kind!r} needs chosen_rewards and rejected_rewards (RPO regresses "
                         f"the implicit reward gap onto the data's reward gap)")
    dr = eta * (jnp.asarray(chosen_rewards, f32) - jnp.asarray(rejected_rewards, f32))
    if kind == "rpo_sq":
        return jnp.square(z - dr)
    if kind == "rpo_bwd_kl":
        return bernoulli_kl(dr, z)
    return bernoulli_kl(z, dr)


def bernoulli_kl(a: jax.Array, b: jax.Array) -> jax.Array:
    """KL(Bern(sigmoid(a)) || Bern(sigmoid(b))), elementwise, from logits (stable for large |a|, |b|)."""
    ls = jax.nn.log_sigmoid
    return jax.nn.sigmoid(a) * (ls(a) - ls(b)) + jax.nn.sigmoid(-a) * (ls(-a) - ls(-b))


def implicit_reward_margin(chosen_logps: jax.Array, rejected_logps: jax.Array, ref_chosen_logps: jax.Array,
                           ref_rejected_logps: jax.Array, *, beta: float) -> jax.Array:
    """beta * Delta per pair: the DPO implicit reward of chosen minus that of rejected."""
    return beta * preference_delta(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)


def preference_accuracy(chosen_logps: jax.Array, rejected_logps: jax.Array, ref_chosen_logps: jax.Array,
                        ref_rejected_logps: jax.Array) -> jax.Array:
    """1.0 per pair whose implicit reward ranks chosen strictly above rejected (Delta > 0), else 0."""
    delta = preference_delta(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return (delta > 0).astype(jnp.float32)


def sft_loss(chosen_logps: jax.Array) -> jax.Array:
    """The SFT term added to preference losses, per pair: -log pi(y_chosen) (summed over tokens).

    Total = w_pref * mean(preference_loss) + w_sft * mean(sft_loss), as in NeMo-Aligner.
    """
    return -jnp.asarray(chosen_logps, jnp.float32)


def preference_metric_sums(chosen_logps: jax.Array, rejected_logps: jax.Array, ref_chosen_logps: jax.Array,
                           ref_rejected_logps: jax.Array, *, beta: float,
                           example_mask: jax.Array | None = None) -> dict[str, jax.Array]:
    """Additive metric sums over the (masked-in) pairs; divide by "pairs" after summing batches.

    Keys: pairs, margin (beta*Delta), accuracy (Delta > 0), chosen_logps, rejected_logps.
    """
    m = jnp.ones_like(jnp.asarray(chosen_logps, jnp.float32)) if example_mask is None \
        else example_mask.astype(jnp.float32)
    args = (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return {
        "pairs": jnp.sum(m),
        "margin": jnp.sum(implicit_reward_margin(*args, beta=beta) * m),
        "accuracy": jnp.sum(preference_accuracy(*args) * m),
        "chosen_logps": jnp.sum(chosen_logps * m),
        "rejected_logps": jnp.sum(rejected_logps * m),
    }


# --------------------------------------------------------------------------- reward regression


def reward_regression_sums(predictions: jax.Array, labels: jax.Array, label_mask: jax.Array,
                           ) -> tuple[jax.Array, jax.Array]:
    """(sum of squared errors over present labels, their count): masked MSE = first / second.

    predictions, labels, label_mask: [batch, N attributes]; label_mask 0 marks a missing label
    (null in the data, or NeMo's -100), which contributes nothing, gradient included.
    """
    mask = label_mask.astype(jnp.float32)
    err = jnp.where(mask > 0, predictions.astype(jnp.float32) - labels.astype(jnp.float32), 0.0)
    return jnp.sum(jnp.square(err) * mask), jnp.sum(mask)


def reward_mse(predictions: jax.Array, labels: jax.Array, label_mask: jax.Array) -> jax.Array:
    """Masked mean squared error over every present (example, attribute) label."""
    total, count = reward_regression_sums(predictions, labels, label_mask)
    return total / jnp.maximum(count, 1.0)


def reward_stat_sums(predictions: jax.Array, labels: jax.Array, label_mask: jax.Array) -> dict[str, jax.Array]:
    """Per-attribute additive sums [N] from which `reward_metrics` derives MSE and Pearson r."""
    m = label_mask.astype(jnp.float32)
    p = jnp.where(m > 0, predictions.astype(jnp.float32), 0.0)
    y = jnp.where(m > 0, labels.astype(jnp.float32), 0.0)
    return {"n": m.sum(0), "p": p.sum(0), "y": y.sum(0), "pp": (p * p).sum(0), "yy": (y * y).sum(0),
            "py": (p * y).sum(0), "sq_err": jnp.square(p - y).sum(0)}


def reward_metrics(sums: dict, attributes: list[str]) -> dict[str, float]:
    """`mse/<attr>`, `pearson/<attr>` per attribute and overall `mse` from summed `reward_stat_sums`.

    Host-side (float64). Pearson is NaN for an attribute with fewer than 2 labels or no variance.
    """
    import numpy as np

    s = {k: np.asarray(v, np.float64) for k, v in sums.items()}
    out: dict[str, float] = {}
    for i, a in enumerate(attributes):
        n = s["n"][i]
        out[f"mse/{a}"] = float(s["sq_err"][i] / n) if n else float("nan")
        cov = n * s["py"][i] - s["p"][i] * s["y"][i]
        var = (n * s["pp"][i] - s["p"][i] ** 2) * (n * s["yy"][i] - s["y"][i] ** 2)
        out[f"pearson/{a}"] = float(cov / np.sqrt(var)) if n >= 2 and var > 0 else float("nan")
    total = s["n"].sum()
    out["mse"] = float(s["sq_err"].sum() / total) if total else float("nan")
    return out


def pairwise_accuracy(chosen_scores: jax.Array, rejected_scores: jax.Array,
                      example_mask: jax.Array | None = None) -> jax.Array:
    """Fraction of pairs whose chosen response scores strictly above the rejected one."""
    hit = (jnp.asarray(chosen_scores) > jnp.asarray(rejected_scores)).astype(jnp.float32)
    m = jnp.ones_like(hit) if example_mask is None else example_mask.astype(jnp.float32)
    return jnp.sum(hit * m) / jnp.maximum(jnp.sum(m), 1.0)


# --------------------------------------------------------------------------- per-microbatch sums
# The train step adds (numerator, denominator, extra sums) over microbatches, processes and
# pipeline stages and divides once, so these return sums, never means.


def preference_loss_sums(kind: str, chosen_logps: jax.Array, rejected_logps: jax.Array,
                         ref_chosen_logps: jax.Array, ref_rejected_logps: jax.Array, *, beta: float,
                         example_mask: jax.Array, chosen_rewards: jax.Array | None = None,
                         rejected_rewards: jax.Array | None = None, eta: float = 1.0,
                         preference_weight: float = 1.0, sft_weight: float = 0.0,
                         ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """(sum over real pairs of w_pref * pref + w_sft * sft, number of real pairs, metric sums).

    The per-pair objective is NeMo-Aligner's `w_pref * preference_loss + w_sft * sft_loss`;
    padding pairs (example_mask 0) contribute nothing. Metric sums: those of
    `preference_metric_sums` plus "preference_loss" and "sft_loss" (sums over pairs).
    """
    m = example_mask.astype(jnp.float32)
    pref = preference_loss(kind, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta,
                           chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards, eta=eta)
    sft = sft_loss(chosen_logps)
    extras = preference_metric_sums(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                                    beta=beta, example_mask=m)
    extras["preference_loss"] = jnp.sum(pref * m)
    extras["sft_loss"] = jnp.sum(sft * m)
    return jnp.sum((preference_weight * pref + sft_weight * sft) * m), jnp.sum(m), extras


def reward_loss_sums(scores: jax.Array, labels: jax.Array, label_mask: jax.Array,
                     example_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """(sum of squared errors over present labels, their count, per-attribute stat sums).

    The masked MSE of the reward stage; `reward_metrics(extras, attributes)` turns the summed
    extras into per-attribute MSE and Pearson r.
    """
    mask = label_mask.astype(jnp.float32)
    if example_mask is not None:
        mask = mask * example_mask.astype(jnp.float32)[:, None]
    total, count = reward_regression_sums(scores, labels, mask)
    return total, count, reward_stat_sums(scores, labels, mask)
