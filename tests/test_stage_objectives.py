"""Every stage's objective, through the step that trains, against an independent computation.

The step is the public one (`build_training(cfg, mesh, task=stage_task(cfg), tx=sgd)` and
`Training.step`), on a tiny fp32 model with non-trivial weights (random norms, LoRA B != 0) and
a batch of two microbatches with padding (a padding pair / row, pad tokens, a missing label).
The independent side is tests/independent_forward.py: a float64 numpy forward and the loss
formulas of NEMOTRON_FACTS, sharing no code with nemojax. Checked per stage kind:

* the step's loss (and, for the preference kinds, its metrics: preference / SFT parts, margin
  beta * Delta, implicit-reward accuracy, chosen / rejected log-probs) equals the formula;
* one plain-SGD step moves every trainable parameter by -lr times the formula's gradient: for
  each parameter leaf, the step's update projected on random directions equals the central
  finite difference of the float64 objective along them;
* with LoRA only the adapters (and a reward model's head) move, and every one of them does.

Cases (`CASES`, one compiled step each, cached for the module) cover sft, reward, dpo, ipo,
rpo_bwd_kl, rpo_fwd_kl and rpo_sq, with the SFT term, summed and averaged log-probs, eta != 1,
preference_weight != 1 and LoRA (on the reward model, whose head trains too, and on a
preference kind).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import independent_forward as ind
from nemojax.config import config_from_dict
from nemojax.parallel.mesh import make_mesh
from nemojax.train.build import build_training
from nemojax.train.tasks import stage_task

SEQ, ACCUM, MICRO, VOCAB = 16, 2, 2, 64
LR = 1.0  # plain SGD: the update is exactly -LR * gradient
MODEL = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
             ffn_hidden_size=64, max_seq_len=SEQ, init_std=0.1)
LORA = dict(rank=2, alpha=4.0, targets=["q", "v", "o", "up"])
LOSS_RTOL = 1e-5  # measured: <= 5e-7
METRIC_ATOL = 1e-5  # the margin beta * Delta cancels fp32 log-probs of ~40 nats: ~1e-6 absolute error
GRAD_RTOL, GRAD_ATOL = 1e-5, 1e-6  # fp32 step vs float64 finite differences (measured: <= 3e-7 relative)
DIRECTIONS = 2  # random unit directions per parameter leaf

CASES: dict[str, dict[str, Any]] = {
    "sft": dict(kind="sft"),
    "reward_lora": dict(kind="reward", lora=True),
    "dpo": dict(kind="dpo", beta=0.5, sft_weight=0.3),
    "ipo": dict(kind="ipo", beta=0.5, preference_weight=0.7, average_log_probs=True),
    "rpo_bwd_kl": dict(kind="rpo_bwd_kl", beta=0.5, eta=2.0, sft_weight=0.1),
    "rpo_fwd_kl_lora": dict(kind="rpo_fwd_kl", beta=2.0, eta=0.5, sft_weight=0.2, average_log_probs=True, lora=True),
    "rpo_sq": dict(kind="rpo_sq", beta=0.5, eta=1.5, sft_weight=0.05),
}
PREFERENCE_CASES = [c for c in CASES if CASES[c]["kind"] not in ("sft", "reward")]


def make_cfg(case: str):
    spec = dict(CASES[case])
    lora = spec.pop("lora", False)
    reward = spec["kind"] == "reward"
    model = dict(MODEL, reward=dict(enabled=reward), lora=LORA if lora else {})
    return config_from_dict({"model": model, "mesh": {"data": 1}, "steps": 1, "seed": 3,
                             "stage": dict(spec, train="unused.jsonl"),
                             "data": dict(seq_len=SEQ, global_batch_size=ACCUM * MICRO, micro_batch_size=MICRO)})


# --------------------------------------------------------------------------- batches (flat rows)


def lm_rows(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Packed SFT rows: two conversations and padding per row, loss on each one's 'assistant' tail."""
    n = ACCUM * MICRO
    out = {k: np.zeros((n, SEQ), np.int32) for k in ("input_ids", "targets", "positions", "segment_ids")}
    out["loss_mask"] = np.zeros((n, SEQ), np.float32)
    for i in range(n):
        start = 0
        for seg, length in enumerate((rng.integers(5, 9), rng.integers(4, 6)), start=1):
            seq = rng.integers(1, VOCAB, length)
            sl = slice(start, start + length)
            out["input_ids"][i, sl], out["positions"][i, sl], out["segment_ids"][i, sl] = seq, np.arange(length), seg
            out["targets"][i, start:start + length - 1] = seq[1:]
            out["loss_mask"][i, start + 2:start + length - 1] = 1.0  # the tokens after a 3-token "prompt"
            start += length
    return out


def pair_rows(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Pairs sharing a prompt, responses of different lengths; pair 1's sides are the same
    sequence (a tie); the last pair is padding."""
    n = ACCUM * MICRO
    out: dict[str, np.ndarray] = {}
    for side in ("chosen", "rejected"):
        out |= {f"{side}_{k}": np.zeros((n, SEQ), np.int32) for k in ("input_ids", "targets", "positions",
                                                                       "segment_ids")}
        out[f"{side}_loss_mask"] = np.zeros((n, SEQ), np.float32)
    for i in range(n - 1):
        prompt = rng.integers(1, VOCAB, rng.integers(3, 7))
        for side in ("chosen", "rejected"):
            seq = np.concatenate([prompt, rng.integers(1, VOCAB, rng.integers(2, SEQ - len(prompt) + 1))])
            L = len(seq)
            out[f"{side}_input_ids"][i, :L], out[f"{side}_positions"][i, :L] = seq, np.arange(L)
            out[f"{side}_segment_ids"][i, :L], out[f"{side}_targets"][i, :L - 1] = 1, seq[1:]
            out[f"{side}_loss_mask"][i, len(prompt) - 1:L - 1] = 1.0
    for k in ("input_ids", "targets", "positions", "segment_ids", "loss_mask"):  # pair 1 a tie: log
        out[f"rejected_{k}"][1] = out[f"chosen_{k}"][1]  # pi(chosen) == log pi(rejected) exactly
    out["example_mask"] = np.r_[np.ones(n - 1), 0.0].astype(np.float32)
    out["chosen_reward"] = rng.uniform(0, 4, n).astype(np.float32)
    out["rejected_reward"] = rng.uniform(0, 4, n).astype(np.float32)
    return out


def reward_rows(rng: np.random.Generator, cfg: Any) -> dict[str, np.ndarray]:
    """Scored responses of different lengths (head read at last_index), a missing label, a padding row."""
    n, N = ACCUM * MICRO, len(cfg.model.reward.attributes)
    out = {k: np.zeros((n, SEQ), np.int32) for k in ("input_ids", "positions", "segment_ids")}
    out["last_index"] = np.zeros(n, np.int32)
    for i in range(n - 1):
        L = rng.integers(5, SEQ + 1)
        out["input_ids"][i, :L], out["positions"][i, :L], out["segment_ids"][i, :L] = (
            rng.integers(1, VOCAB, L), np.arange(L), 1)
        out["last_index"][i] = L - 1
    out["labels"] = rng.integers(0, 5, (n, N)).astype(np.float32)
    out["label_mask"] = np.ones((n, N), np.float32)
    out["label_mask"][0, 1] = 0.0
    out["example_mask"] = np.r_[np.ones(n - 1), 0.0].astype(np.float32)
    return out


# --------------------------------------------------------------------------- the step, once per case


def random_weights(abstract: Any, rng: np.random.Generator) -> dict:
    """Non-trivial fp32 weights of the stage model's shapes: every leaf N(0, 0.1), so the norm
    gammas and biases, the reward head's bias and LoRA's B are not at their zero init."""
    return jax.tree.map(lambda x: (0.1 * rng.standard_normal(x.shape)).astype(np.float32),
                        nnx.to_pure_dict(abstract))


def flat(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        out |= flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": np.asarray(v, np.float64)}
    return out


def unflat(leaves: dict[str, np.ndarray]) -> dict:
    out: dict = {}
    for path, v in leaves.items():
        *parents, last = path.split("/")
        node = out
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = v
    return out


@functools.cache
def outcome(case: str) -> dict[str, Any]:
    """One SGD step of `case`'s stage: weights before and after, the step's metrics, the rows."""
    cfg = make_cfg(case)
    rng = np.random.default_rng(sorted(CASES).index(case))
    training = build_training(cfg, make_mesh(cfg.mesh, jax.devices()[:1]), task=stage_task(cfg),
                              tx=optax.sgd(LR))
    params = jax.tree.map(lambda x: x, training.abstract_state.params)
    params.replace_by_pure_dict(random_weights(params, rng))
    params = jax.device_put(params, training.state_shardings.params)
    state = training.abstract_state._replace(step=jnp.zeros((), jnp.int32), params=params,
                                             opt_state=training.fresh_opt_state(params))
    before = flat(nnx.to_pure_dict(state.params))
    kind = cfg.stage.kind
    if kind == "sft":
        rows = lm_rows(rng)
    elif kind == "reward":
        rows = reward_rows(rng, cfg)
    else:
        rows = pair_rows(rng)
        # Reference log-probs such that Delta = +-(0.3..1.5), alternating in sign: both halves of
        # every loss are exercised and beta * Delta stays where the losses are not flat.
        p = ind.as_numpy(unflat(before))
        pi = {side: ind.response_log_probs(p, cfg.model, rows, side, average=cfg.stage.average_log_probs)
              for side in ("chosen", "rejected")}
        delta = rng.uniform(0.3, 1.5, len(pi["chosen"])) * np.resize([1.0, -1.0], len(pi["chosen"]))
        shift = rng.normal(0.0, 1.0, len(delta))
        rows["ref_chosen_logps"] = (pi["chosen"] - shift).astype(np.float32)
        rows["ref_rejected_logps"] = (pi["rejected"] - shift + delta).astype(np.float32)
    batch = training.global_batch(rows, ACCUM, MICRO)
    step = training.step.lower(state, batch).compile()
    state, metrics = step(state, batch)
    return {"cfg": cfg, "rows": rows, "before": before, "after": flat(nnx.to_pure_dict(state.params)),
            "metrics": {k: float(v) for k, v in metrics.items()}, "trainable": trainable_names(cfg, before)}


def trainable_names(cfg: Any, leaves: dict[str, np.ndarray]) -> list[str]:
    """What the stage should train, by the config's meaning (not the task's filter)."""
    if not cfg.model.lora.rank:
        return sorted(leaves)
    return sorted(k for k in leaves if "_lora_" in k or k.startswith("reward_head/"))


def objective_parts(case: str, leaves: dict[str, np.ndarray]) -> dict[str, float]:
    """The float64 formula of `case`'s stage at `leaves`: {"loss"} (plus the parts and metrics of
    a preference loss)."""
    run = outcome(case)
    cfg, rows, p = run["cfg"], run["rows"], unflat(leaves)
    if cfg.stage.kind == "sft":
        return {"loss": ind.sft_objective(p, cfg.model, rows)}
    if cfg.stage.kind == "reward":
        return {"loss": ind.reward_objective(p, cfg.model, rows)}
    return ind.preference_objective(p, cfg.model, rows, cfg.stage)


def objective(case: str, leaves: dict[str, np.ndarray]) -> float:
    return objective_parts(case, leaves)["loss"]


def check_gradient(case: str) -> None:
    """Each trainable leaf: the step's update (-LR * grad) projected on random unit directions equals
    the central difference of the float64 objective along them."""
    run = outcome(case)
    rng = np.random.default_rng(100)
    before, after, eps = run["before"], run["after"], 1e-4
    for name in run["trainable"]:
        step_grad = (before[name] - after[name]) / LR
        assert np.abs(step_grad).max() > 0, f"{case}: {name} did not move"
        for _ in range(DIRECTIONS):
            u = rng.standard_normal(before[name].shape)
            u /= np.linalg.norm(u)
            plus, minus = dict(before), dict(before)
            plus[name], minus[name] = before[name] + eps * u, before[name] - eps * u
            want = (objective(case, plus) - objective(case, minus)) / (2 * eps)
            got = float(np.sum(u * step_grad))
            tol = GRAD_RTOL * (abs(want) + np.linalg.norm(step_grad)) + GRAD_ATOL
            assert abs(got - want) <= tol, (f"{case}: d loss / d {name} along a random direction: step "
                                            f"{got:.8g}, formula {want:.8g} (|grad| {np.linalg.norm(step_grad):.3g})")


def check_frozen(case: str) -> None:
    run = outcome(case)
    for name in sorted(set(run["before"]) - set(run["trainable"])):
        np.testing.assert_array_equal(run["after"][name], run["before"][name], err_msg=f"{case}: frozen {name} moved")


# --------------------------------------------------------------------------- tests


def test_sft_step_is_the_assistant_token_nll() -> None:
    """sft: mean NLL over the loss-mask tokens of packed rows (segments never see each other,
    positions restart per conversation), and its gradient, as the formula says."""
    run = outcome("sft")
    assert run["metrics"]["loss"] == pytest.approx(objective("sft", run["before"]), rel=LOSS_RTOL)
    check_gradient("sft")


def test_reward_step_is_the_masked_mse_of_the_head_on_the_last_token() -> None:
    """reward: masked MSE of the linear head read at `last_index` (the `<extra_id_2>`), missing
    labels and padding rows left out; with LoRA only the adapters and the head move.

    Kills the mutant "reward head reads the token before <extra_id_2>" in the step and the
    stage's validation (`reward_scores` with `last_index - 1`)."""
    case = "reward_lora"
    run = outcome(case)
    assert run["metrics"]["loss"] == pytest.approx(objective(case, run["before"]), rel=LOSS_RTOL)
    check_gradient(case)
    check_frozen(case)
    assert any(k.startswith("reward_head/") for k in run["trainable"])
    assert sum("_lora_" in k for k in run["trainable"]) == 2 * len(LORA["targets"])


@pytest.mark.parametrize("case", PREFERENCE_CASES)
def test_preference_step_is_the_formula(case: str) -> None:
    """dpo / ipo / rpo_*: the step's loss, its parts and metrics, and its gradient equal NEMOTRON_FACTS'
    formulas on log-probs from an independent forward (w_pref * loss + w_sft * -log pi(chosen),
    summed or averaged log-probs, eta scaling the reward gap; LoRA: only adapters move).

    Kills the train-step mutants: beta applied twice (`beta=st.beta**2` in `stage_task`), the
    SFT term dropped (`sft_weight=0`), the policy (stop-gradient) used as its own reference in
    `preference_sums`, the RPO reward gap's sign flipped (chosen / rejected rewards swapped);
    and the logp_accuracy metric renamed, mis-weighted (`/ example_mask`) or counting ties."""
    run = outcome(case)
    want = objective_parts(case, run["before"])
    m = run["metrics"]
    for k in ("loss", "preference_loss", "sft_loss", "margin", "chosen_logps", "rejected_logps"):
        assert m[k] == pytest.approx(want[k], rel=LOSS_RTOL, abs=METRIC_ATOL), f"{case}: {k}"
    assert m["accuracy"] == pytest.approx(want["accuracy"], abs=1e-6)
    assert 0 < want["accuracy"] < 1, "the batch must have pairs on both sides of the reference"
    assert m["logp_accuracy"] == pytest.approx(want["logp_accuracy"], abs=1e-6), case
    check_gradient(case)
    check_frozen(case)
