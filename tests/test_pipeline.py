"""The interleaved pipeline computes exactly what the unpipelined model computes.

8 fake CPU devices, fp32, a tiny 8-layer model. Checks here:
* schedule arithmetic (bubble fraction, layer-chunk layout, config validation);
* the pipelined forward and its gradients against the plain `model.hidden` (with remat);
* the builder pipelines whenever the RESOLVED mesh has pipeline stages.
The full sharded train step of the pipeline layouts (gradients and SGD parameters against one
device) is in tests/test_parallel_equivalence.py with every other layout.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemojax.config import ConfigError, ModelConfig, config_from_dict
from nemojax.model.transformer import NemotronLM
from nemojax.parallel.mesh import make_mesh
from nemojax.parallel.pipeline import (bubble_fraction, num_iterations, pipelined_hidden, schedule_summary,
                                       split_microbatches, merge_microbatches, to_stages, validate_pipeline)
from nemojax.train.build import build_training
from reference_run import flat_params, packed_batch

STEPS = 2
SEQ, BATCH = 32, 8
MODEL = dict(vocab_size=128, hidden_size=64, num_layers=8, num_heads=4, num_kv_heads=2, head_dim=16,
             ffn_hidden_size=128, max_seq_len=SEQ, init_std=0.05)
# Large Adam eps: a reduction-order difference in a near-zero gradient must not become a
# full-size first update (same reasoning as tests/test_parallel_equivalence.py).
OPT = dict(learning_rate=3e-3, warmup_steps=0, schedule="constant", eps=1e-4, weight_decay=0.1,
           grad_clip=1.0)


def make_cfg(mesh: dict[str, Any], **model: Any):
    """`mesh` may also hold the pipeline schedule keys (virtual_stages, microbatches)."""
    pipe = {k: mesh[k] for k in ("virtual_stages", "microbatches") if k in mesh}
    mesh = {k: v for k, v in mesh.items() if k not in pipe}
    return config_from_dict({"model": {**MODEL, **model}, "optimizer": OPT, "mesh": mesh, "pipeline": pipe,
                             "steps": STEPS, "data": dict(seq_len=SEQ, global_batch_size=BATCH)})


def make_batch() -> dict[str, np.ndarray]:
    return packed_batch(MODEL["vocab_size"], BATCH, SEQ, seed=7, cut=SEQ // 2 + 5, masked_tail=4)


# --------------------------------------------------------------------------- schedule arithmetic


def test_bubble_fraction_formula() -> None:
    assert bubble_fraction(1, 1, 1) == 0.0
    assert bubble_fraction(4, 1, 4) == pytest.approx(3 / 7)
    # interleaving by V divides the bubble's share of the useful work by V
    assert bubble_fraction(8, 12, 16) == pytest.approx(7 / (12 * 16 + 7))
    assert bubble_fraction(8, 12, 16) < bubble_fraction(8, 1, 16)
    assert num_iterations(4, 2, 4) == 11
    s = schedule_summary(8, 12, 16, 96)
    assert s["layers_per_chunk"] == 1 and s["iterations"] == 199
    with pytest.raises(ValueError):
        bubble_fraction(0, 1, 1)


def test_to_stages_places_chunk_c_on_stage_c_mod_p() -> None:
    L, P, V = 12, 3, 2
    staged = to_stages({"w": jnp.arange(L)}, P, V)["w"]  # [V, P, Lc]
    assert staged.shape == (2, 3, 2)
    for r in range(V):
        for p in range(P):
            c = r * P + p
            assert list(staged[r, p]) == [c * 2, c * 2 + 1]


def test_microbatch_split_roundtrip() -> None:
    a = jnp.arange(24).reshape(8, 3)
    s = split_microbatches(a, 4)
    assert s.shape == (4, 2, 3)
    assert list(s[1, :, 0]) == [3, 15]  # rows 1 and 5: strided, keeps contiguous data shards
    np.testing.assert_array_equal(merge_microbatches(s), a)


def test_validate_pipeline_messages() -> None:
    with pytest.raises(ConfigError, match="virtual_stages"):
        validate_pipeline(8, 4, 3, 4)
    with pytest.raises(ConfigError, match="set pipeline.microbatches to a multiple of 4"):
        validate_pipeline(8, 4, 2, 6)  # interleaved: groups of P microbatches
    with pytest.raises(ConfigError, match="does not split into pipeline.microbatches=3"):
        validate_pipeline(8, 2, 1, 3, batch=8)
    with pytest.raises(ConfigError, match="a multiple of 8 "):
        validate_pipeline(8, 2, 1, 4, batch=4, batch_split=2)  # 2 rows per device, 4 microbatches
    validate_pipeline(8, 2, 1, 1, batch=8)  # V == 1 needs no multiple of P
    validate_pipeline(8, 2, 1, 3, batch=12, batch_split=2)


# --------------------------------------------------------------------------- forward + gradient


@pytest.mark.parametrize("pipeline,virtual,micro,tensor,remat", [
    (4, 2, 4, 1, "full"),
    pytest.param(2, 2, 2, 2, "none", marks=pytest.mark.slow),
])
def test_pipelined_forward_and_grad_match_plain(pipeline: int, virtual: int, micro: int, tensor: int,
                                                remat: str) -> None:
    cfg = ModelConfig(**{**MODEL, "remat_policy": remat})
    model = NemotronLM(cfg, rngs=nnx.Rngs(params=3))
    graphdef, params = nnx.split(model, nnx.Param)
    b = make_batch()
    ids, pos, seg = (jnp.asarray(b[k][0]) for k in ("input_ids", "positions", "segment_ids"))
    probe = jax.random.normal(jax.random.key(0), (BATCH, SEQ, MODEL["hidden_size"]))
    cfg_mesh = make_cfg(dict(data=-1, pipeline=pipeline, tensor=tensor)).mesh
    mesh = make_mesh(cfg_mesh)

    def plain(p):
        h, _ = nnx.merge(graphdef, p).hidden(ids, positions=pos, segment_ids=seg)
        return jnp.sum(h * probe), h

    def piped(p):
        h = pipelined_hidden(nnx.merge(graphdef, p), ids, positions=pos, segment_ids=seg,
                             P=pipeline, V=virtual, M=micro, mesh=mesh)
        return jnp.sum(h * probe), h

    (v0, h0), g0 = jax.jit(jax.value_and_grad(plain, has_aux=True))(params)
    (v1, h1), g1 = jax.jit(jax.value_and_grad(piped, has_aux=True))(params)
    np.testing.assert_allclose(np.asarray(h1), np.asarray(h0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)
    f0, f1 = flat_params(g0), flat_params(g1)
    assert f0.keys() == f1.keys()
    for k in f0:
        if k.startswith("lm_head"):  # not part of hidden(): zero in both
            np.testing.assert_array_equal(f1[k], 0.0)
            continue
        assert np.abs(f0[k]).max() > 0, k  # every parameter really receives gradient
        # fp32 sums in a different order: compare relative to the gradient's scale
        scale = float(np.abs(f0[k]).max())
        np.testing.assert_allclose(f1[k], f0[k], rtol=0, atol=2e-6 * scale, err_msg=k)
    # A wrong layer order would not be caught by a model whose layers commute: check it matters.
    swapped = jax.tree.map(lambda a: a[::-1] if a.ndim and a.shape[0] == MODEL["num_layers"] else a,
                           params)
    (_, h_sw), _ = jax.jit(jax.value_and_grad(plain, has_aux=True))(swapped)
    assert float(jnp.max(jnp.abs(h_sw - h0))) > 1e-3


# --------------------------------------------------------------------------- selection


def test_pipelining_follows_the_resolved_mesh() -> None:
    """`mesh.pipeline=-1` that resolves to 2 stages pipelines (the schedule is chosen from the mesh
    the step runs on, not the config's literal value); one stage does not."""
    cfg = make_cfg(dict(data=2, pipeline=-1, tensor=2, microbatches=2))
    training = build_training(cfg, make_mesh(cfg.mesh))
    assert training.mesh.shape["pipeline"] == 2
    assert training.schedule is not None and (training.schedule.P, training.schedule.M) == (2, 2)
    plain = make_cfg(dict(data=-1, tensor=2))
    assert build_training(plain, make_mesh(plain.mesh)).schedule is None
    bad = make_cfg(dict(data=2, pipeline=-1, tensor=2, microbatches=3))
    with pytest.raises(ConfigError, match="pipeline.microbatches=3"):
        build_training(bad, make_mesh(bad.mesh))
