"""Held-out metrics of each post-training stage (the Trainer's `validate` hook).

Every evaluation is one fixed-order pass over the held-out rows (at most `eval_batches`
batches of `data.micro_batch_size or data.global_batch_size` rows), with the objective the
step trains, so the numbers are comparable across steps, runs and layouts.

* sft: `val_loss` = mean NLL per assistant-turn token (the tokens SFT trains on); with
  `stage.preference_validation`, `val_pref_accuracy` (below) of the policy being trained.
* reward: `val_loss` = masked MSE over every present label; `val_mse/<attr>`,
  `val_pearson/<attr>` per attribute; `val_pearson/reward` = Pearson r between the predicted and
  the labelled aggregate reward (weights `model.reward.weights`, over examples with every
  weighted attribute labelled); with `stage.preference_validation`, `val_pairwise_accuracy` =
  fraction of pairs whose chosen response gets a strictly higher predicted reward.
* dpo / ipo / rpo_*: `val_loss` (the training objective, per pair), `val_accuracy` (implicit
  reward: Delta > 0, i.e. the policy moved log p(chosen) up relative to log p(rejected) compared
  with the reference), `val_margin` (beta * Delta), `val_chosen_logps`, `val_rejected_logps`,
  `val_pref_accuracy`.

`val_pref_accuracy` (the policy's preference accuracy, reference-free): the fraction of held-out
pairs with log pi(chosen) > log pi(rejected), log-probs summed over the response tokens (averaged
with `stage.average_log_probs`). It is defined for any language model, so an SFT model and the
DPO / RPO models trained from it are compared on the same scale.
"""

from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemojax.config import Config
from nemojax.data.stage_data import StageData, eval_batches
from nemojax.train.build import Training
from nemojax.train.losses import preference_loss_sums, reward_metrics, reward_stat_sums
from nemojax.train.reference import pair_log_probs_fn, sharded_forward
from nemojax.train.tasks import reward_scores


def preference_metrics(chosen: np.ndarray, rejected: np.ndarray, ref_chosen: np.ndarray, ref_rejected: np.ndarray,
                       rewards: tuple[np.ndarray, np.ndarray] | None, cfg: Config) -> dict[str, float]:
    """The preference stage's held-out metrics from per-pair log-probs (see the module docstring)."""
    st = cfg.stage
    rpo = st.kind.startswith("rpo")
    num, den, ex = preference_loss_sums(
        st.kind, jnp.asarray(chosen), jnp.asarray(rejected), jnp.asarray(ref_chosen), jnp.asarray(ref_rejected),
        beta=st.beta, example_mask=jnp.ones(len(chosen)), eta=st.eta,
        chosen_rewards=jnp.asarray(rewards[0]) if rpo and rewards else None,
        rejected_rewards=jnp.asarray(rewards[1]) if rpo and rewards else None,
        preference_weight=st.preference_weight, sft_weight=st.sft_weight)
    n = max(float(den), 1.0)
    return {"val_loss": float(num) / n, "val_accuracy": float(ex["accuracy"]) / n,
            "val_margin": float(ex["margin"]) / n, "val_chosen_logps": float(ex["chosen_logps"]) / n,
            "val_rejected_logps": float(ex["rejected_logps"]) / n,
            "val_pref_accuracy": float(np.mean(chosen > rejected)) if len(chosen) else float("nan")}


def aggregate_pearson(pred: np.ndarray, labels: np.ndarray, mask: np.ndarray, weights: np.ndarray) -> float:
    """Pearson r of the weighted-sum reward, predicted vs labelled, over examples whose every
    weighted attribute is labelled (NaN with fewer than 2 such examples or no variance)."""
    used = weights != 0
    full = np.all(mask[:, used] > 0, axis=1)
    if full.sum() < 2:
        return float("nan")
    p, y = pred[full] @ weights, labels[full] @ weights
    if p.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(p, y)[0, 1])


class StageValidator:
    """`validator(training, params) -> metrics`: the Trainer's `validate` hook for one stage.

    Jitted forwards are built on first use for the training they are given and reused after.
    """

    def __init__(self, cfg: Config, data: StageData) -> None:
        self.cfg = cfg
        self.data = data
        self.batch_size = cfg.data.micro_batch_size or cfg.data.global_batch_size
        self.limit = max(cfg.eval_batches, 0)
        self._fwd: dict[str, Callable] = {}
        self._training: Training | None = None

    def _forward(self, training: Training, name: str, make: Callable[[], Callable]) -> Callable:
        if training is not self._training:
            self._fwd, self._training = {}, training
        if name not in self._fwd:
            self._fwd[name] = make()
        return self._fwd[name]

    def __call__(self, training: Training, params: Any) -> dict[str, Any]:
        kind = self.data.kind
        out: dict[str, Any] = {}
        if self.data.validation is not None:
            out.update({"sft": self._sft, "reward": self._reward, "preference": self._preference}[kind](
                training, params))
        if self.data.preference_validation is not None:
            if kind == "reward":
                out["val_pairwise_accuracy"] = self._pairwise(training, params)
            else:
                got = self._pair_logps(training, params, self.data.preference_validation)
                out["val_pref_accuracy"] = float(np.mean(got["chosen"] > got["rejected"]))
        return out

    # ------------------------------------------------------------------ per kind

    def _sft(self, training: Training, params: Any) -> dict[str, float]:
        loss_sums = training.task.loss_sums
        fwd = self._forward(training, "nll",
                            lambda: sharded_forward(training, lambda g, p, mb: loss_sums(g, p, mb)[:2]))
        fields = list(training.task.batch_fields(self.cfg))
        num = den = 0.0
        for b in eval_batches(self.data.validation, self.batch_size, self.limit):
            s, c = fwd(params, {k: b[k] for k in fields})
            num, den = num + float(s), den + float(c)
        return {"val_loss": num / max(den, 1.0)}

    def _scores(self, training: Training, params: Any, dataset: Any) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        fwd = self._forward(training, "scores", lambda: sharded_forward(
            training, lambda g, p, mb: reward_scores(nnx.merge(g, p), mb)))
        fields = ("input_ids", "positions", "segment_ids", "last_index")
        preds, rows = [], {k: [] for k in ("labels", "label_mask", "example_mask")}
        for b in eval_batches(dataset, self.batch_size, self.limit):
            preds.append(np.asarray(fwd(params, {k: b[k] for k in fields})))
            for k in rows:
                rows[k].append(b[k])
        cat = {k: np.concatenate(v) for k, v in rows.items()}
        real = cat["example_mask"] > 0
        return np.concatenate(preds)[real], {k: v[real] for k, v in cat.items()}

    def _reward(self, training: Training, params: Any) -> dict[str, float]:
        pred, rows = self._scores(training, params, self.data.validation)
        attrs = list(self.cfg.model.reward.attributes)
        m = rows["label_mask"]
        sums = {k: np.asarray(v) for k, v in reward_stat_sums(pred, rows["labels"], m).items()}
        met = reward_metrics(sums, attrs)
        out = {"val_loss": met.pop("mse")}
        out.update({f"val_{k}": v for k, v in met.items()})
        out["val_pearson/reward"] = aggregate_pearson(pred, rows["labels"], m,
                                                      np.asarray(self.cfg.model.reward.weight_vector()))
        return out

    def _pairwise(self, training: Training, params: Any) -> float:
        w = np.asarray(self.cfg.model.reward.weight_vector())
        chosen_ds, rejected_ds = self.data.preference_validation
        c = self._scores(training, params, chosen_ds)[0] @ w
        r = self._scores(training, params, rejected_ds)[0] @ w
        return float(np.mean(c > r)) if len(c) else float("nan")

    def _pair_logps(self, training: Training, params: Any, dataset: Any) -> dict[str, np.ndarray]:
        """Per real pair: chosen / rejected log-probs under `params`, plus the rows' reference
        log-probs (when attached) and rewards."""
        fwd = self._forward(training, "pairs", lambda: pair_log_probs_fn(
            training, average=self.cfg.stage.average_log_probs))
        carried = ("ref_chosen_logps", "ref_rejected_logps", "chosen_reward", "rejected_reward")
        parts: dict[str, list[np.ndarray]] = {k: [] for k in ("chosen", "rejected", *carried)}
        for b in eval_batches(dataset, self.batch_size, self.limit):
            c, r = fwd(params, b)
            real = b["example_mask"] > 0
            parts["chosen"].append(np.asarray(c)[real])
            parts["rejected"].append(np.asarray(r)[real])
            for k in carried:
                if k in b:
                    parts[k].append(b[k][real])
        return {k: np.concatenate(v) for k, v in parts.items() if v}

    def _preference(self, training: Training, params: Any) -> dict[str, float]:
        got = self._pair_logps(training, params, self.data.validation)
        return preference_metrics(got["chosen"], got["rejected"], got["ref_chosen_logps"], got["ref_rejected_logps"],
                                  (got["chosen_reward"], got["rejected_reward"]), self.cfg)


# Console line additions per stage kind: (metric, label, format).
PROGRESS_KEYS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "sft": (("val_pref_accuracy", "val_pref_acc", ".3f"),),
    "reward": (("val_pearson/reward", "val_r(reward)", ".3f"), ("val_pairwise_accuracy", "val_pair_acc", ".3f")),
    "preference": (("accuracy", "acc", ".3f"), ("margin", "margin", ".4f"), ("val_accuracy", "val_acc", ".3f"),
                   ("val_pref_accuracy", "val_pref_acc", ".3f")),
}


def progress_formatter(kind: str) -> Callable[[int, int, dict[str, Any]], str]:
    """format_progress plus the stage's headline metrics, inserted after the losses."""
    from nemojax.train.metrics import format_progress

    keys = PROGRESS_KEYS.get(kind, ())

    def fmt(step: int, total: int, m: dict[str, Any]) -> str:
        parts = format_progress(step, total, m).split(" | ")
        extra = [f"{label} {m[k]:{spec}}" for k, label, spec in keys
                 if isinstance(m.get(k), (int, float)) and np.isfinite(m[k])]
        at = 1 + sum(p.startswith(("loss", "val_loss")) for p in parts)
        return " | ".join(parts[:at] + extra + parts[at:])

    return fmt


__all__ = ["StageValidator", "aggregate_pearson", "preference_metrics", "progress_formatter"]
