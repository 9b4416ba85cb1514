"""Optimizer, schedules and batch ramp-up against hand-computed numbers (no training, fast)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nemojax.config import ConfigError, DataConfig, ModelConfig, OptimizerConfig
from nemojax.model import init_model
from nemojax.train.optim import decay_mask, learning_rate_schedule, make_optimizer
from nemojax.train.rampup import BatchSchedule


def _lr(cfg: OptimizerConfig, total: int, step: int) -> float:
    return float(learning_rate_schedule(cfg, total)(step))


# --------------------------------------------------------------------------- schedules


def test_warmup_cosine_values():
    cfg = OptimizerConfig(learning_rate=1e-3, min_learning_rate=1e-4, schedule="cosine", warmup_steps=10)
    total = 110  # 10 warmup + 100 cosine steps
    expect = {
        0: 0.0,
        5: 5e-4,  # linear warmup: half way
        10: 1e-3,  # peak
        35: 1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * 0.25)),
        60: 5.5e-4,  # cosine half way: floor + (peak - floor) / 2
        110: 1e-4,  # floor at the end
        500: 1e-4,  # and after it
    }
    for step, want in expect.items():
        assert _lr(cfg, total, step) == pytest.approx(want, rel=1e-5, abs=1e-12), step


def test_cosine_explicit_decay_steps():
    cfg = OptimizerConfig(learning_rate=2.0, min_learning_rate=0.0, schedule="cosine", warmup_steps=0,
                          decay_steps=4)
    assert [_lr(cfg, 1000, s) for s in range(6)] == pytest.approx(
        [2.0, 1.0 + math.cos(math.pi / 4), 1.0, 1.0 - math.cos(math.pi / 4), 0.0, 0.0], abs=1e-6)


def test_constant_with_warmup():
    cfg = OptimizerConfig(learning_rate=1e-3, schedule="constant", warmup_steps=4)
    assert [_lr(cfg, 100, s) for s in (0, 1, 2, 4, 50, 99)] == pytest.approx(
        [0.0, 2.5e-4, 5e-4, 1e-3, 1e-3, 1e-3])


def test_wsd_values():
    cfg = OptimizerConfig(learning_rate=1e-3, min_learning_rate=1e-4, schedule="wsd", warmup_steps=10,
                          decay_steps=20)
    total = 110  # warmup 10, stable 80 (steps 10..90), linear decay 20 (90..110)
    expect = {5: 5e-4, 10: 1e-3, 50: 1e-3, 90: 1e-3, 100: 5.5e-4, 105: 3.25e-4, 110: 1e-4, 200: 1e-4}
    for step, want in expect.items():
        assert _lr(cfg, total, step) == pytest.approx(want, rel=1e-5), step


def test_wsd_default_decay_is_a_fifth():
    cfg = OptimizerConfig(learning_rate=1.0, min_learning_rate=0.0, schedule="wsd", warmup_steps=0)
    # total 100 -> decay 20 steps starting at 80
    assert _lr(cfg, 100, 79) == pytest.approx(1.0)
    assert _lr(cfg, 100, 90) == pytest.approx(0.5)
    assert _lr(cfg, 100, 100) == pytest.approx(0.0, abs=1e-7)


def test_unknown_schedule_names_the_key():
    with pytest.raises(ConfigError, match="optimizer.schedule"):
        learning_rate_schedule(OptimizerConfig(schedule="linear"), 10)


# --------------------------------------------------------------------------- decay mask, clipping

_TINY = ModelConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8,
                    ffn_hidden_size=32, max_seq_len=16, init_std=0.02)


@pytest.fixture(scope="module")
def tiny_params():
    return nnx.state(init_model(_TINY, 0), nnx.Param)


def test_decay_mask_exempts_norms_only(tiny_params):
    mask = {jax.tree_util.keystr(k): v for k, v in
            jax.tree_util.tree_leaves_with_path(decay_mask(tiny_params))}
    decayed = sorted(k for k, v in mask.items() if v)
    exempt = sorted(k for k, v in mask.items() if not v)
    assert all("norm" in k for k in exempt) and len(exempt) == 6  # 4 per-layer stacks + final scale/bias
    for name in ("embed", "lm_head", "'q'", "'k'", "'v'", "'o'", "'up'", "'down'"):
        assert any(name in k for k in decayed), name
    assert not any("norm" in k for k in decayed)


def test_weight_decay_applies_to_matrices_not_norms(tiny_params):
    """With zero gradients Adam's step is 0, so the whole update is -lr * wd * param (decoupled)."""
    params = jax.tree.map(lambda x: x + 0.5, tiny_params)  # make the norm params non-zero too
    cfg = OptimizerConfig(learning_rate=0.1, schedule="constant", warmup_steps=0, weight_decay=0.5,
                          grad_clip=1.0)
    tx = make_optimizer(cfg, 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    for (path, u), p in zip(jax.tree_util.tree_leaves_with_path(updates), jax.tree.leaves(params)):
        if "norm" in jax.tree_util.keystr(path):
            np.testing.assert_array_equal(np.asarray(u), 0.0)
        else:
            np.testing.assert_allclose(np.asarray(u), -0.1 * 0.5 * np.asarray(p), rtol=1e-6)


def test_global_norm_clipping():
    """Adam's first moment after one step is (1 - b1) * g; with clipping g is rescaled to norm 1."""
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones((3,))}
    grads = {"w": jnp.full((2, 2), 3.0), "b": jnp.asarray([4.0, 0.0, 0.0])}  # norm sqrt(36 + 16)
    norm = math.sqrt(52.0)
    for clip, scale in ((1.0, 1.0 / norm), (0.0, 1.0), (100.0, 1.0)):
        cfg = OptimizerConfig(learning_rate=1e-3, schedule="constant", warmup_steps=0, weight_decay=0.0,
                              grad_clip=clip, beta1=0.9)
        tx = make_optimizer(cfg, 10)
        _, state = tx.update(grads, tx.init(params), params)
        adam = next(s for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
                    if isinstance(s, optax.ScaleByAdamState))
        np.testing.assert_allclose(np.asarray(adam.mu["w"]), 0.1 * 3.0 * scale, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(adam.mu["b"]), [0.1 * 4.0 * scale, 0, 0], rtol=1e-5)


# --------------------------------------------------------------------------- batch ramp-up


def _paper_schedule(seq: int = 4096) -> BatchSchedule:
    """The Nemotron-4 shape: 768 -> 1536 -> 2304 sequences, switching at token counts."""
    data = DataConfig(seq_len=seq, global_batch_size=2304, micro_batch_size=768, rampup=[
        {"batch_size": 768, "until_tokens": 10 * 768 * seq},  # exactly 10 steps
        {"batch_size": 1536, "until_tokens": 10 * 768 * seq + 25 * 1536 * seq - 1},  # 25 steps (ceil)
    ])
    return BatchSchedule(data)


def test_rampup_batch_sizes_and_tokens():
    s = _paper_schedule(seq=4)
    sizes = [s.batch_size(i) for i in range(40)]
    assert sizes == [768] * 10 + [1536] * 25 + [2304] * 5
    assert [s.accum_steps(i) for i in (0, 10, 35)] == [1, 2, 3]  # micro batch fixed at 768
    assert s.micro_batch(0) == s.micro_batch(39) == 768
    assert s.tokens_before(0) == 0
    assert s.tokens_before(10) == 10 * 768 * 4
    assert s.tokens_before(35) == 10 * 768 * 4 + 25 * 1536 * 4
    assert s.tokens_before(37) == s.tokens_before(35) + 2 * 2304 * 4
    # tokens_before agrees with summing the per-step batch sizes
    assert s.tokens_before(40) == sum(b * 4 for b in sizes)
    assert s.distinct_shapes() == {(1, 768), (2, 768), (3, 768)}  # one compile per stage


def test_rampup_stage_already_passed_is_skipped():
    data = DataConfig(seq_len=2, global_batch_size=8, rampup=[
        {"batch_size": 2, "until_tokens": 4},  # 1 step
        {"batch_size": 4, "until_tokens": 5},  # 5 - 4 = 1 token left -> 1 step of 8 tokens
    ])
    s = BatchSchedule(data)
    assert [s.batch_size(i) for i in range(4)] == [2, 4, 8, 8]
    assert s.accum_steps(0) == 1 and s.micro_batch(1) == 4  # micro 0 = no accumulation


def test_no_rampup_is_constant():
    s = BatchSchedule(DataConfig(seq_len=8, global_batch_size=6, micro_batch_size=2))
    assert {s.batch_size(i) for i in range(100)} == {6}
    assert s.accum_steps(7) == 3 and s.tokens_before(5) == 5 * 6 * 8


@pytest.mark.parametrize("rampup, micro, match", [
    ([{"batch_size": 3, "until_tokens": 10}], 2, r"data.rampup\[0\].batch_size=3 is not a multiple"),
    ([{"batch_size": 2, "until_tokens": 10}, {"batch_size": 4, "until_tokens": 10}], 2,
     r"data.rampup\[1\].until_tokens must be an integer greater"),
    ([{"batch_size": 2}], 2, r"data.rampup\[0\] must be a mapping"),
    ([{"batch_size": -2, "until_tokens": 5}], 0, r"data.rampup\[0\].batch_size must be a positive"),
    ([], 4, r"data.global_batch_size=6 is not a multiple of data.micro_batch_size=4"),
])
def test_rampup_errors_name_the_key(rampup, micro, match):
    with pytest.raises(ConfigError, match=match):
        BatchSchedule(DataConfig(seq_len=8, global_batch_size=6, micro_batch_size=micro, rampup=rampup))


# --------------------------------------------------------------------------- mixed precision


def test_bf16_weights_get_fp32_gradients_clipping_and_update():
    """Megatron mixed precision: with bf16 weights the gradients reach the optimizer in fp32
    (accumulated over micro-batches in fp32, never rounded to bf16 first), clipping and AdamW
    run on the fp32 master copy, and the stored weights are the master rounded once."""
    from nemojax.train.optim import MasterState, with_fp32_master
    from nemojax.train.step import create_train_state, make_train_step

    cfg = ModelConfig(**{**_TINY.__dict__, "param_dtype": "bfloat16", "compute_dtype": "bfloat16"})
    seen = []

    def spy_init(params):
        return optax.EmptyState()

    def spy_update(grads, state, params=None):
        seen.append({str(g.dtype) for g in jax.tree.leaves(grads)})
        return grads, state

    opt = make_optimizer(OptimizerConfig(learning_rate=1e-3, warmup_steps=0, schedule="constant", grad_clip=1.0), 10)
    tx = optax.chain(optax.GradientTransformation(spy_init, spy_update), with_fp32_master(opt))
    graphdef, state = create_train_state(init_model(cfg, 0), tx)
    assert {str(x.dtype) for x in jax.tree.leaves(state.params)} == {"bfloat16"}
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 2, 16)), jnp.int32)
    batch = {"input_ids": ids, "targets": ids, "loss_mask": jnp.ones((2, 2, 16)),
             "positions": jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (2, 2, 16)),
             "segment_ids": jnp.ones((2, 2, 16), jnp.int32)}
    new, metrics = jax.jit(make_train_step(graphdef, tx))(state, batch)
    assert seen == [{"float32"}]  # what the step hands the optimizer (traced once)
    master = next(s for s in new.opt_state if isinstance(s, MasterState)).master
    assert {str(x.dtype) for x in jax.tree.leaves(master)} == {"float32"}
    for m, p in zip(jax.tree.leaves(master), jax.tree.leaves(new.params)):
        assert p.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(p), np.asarray(m.astype(jnp.bfloat16)))
    assert np.isfinite(float(metrics["grad_norm"])) and bool(metrics["finite"])


def test_large_presets_default_to_mixed_precision():
    from nemojax.config import load_config
    from nemojax.train.build import training_state_bytes

    for preset in ("nemotron4-15b", "nemotron4-340b"):
        cfg = load_config(preset, ["mesh.tensor=8", "mesh.data=-1"])
        assert (cfg.model.param_dtype, cfg.model.compute_dtype) == ("bfloat16", "bfloat16"), preset
        assert cfg.sharding.zero1 and cfg.sharding.zero2, preset  # Megatron's distributed optimizer
        est = training_state_bytes(cfg, 64)["per_device_bytes"]
        assert est["master_weights"] > 0, preset  # fp32 master in the optimizer state
        assert est["gradients"] == 2 * est["params"], preset  # fp32 accumulator, bf16 weights
