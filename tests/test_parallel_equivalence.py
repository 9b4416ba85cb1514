"""Every parallel layout computes what one device computes, checked where a wrong scale shows.

Adam with gradient clipping is scale-invariant, so comparing Adam steps hides a gradient that is
off by a constant factor (a sharded reduction that sums 8 replicas instead of averaging them
still passes). Here each layout is compared with a plain single-device run (jit on device 0,
nothing from nemojax.parallel) on:

* the accumulated fp32 gradient before clipping (`Training.gradients`), every parameter;
* the parameters after 2 plain SGD steps (no momentum, no clipping) of the full sharded train
  step (`Training.step`, the function `nemojax train` runs): an update proportional to the
  gradient, so any scale error moves them;

and `test_a_misscaled_gradient_is_caught` shows that a layout whose gradient is 8x too large
fails both comparisons while it would pass an Adam + clipping comparison.

The model is tiny (fp32, 8 layers so that every pipeline layout divides it) and the batch holds
two packed documents per row and masked tail positions; the single-device reference is computed
once per module. 8 fake CPU devices (tests/conftest.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nemojax.config import config_from_dict
from nemojax.model.transformer import NemotronLM
from nemojax.parallel.mesh import make_mesh
from nemojax.train.build import PRETRAIN, build_training
from nemojax.train.step import accumulate_gradients, create_train_state, lm_loss_sums, make_train_step
from reference_run import flat_params, packed_batch

SEQ, BATCH, STEPS = 32, 8, 2
LR = 0.5  # plain SGD: big enough that a scale error moves the parameters far beyond fp32 noise
GRAD_RTOL = 2e-5  # |grad - ref| <= GRAD_RTOL * max|ref|, per parameter
PARAM_ATOL = 1e-5

MODEL = dict(vocab_size=128, hidden_size=64, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=8,
             ffn_hidden_size=128, max_seq_len=SEQ, init_std=0.05)

LAYOUTS: dict[str, dict[str, Any]] = {
    "data8_zero1": {"mesh": dict(data=8), "sharding": dict(zero1=True)},
    "fsdp8": {"mesh": dict(data=1, fsdp=8)},
    "tensor8": {"mesh": dict(data=1, tensor=8), "sharding": dict(rules={"kv_heads": None})},
    "tensor4_data2_no_zero1": {"mesh": dict(data=2, tensor=4), "sharding": dict(zero1=False)},
    "data2_fsdp2_tensor2_seqpar": {"mesh": dict(data=2, fsdp=2, tensor=2),
                                   "sharding": dict(zero1=True, sequence_parallel=True)},
    "pp2_tp2_dp2_v2": {"mesh": dict(data=2, pipeline=2, tensor=2),
                       "pipeline": dict(virtual_stages=2, microbatches=2)},
}
SLOW_LAYOUTS: dict[str, dict[str, Any]] = {
    "pp4_v2_dp2": {"mesh": dict(data=2, pipeline=4), "pipeline": dict(virtual_stages=2, microbatches=4)},
    "pp2_v1_fsdp2_tp2": {"mesh": dict(data=1, fsdp=2, pipeline=2, tensor=2), "pipeline": dict(microbatches=4)},
    "pp8_v1_m8": {"mesh": dict(data=1, pipeline=8), "pipeline": dict(microbatches=8)},
    "pp_fill_tp4": {"mesh": dict(data=1, pipeline=-1, tensor=4), "pipeline": dict(microbatches=2)},
}


def make_cfg(layout: dict[str, Any]):
    return config_from_dict({"model": MODEL, "mesh": layout["mesh"], "sharding": layout.get("sharding", {}),
                             "pipeline": layout.get("pipeline", {}), "steps": STEPS,
                             "data": dict(seq_len=SEQ, global_batch_size=BATCH)})


def make_batch() -> dict[str, np.ndarray]:
    return packed_batch(MODEL["vocab_size"], BATCH, SEQ, seed=1234, cut=SEQ // 2 + 3, masked_tail=3)


def sgd() -> optax.GradientTransformation:
    return optax.sgd(LR)


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    """Single device, no nemojax.parallel: gradients at init, losses and params after SGD steps."""
    cfg = make_cfg({"mesh": dict(data=1)})
    dev = jax.devices()[0]
    model = NemotronLM(cfg.model, rngs=nnx.Rngs(params=jax.random.key(cfg.seed)))
    graphdef, state = create_train_state(model, sgd())
    state = jax.device_put(state, dev)
    batch = jax.device_put(make_batch(), dev)
    grads = jax.jit(lambda p, b: accumulate_gradients(graphdef, lm_loss_sums, p, b)[0])(state.params, batch)
    step = jax.jit(make_train_step(graphdef, sgd()))
    losses = []
    for _ in range(STEPS):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[1] < losses[0], "the reference must learn"
    return {"grads": flat_params(grads), "params": flat_params(state.params), "losses": losses}


def assert_grads_match(got: dict[str, np.ndarray], ref: dict[str, np.ndarray], what: str) -> None:
    assert got.keys() == ref.keys(), what
    for k in ref:
        scale = float(np.abs(ref[k]).max())
        assert scale > 0, f"{what}: reference gradient of {k} is zero"
        err = float(np.abs(got[k] - ref[k]).max())
        assert err <= GRAD_RTOL * scale, f"{what}: gradient of {k} off by {err:.3e} (scale {scale:.3e})"


def assert_params_match(got: dict[str, np.ndarray], ref: dict[str, np.ndarray], what: str) -> None:
    assert got.keys() == ref.keys(), what
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=0, atol=PARAM_ATOL, err_msg=f"{what}: {k}")


def run_layout(layout: dict[str, Any], task=PRETRAIN) -> dict[str, Any]:
    cfg = make_cfg(layout)
    training = build_training(cfg, make_mesh(cfg.mesh), task=task, tx=sgd())
    state = training.init_state(cfg.seed)
    batch = training.global_batch({k: v[0] for k, v in make_batch().items()}, 1, BATCH)
    grads, _ = training.gradients(state.params, batch)
    grads = flat_params(grads)
    losses = []
    for _ in range(STEPS):
        state, m = training.step(state, batch)
        losses.append(float(m["loss"]))
    return {"training": training, "state": state, "grads": grads, "params": flat_params(state.params),
            "losses": losses}


def _check(name: str, layout: dict[str, Any], reference: dict[str, Any]) -> None:
    out = run_layout(layout)
    assert_grads_match(out["grads"], reference["grads"], name)
    np.testing.assert_allclose(out["losses"], reference["losses"], rtol=0, atol=PARAM_ATOL, err_msg=name)
    assert_params_match(out["params"], reference["params"], name)
    # the layout really is distributed: the batch is split over data x fsdp, and the parameters
    # over fsdp / tensor / pipeline whenever one of those is used
    tr = out["training"]
    sizes = dict(tr.mesh.shape)
    assert tr.batch_divisor == sizes["data"] * sizes["fsdp"]
    if sizes["fsdp"] * sizes["tensor"] * sizes["pipeline"] > 1:
        leaves = jax.tree.leaves(out["state"].params)
        full = sum(a.nbytes for a in leaves)
        dev0 = sum(next(s.data.nbytes for s in a.addressable_shards if s.device.id == 0) for a in leaves)
        assert dev0 <= full / 2, f"{name}: device 0 holds {dev0} of {full} parameter bytes"
    if tr.mesh.shape["pipeline"] > 1:  # pipelined, and the block weights split over the stages
        assert tr.schedule is not None and tr.schedule.P == tr.mesh.shape["pipeline"]
        up = out["state"].params["blocks"]["up"][...]
        assert up.sharding.spec[0] == "pipeline"
        assert up.addressable_shards[0].data.shape[0] == MODEL["num_layers"] // tr.schedule.P


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_gradients_and_sgd_params_match_one_device(name: str, reference) -> None:
    _check(name, LAYOUTS[name], reference)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW_LAYOUTS))
def test_more_layouts_match_one_device(name: str, reference) -> None:
    _check(name, SLOW_LAYOUTS[name], reference)


def test_a_misscaled_gradient_is_caught(reference) -> None:
    """A sharded objective whose gradient is 8x too large (as if 8 replicas were summed, not
    averaged) fails both comparisons -- and would have passed an Adam + clipping comparison."""
    def eight_times(graphdef, params, mb):
        num, den, extras = lm_loss_sums(graphdef, params, mb)
        return 8.0 * num, den, extras

    out = run_layout(LAYOUTS["data8_zero1"], dataclasses.replace(PRETRAIN, loss_sums=eight_times))
    with pytest.raises(AssertionError, match="gradient of"):
        assert_grads_match(out["grads"], reference["grads"], "x8")
    with pytest.raises(AssertionError):
        assert_params_match(out["params"], reference["params"], "x8")
    # Why the comparison must not use Adam with clipping: the same 8x error leaves those
    # parameters where the correct gradient puts them.
    adam = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
    params = {k: jnp.asarray(v) for k, v in flat_params(out["state"].params).items()}
    g = {k: jnp.asarray(v) for k, v in reference["grads"].items()}
    moved = []
    for scale in (1.0, 8.0):
        upd, _ = adam.update(jax.tree.map(lambda x: scale * x, g), adam.init(params), params)
        moved.append(optax.apply_updates(params, upd))
    assert_params_match({k: np.asarray(v) for k, v in moved[1].items()},
                        {k: np.asarray(v) for k, v in moved[0].items()}, "adam hides the scale")
