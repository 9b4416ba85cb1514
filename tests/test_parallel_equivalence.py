"""Every parallel layout trains exactly like one device: same losses, same parameters.

A tiny fp32 model takes 2 AdamW steps on a fixed batch; the reference is the plain,
unsharded `make_train_step` under `jax.jit` on one device (it never touches
nemojax.parallel), shared by all cases through a module-scoped fixture. Each layout must
reproduce the reference losses and every parameter within 1e-5.

To add a layout (e.g. the pipeline helper's cases), add an entry to `CASES`: mesh overrides
for `MeshConfig`, and optionally a `build` callable (cfg, mesh) -> ShardedTraining-like object
with `init_state`, `step`, `global_batch`.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import pytest

from nemojax.config import config_from_dict
from nemojax.parallel.mesh import make_mesh
from nemojax.train.build import build_training
from reference_run import flat_params, packed_batch, single_device_run

STEPS = 2
SEQ, BATCH = 32, 8
TOL = 1e-5

MODEL = dict(vocab_size=128, hidden_size=64, num_layers=4, num_heads=8, num_kv_heads=4, head_dim=8,
             ffn_hidden_size=256, max_seq_len=SEQ, init_std=0.05)
# eps well above fp32 noise in the gradients: Adam's first step is ~lr * g / (|g| + eps), which
# would turn a reduction-order difference in a near-zero gradient into a full-size update.
OPT = dict(learning_rate=3e-3, warmup_steps=0, schedule="constant", eps=1e-4, weight_decay=0.1,
           grad_clip=1.0)

CASES: dict[str, dict[str, Any]] = {
    "data8_zero1": {"mesh": dict(data=8), "sharding": dict(zero1=True)},
    "fsdp8": {"mesh": dict(data=1, fsdp=8)},
    "tensor4_data2_no_zero1": {"mesh": dict(data=2, tensor=4), "sharding": dict(zero1=False)},
    "data2_fsdp2_tensor2_seqpar_zero1": {"mesh": dict(data=2, fsdp=2, tensor=2),
                                         "sharding": dict(zero1=True, sequence_parallel=True)},
}


def make_cfg(mesh: dict[str, Any], sharding: dict[str, Any] | None = None):
    return config_from_dict({"model": MODEL, "optimizer": OPT, "mesh": mesh, "sharding": sharding or {},
                             "steps": STEPS, "data": dict(seq_len=SEQ, global_batch_size=BATCH)})


def make_batch() -> dict[str, np.ndarray]:
    return packed_batch(MODEL["vocab_size"], BATCH, SEQ, seed=1234, cut=SEQ // 2 + 3, masked_tail=3)


@pytest.fixture(scope="module")
def reference() -> tuple[list[float], dict[str, np.ndarray]]:
    """Losses and final params of the plain single-device run."""
    return single_device_run(make_cfg(dict(data=1)), make_batch(), STEPS)


@pytest.mark.parametrize("name", list(CASES))
def test_layout_matches_single_device(name: str, reference) -> None:
    case = CASES[name]
    cfg = make_cfg(case["mesh"], case.get("sharding"))
    mesh = make_mesh(cfg.mesh)
    st = build_training(cfg, mesh)
    state = st.init_state(cfg.seed)
    batch = st.global_batch({k: v[0] for k, v in make_batch().items()}, 1, BATCH)
    losses = []
    for _ in range(STEPS):
        state, metrics = st.step(state, batch)
        losses.append(float(metrics["loss"]))
    ref_losses, ref_params = reference
    np.testing.assert_allclose(losses, ref_losses, rtol=TOL, atol=TOL, err_msg=f"{name}: losses")
    got = flat_params(state.params)
    assert got.keys() == ref_params.keys()
    worst = max(float(np.max(np.abs(got[k] - ref_params[k]))) for k in got)
    for k in got:
        np.testing.assert_allclose(got[k], ref_params[k], rtol=TOL, atol=TOL, err_msg=f"{name}: {k}")
    # the layout really is distributed: device 0 holds at most half of the training state
    leaves = jax.tree.leaves(state)
    full = sum(a.nbytes for a in leaves)
    dev0 = sum(next(s.data.nbytes for s in a.addressable_shards if s.device.id == 0) for a in leaves)
    assert dev0 <= full / 2, f"{name}: device 0 holds {dev0} of {full} bytes"
    print(f"{name}: max |param diff| = {worst:.2e}")
    assert worst <= TOL
