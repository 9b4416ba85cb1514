"""A DPO step and a reward-model step on 8 devices (ZeRO-1 + tensor parallel) equal one device.

Like tests/test_parallel_equivalence.py for pretraining: the sharded stage step that `nemojax
train configs/dpo.yaml` / `configs/reward.yaml` runs (`build_training` with the stage's
TrainTask) is compared with a plain single-device computation (jit on device 0, the same loss
function, no sharding) on the fp32 gradient of every parameter (read off the first SGD
update) and on the parameters after 2 SGD steps: updates proportional to the gradients, so any
scale error shows. The batches are padded like real rows: variable prompt / response lengths,
a padding pair / response (example_mask 0), missing reward labels. 8 fake CPU devices (conftest).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from nemojax.config import config_from_dict
from nemojax.parallel.mesh import make_mesh
from nemojax.train.build import build_training
from nemojax.train.step import create_train_state, make_train_step
from nemojax.train.tasks import stage_model, stage_task

SEQ, BATCH, STEPS = 32, 8, 2
GRAD_RTOL, PARAM_ATOL = 2e-5, 1e-5
MODEL = dict(vocab_size=128, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=4, head_dim=8,
             ffn_hidden_size=128, max_seq_len=SEQ, init_std=0.05)
ZERO1_TENSOR = {"mesh": dict(data=4, tensor=2), "sharding": dict(zero1=True)}
# The other pretraining options: FSDP, and the pipeline (chosen and rejected in one pipelined batch).
SLOW_LAYOUTS = {
    "fsdp8": {"mesh": dict(data=1, fsdp=8)},
    "pp2_v1_tp2_dp2": {"mesh": dict(data=2, pipeline=2, tensor=2), "pipeline": dict(microbatches=2)},
}
STAGES = {  # lr: big enough that a scale error moves the parameters far beyond fp32 noise
    "dpo": {"stage": dict(kind="dpo", train="unused.jsonl", beta=0.5, sft_weight=0.1), "lr": 0.5},
    "reward": {"stage": dict(kind="reward", train="unused.jsonl"), "reward": True, "lr": 0.02},
}


def sgd(stage: str) -> optax.GradientTransformation:
    """SGD with momentum: the first update is exactly -lr * gradient, and the momentum buffer is
    optimizer state for ZeRO-1 to shard."""
    return optax.sgd(STAGES[stage]["lr"], momentum=0.9)


def make_cfg(stage: str, layout: dict[str, Any]):
    s = STAGES[stage]
    model = dict(MODEL, reward={"enabled": bool(s.get("reward"))})
    return config_from_dict({"model": model, "mesh": layout["mesh"], "sharding": layout.get("sharding", {}),
                             "pipeline": layout.get("pipeline", {}), "stage": s["stage"], "steps": STEPS,
                             "data": dict(seq_len=SEQ, global_batch_size=BATCH)})


def preference_batch(seed: int = 7) -> dict[str, np.ndarray]:
    """[1, BATCH, ...] pair rows: prompt + response per side, response-only loss masks, the last pair padding."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    prompts = rng.integers(4, 12, BATCH)
    for side in ("chosen", "rejected"):
        ids = np.zeros((BATCH, SEQ), np.int32)
        tg, pos, seg = np.zeros_like(ids), np.zeros_like(ids), np.zeros_like(ids)
        mask = np.zeros((BATCH, SEQ), np.float32)
        for i in range(BATCH - 1):
            n = prompts[i] + rng.integers(3, SEQ - prompts[i])
            seq = rng.integers(1, MODEL["vocab_size"], n)
            ids[i, :n], tg[i, :n - 1], pos[i, :n], seg[i, :n] = seq, seq[1:], np.arange(n), 1
            mask[i, prompts[i] - 1:n - 1] = 1.0
        out |= {f"{side}_input_ids": ids, f"{side}_targets": tg, f"{side}_positions": pos,
                f"{side}_segment_ids": seg, f"{side}_loss_mask": mask}
    real = np.r_[np.ones(BATCH - 1), 0.0].astype(np.float32)
    out |= {"example_mask": real, "chosen_reward": rng.uniform(0, 4, BATCH).astype(np.float32),
            "rejected_reward": rng.uniform(0, 4, BATCH).astype(np.float32),
            "ref_chosen_logps": rng.normal(-60, 5, BATCH).astype(np.float32),
            "ref_rejected_logps": rng.normal(-60, 5, BATCH).astype(np.float32)}
    return {k: v[None] for k, v in out.items()}


def reward_batch(seed: int = 11) -> dict[str, np.ndarray]:
    """[1, BATCH, ...] scored responses of different lengths, some labels missing, the last row padding."""
    rng = np.random.default_rng(seed)
    n_attr = 5
    ids, pos, seg = (np.zeros((BATCH, SEQ), np.int32) for _ in range(3))
    last = np.zeros(BATCH, np.int32)
    for i in range(BATCH - 1):
        n = rng.integers(6, SEQ + 1)
        ids[i, :n], pos[i, :n], seg[i, :n], last[i] = rng.integers(1, MODEL["vocab_size"], n), np.arange(n), 1, n - 1
    mask = (rng.random((BATCH, n_attr)) > 0.2).astype(np.float32)
    out = {"input_ids": ids, "positions": pos, "segment_ids": seg, "last_index": last,
           "labels": rng.integers(0, 5, (BATCH, n_attr)).astype(np.float32), "label_mask": mask,
           "example_mask": np.r_[np.ones(BATCH - 1), 0.0].astype(np.float32)}
    return {k: v[None] for k, v in out.items()}


BATCHES = {"dpo": preference_batch, "reward": reward_batch}


def flat(tree: Any) -> dict[str, np.ndarray]:
    out = {}
    for path, v in nnx.to_flat_state(tree):
        v = v.get_value() if hasattr(v, "get_value") else v
        out["/".join(str(k) for k in path)] = np.asarray(jax.device_get(v))
    return out


def run_steps(step: Any, state: Any, batch: Any, lr: float) -> dict[str, Any]:
    """STEPS SGD steps: the first step's gradient (p0 - p1) / lr, final params, losses, last metrics."""
    p0 = flat(state.params)
    grads, losses, metrics = None, [], {}
    for i in range(STEPS):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        if i == 0:
            grads = {k: (p0[k] - v) / lr for k, v in flat(state.params).items()}
    return {"state": state, "grads": grads, "params": flat(state.params), "losses": losses,
            "metrics": {k: float(v) for k, v in metrics.items()}}


def one_device(stage: str) -> dict[str, Any]:
    """The reference: device 0, the stage's loss function, no sharding, no nemojax.parallel."""
    cfg = make_cfg(stage, {"mesh": dict(data=1)})
    task = stage_task(cfg)
    dev = jax.devices()[0]
    model = stage_model(cfg, nnx.Rngs(params=jax.random.key(cfg.seed)))
    graphdef, state = create_train_state(model, sgd(stage), task.trainable)
    step = jax.jit(make_train_step(graphdef, sgd(stage), task.loss_sums))
    return run_steps(step, jax.device_put(state, dev), jax.device_put(BATCHES[stage](), dev), STAGES[stage]["lr"])


def _device0_fraction(tree: Any) -> float:
    leaves = jax.tree.leaves(tree)
    dev0 = sum(next(s.data.nbytes for s in a.addressable_shards if s.device.id == 0) for a in leaves)
    return dev0 / sum(a.nbytes for a in leaves)


def sharded(stage: str, layout: dict[str, Any]) -> dict[str, Any]:
    cfg = make_cfg(stage, layout)
    training = build_training(cfg, make_mesh(cfg.mesh), task=stage_task(cfg), tx=sgd(stage))
    batch = training.global_batch({k: v[0] for k, v in BATCHES[stage]().items()}, 1, BATCH)
    out = run_steps(training.step, training.init_state(cfg.seed), batch, STAGES[stage]["lr"])
    out["devices"] = training.mesh.devices.size
    return out


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_step_on_8_devices_matches_one_device(stage: str) -> None:
    ref, got = one_device(stage), sharded(stage, ZERO1_TENSOR)
    # really distributed: tensor-split weights (device 0 holds about half the params) and the
    # optimizer state split further over the 4 data replicas (ZeRO-1)
    assert got["devices"] == 8
    assert _device0_fraction(got["state"].params) <= 0.55
    assert _device0_fraction(got["state"].opt_state) <= 0.3
    assert_same(stage, ref, got)


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(SLOW_LAYOUTS))
@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_step_in_more_layouts_matches_one_device(stage: str, layout: str) -> None:
    assert_same(stage, one_device(stage), sharded(stage, SLOW_LAYOUTS[layout]))


def assert_same(stage: str, ref: dict[str, Any], got: dict[str, Any]) -> None:
    assert ref["losses"][1] < ref["losses"][0], "the reference must learn"
    assert ref["grads"].keys() == got["grads"].keys()
    for k, g in ref["grads"].items():
        scale = float(np.abs(g).max())
        assert scale > 0, f"{stage}: reference gradient of {k} is zero"
        err = float(np.abs(got["grads"][k] - g).max())
        assert err <= GRAD_RTOL * scale, f"{stage}: gradient of {k} off by {err:.3e} (scale {scale:.3e})"
    np.testing.assert_allclose(got["losses"], ref["losses"], rtol=0, atol=PARAM_ATOL)
    for k, p in ref["params"].items():
        np.testing.assert_allclose(got["params"][k], p, rtol=0, atol=PARAM_ATOL, err_msg=f"{stage}: {k}")
    for k, v in ref["metrics"].items():  # the stage's extra metrics (margin, accuracy, ...) too
        np.testing.assert_allclose(got["metrics"][k], v, rtol=1e-5, atol=1e-5, err_msg=f"{stage}: metric {k}")
    if stage == "dpo":
        assert {"margin", "accuracy", "chosen_logps", "rejected_logps", "logp_accuracy"} <= set(got["metrics"])
