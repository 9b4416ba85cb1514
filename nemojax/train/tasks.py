"""The `TrainTask` of each post-training stage: model, objective, batch fields, trainable set, weights.

`stage_task(cfg)` is what the trainer, `nemojax compile` and the tests build a stage's step
from (nemojax.train.build.build_training(cfg, mesh, task=stage_task(cfg))), so the step the
340B compile measures is the one training runs.

* sft: the language model, next-token loss on the rows' loss mask (assistant tokens only);
  rows are packed conversations with the pretraining row fields.
* reward: `NemotronRewardModel` (trunk + linear head on the last token), masked MSE over the
  attribute labels. Batch: input_ids / positions / segment_ids [L], last_index, labels and
  label_mask [N], example_mask.
* dpo, ipo, rpo_*: the language model; both responses of a pair run in ONE forward (chosen and
  rejected interleaved along the batch, so each device keeps its own rows), per-response
  log-probs over the response tokens, and `preference_loss_sums` against the reference
  log-probs cached in the batch (`ref_chosen_logps` / `ref_rejected_logps`, see
  nemojax.train.reference). No reference model runs during training.

With `model.lora.rank > 0` only the adapters (and, for a reward model, its head) are trainable:
only they get gradients and optimizer state. `init_from=` reads any compatible base
(`nemojax.checkpoint.load_base_params`: an LM checkpoint, a run, a Hugging Face directory, or a
previous stage); parameters the base lacks (the reward head, fresh adapters) are initialised
exactly as a fresh model of this config would initialise them.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nemojax.config import Config
from nemojax.model.lora import LoraParam
from nemojax.model.reward import model_class
from nemojax.parallel.pipeline import hidden_states
from nemojax.train.build import PRETRAIN, BatchField, TrainTask, lm_batch_fields
from nemojax.train.losses import preference_loss_sums, reward_loss_sums, sequence_log_probs
from nemojax.train.step import lm_loss_sums

SIDES = ("chosen", "rejected")
SEQUENCE_FIELDS = ("input_ids", "targets", "positions", "segment_ids", "loss_mask")


# --------------------------------------------------------------------------- models and weights


def stage_model(cfg: Config, rngs: nnx.Rngs) -> nnx.Module:
    """The module `cfg.model` describes: a reward model or a language model, with adapters if any."""
    return model_class(cfg.model)(cfg.model, rngs=rngs)


def trainable_params(cfg: Config) -> Any:
    """The nnx filter of what a stage trains: None (everything), or with LoRA the adapters
    (plus the reward head of a reward model, which a base never has)."""
    if not cfg.model.lora.rank:
        return None
    if cfg.model.reward.enabled:
        return nnx.Any(LoraParam, nnx.PathContains("reward_head"))
    return LoraParam


def _get(tree: dict, keys: tuple[str, ...]) -> Any:
    for k in keys:
        tree = tree[k]
    return tree


def _put(tree: dict, keys: tuple[str, ...], value: Any) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def load_stage_weights(path: str, cfg: Config, shardings: dict) -> dict:
    """`init_from` for a stage: the base's weights, plus a fresh init of what the base lacks.

    The fresh parts come from the same seeded init as a run without `init_from` (only those
    leaves are computed: the jitted init's other outputs are dead code), placed with `shardings`.
    """
    from nemojax.checkpoint import load_base_params

    params, missing = load_base_params(path, cfg.model, sharding=shardings, progress=False)
    if not missing:
        return params
    keys = [tuple(m.split(".")) for m in missing]

    def fresh() -> dict:
        model = stage_model(cfg, nnx.Rngs(params=jax.random.key(jnp.asarray(cfg.seed, jnp.uint32))))
        full = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        return {".".join(k): _get(full, k) for k in keys}

    out_shardings = {".".join(k): _get(shardings, k) for k in keys}
    for name, value in jax.jit(fresh, out_shardings=out_shardings)().items():
        _put(params, tuple(name.split(".")), value)
    return params


# --------------------------------------------------------------------------- batch fields


def preference_batch_fields(cfg: Config) -> dict[str, BatchField]:
    """One pair per row: both sides' sequences [seq_len], rewards, padding mask, cached reference log-probs."""
    L = (cfg.data.seq_len,)
    out = {}
    for side in SIDES:
        for f in SEQUENCE_FIELDS:
            out[f"{side}_{f}"] = BatchField(jnp.float32 if f == "loss_mask" else jnp.int32, L)
    for f in ("chosen_reward", "rejected_reward", "example_mask", "ref_chosen_logps", "ref_rejected_logps"):
        out[f] = BatchField(jnp.float32, ())
    return out


def reward_batch_fields(cfg: Config) -> dict[str, BatchField]:
    """One scored response per row, ending with <extra_id_2> at last_index; labels per attribute."""
    L, N = (cfg.data.seq_len,), (len(cfg.model.reward.attributes),)
    return {"input_ids": BatchField(jnp.int32, L), "positions": BatchField(jnp.int32, L),
            "segment_ids": BatchField(jnp.int32, L), "last_index": BatchField(jnp.int32, ()),
            "labels": BatchField(jnp.float32, N), "label_mask": BatchField(jnp.float32, N),
            "example_mask": BatchField(jnp.float32, ())}


# --------------------------------------------------------------------------- objectives


def pair_log_probs(model: nnx.Module, mb: dict[str, jax.Array], *, average: bool) -> tuple[jax.Array, jax.Array]:
    """(chosen, rejected) response log-probs [micro] from one forward over both sides.

    Rows are interleaved (pair i -> rows 2i, 2i+1), so a batch split over devices keeps each
    pair on the device that holds it; the pipeline sees one batch of 2 * micro rows.
    """
    def both(name: str) -> jax.Array:
        c, r = mb[f"chosen_{name}"], mb[f"rejected_{name}"]
        return jnp.stack([c, r], axis=1).reshape(2 * c.shape[0], *c.shape[1:])

    h = hidden_states(model, both("input_ids"), positions=both("positions"), segment_ids=both("segment_ids"))
    logps = sequence_log_probs(model.logits(h), both("targets"), both("loss_mask"), average=average)
    logps = logps.reshape(-1, 2)
    return logps[:, 0], logps[:, 1]


def preference_sums(graphdef: Any, params: Any, mb: dict[str, jax.Array], *, kind: str, beta: float, eta: float,
                    preference_weight: float, sft_weight: float, average: bool,
                    ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """(sum over real pairs of w_pref * loss + w_sft * sft, real pairs, metric sums) for one microbatch.

    Metric sums (the step divides them by the pair count): margin (beta * Delta), accuracy
    (Delta > 0: the implicit reward ranks chosen first), chosen_logps, rejected_logps,
    preference_loss, sft_loss, and logp_accuracy (log pi(chosen) > log pi(rejected)).
    """
    model = nnx.merge(graphdef, params)
    chosen, rejected = pair_log_probs(model, mb, average=average)
    rpo = kind.startswith("rpo")
    num, den, extras = preference_loss_sums(
        kind, chosen, rejected, mb["ref_chosen_logps"], mb["ref_rejected_logps"], beta=beta,
        example_mask=mb["example_mask"], chosen_rewards=mb["chosen_reward"] if rpo else None,
        rejected_rewards=mb["rejected_reward"] if rpo else None, eta=eta,
        preference_weight=preference_weight, sft_weight=sft_weight)
    extras.pop("pairs")
    extras["logp_accuracy"] = jnp.sum((chosen > rejected).astype(jnp.float32) * mb["example_mask"])
    return num, den, extras


def reward_scores(model: nnx.Module, mb: dict[str, jax.Array]) -> jax.Array:
    """Attribute scores [micro, N] at each row's last token (through the pipeline if there is one)."""
    h = hidden_states(model, mb["input_ids"], positions=mb["positions"], segment_ids=mb["segment_ids"])
    return model.scores_from_hidden(h, mb["last_index"])


def reward_sums(graphdef: Any, params: Any, mb: dict[str, jax.Array]
                ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """(sum of squared errors over present labels, their count, {}): the masked MSE's parts."""
    model = nnx.merge(graphdef, params)
    total, count, _ = reward_loss_sums(reward_scores(model, mb), mb["labels"], mb["label_mask"], mb["example_mask"])
    return total, count, {}


# --------------------------------------------------------------------------- the tasks


def stage_task(cfg: Config) -> TrainTask:
    """The TrainTask for `cfg.stage.kind` (pretraining: the default PRETRAIN task)."""
    st = cfg.stage
    if st.kind == "pretrain":
        return PRETRAIN
    common = dict(make_model=stage_model, trainable=trainable_params(cfg), load_weights=load_stage_weights)
    if st.kind == "sft":
        return TrainTask(loss_sums=lm_loss_sums, batch_fields=lm_batch_fields, **common)
    if st.kind == "reward":
        return TrainTask(loss_sums=reward_sums, batch_fields=reward_batch_fields, **common)
    loss = functools.partial(preference_sums, kind=st.kind, beta=st.beta, eta=st.eta,
                             preference_weight=st.preference_weight, sft_weight=st.sft_weight,
                             average=st.average_log_probs)
    return TrainTask(loss_sums=loss, batch_fields=preference_batch_fields, **common)


__all__ = ["load_stage_weights", "pair_log_probs", "preference_batch_fields", "preference_sums",
           "reward_batch_fields", "reward_scores", "reward_sums", "stage_model", "stage_task", "trainable_params"]
