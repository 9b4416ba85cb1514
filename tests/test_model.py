"""The model's parts against hand-derived values, and its modes against each other."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemojax.config import load_config
from nemojax.model import KVCache, init_model, logical_axes
from nemojax.model.layers import apply_partial_rope, layernorm1p, rope_tables

SMALL = ["model.hidden_size=64", "model.num_layers=3", "model.num_heads=4", "model.num_kv_heads=2",
         "model.head_dim=16", "model.ffn_hidden_size=128", "model.vocab_size=97"]


def small_cfg(*extra):
    return load_config("tiny", [*SMALL, *extra]).model


@pytest.fixture(scope="module")
def model():
    return init_model(small_cfg(), seed=1)


def test_layernorm1p_matches_hand_formula():
    rng = np.random.default_rng(0)
    x, w, b = rng.normal(size=(2, 3, 8)), rng.normal(size=8), rng.normal(size=8)
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    want = (x - mu) / np.sqrt(var + 1e-5) * (1 + w) + b
    got = layernorm1p(jnp.asarray(x, jnp.float32), jnp.asarray(w), jnp.asarray(b), 1e-5)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_partial_rope_rotates_only_the_first_fraction_and_is_relative():
    rng = np.random.default_rng(0)
    hd, rot = 16, 8
    q = jnp.asarray(rng.normal(size=(1, 1, 1, hd)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, hd)), jnp.float32)

    def at(x, pos):
        cos, sin = rope_tables(jnp.array([[pos]]), rot, 10000.0)
        return apply_partial_rope(x, cos, sin)

    np.testing.assert_array_equal(np.asarray(at(q, 5))[..., rot:], np.asarray(q)[..., rot:])
    np.testing.assert_allclose(np.asarray(at(q, 0)), np.asarray(q), atol=1e-6)
    # Hand value: the pair (x_i, x_{i+rot/2}) rotates by angle pos * base^(-2i/rot).
    pos, i = 3, 1
    theta = pos * 10000.0 ** (-2 * i / rot)
    x0, x1 = float(q[0, 0, 0, i]), float(q[0, 0, 0, i + rot // 2])
    out = np.asarray(at(q, pos))[0, 0, 0]
    np.testing.assert_allclose([out[i], out[i + rot // 2]],
                               [x0 * math.cos(theta) - x1 * math.sin(theta),
                                x1 * math.cos(theta) + x0 * math.sin(theta)], atol=1e-5)
    # Scores depend only on the offset between query and key positions.
    d1 = float(jnp.sum(at(q, 7) * at(k, 4)))
    d2 = float(jnp.sum(at(q, 13) * at(k, 10)))
    assert d1 == pytest.approx(d2, abs=1e-4)


def test_every_param_has_logical_axes_of_its_rank(model):
    state = nnx.state(model, nnx.Param)
    axes = logical_axes(model)
    flat_params = dict(nnx.to_flat_state(state))
    flat_axes = dict(jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))[0])
    assert len(flat_axes) == len(flat_params) == 14
    for path, var in flat_params.items():
        names = var.get_metadata()["logical_axes"]
        assert len(names) == var.get_value().ndim, path


def test_init_follows_the_paper(model):
    cfg = model.cfg
    std = cfg.init_std
    assert float(jnp.std(model.blocks.q[...])) == pytest.approx(std, rel=0.05)
    assert float(jnp.std(model.blocks.up[...])) == pytest.approx(std, rel=0.05)
    out_std = std / math.sqrt(2 * cfg.num_layers)
    assert float(jnp.std(model.blocks.o[...])) == pytest.approx(out_std, rel=0.1)
    assert float(jnp.std(model.blocks.down[...])) == pytest.approx(out_std, rel=0.1)
    assert not jnp.any(model.blocks.attn_norm_scale[...]) and not jnp.any(model.final_norm_bias[...])
    names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert not any("bias" in n and "norm" not in n for n in names), "linear layers have no biases"
    assert "lm_head" in names and "embed" in names  # untied


def _ids(b, s, seed=0, vocab=97):
    return jnp.asarray(np.random.default_rng(seed).integers(3, vocab, size=(b, s)), jnp.int32)


def test_packed_documents_never_attend_across(model):
    a, b = _ids(1, 7, 1), _ids(1, 5, 2)
    packed = jnp.concatenate([a, b], axis=1)
    seg = jnp.array([[1] * 7 + [2] * 5])
    pos = jnp.array([list(range(7)) + list(range(5))])
    out = model(packed, positions=pos, segment_ids=seg)
    np.testing.assert_allclose(out[:, :7], model(a), atol=1e-5)
    np.testing.assert_allclose(out[:, 7:], model(b), atol=1e-5)


def test_padding_mask_leaves_real_tokens_untouched(model):
    ids = _ids(2, 10, 3)
    mask = jnp.array([[1] * 10, [1] * 6 + [0] * 4])
    out = model(ids, attention_mask=mask)
    np.testing.assert_allclose(out[1, :6], model(ids[1:, :6])[0], atol=1e-5)


@pytest.mark.parametrize("segments", [False, True])
def test_attention_backends_agree(segments):
    """Whole-model logits; splash runs its TPU kernel in Pallas interpret mode on this CPU and
    pads the 12 tokens to its 128-token tile (tests/test_attention.py checks each backend
    against the formula, tests/test_attention_cudnn.py the cuDNN path)."""
    ids = _ids(2, 12, 4)
    seg = jnp.array([[1] * 5 + [2] * 5 + [0] * 2, [1] * 12]) if segments else None
    outs = {b: init_model(small_cfg(f"model.attention_backend={b}"), seed=1)(ids, segment_ids=seg)
            for b in ("xla", "dot_product", "splash", "auto")}
    for b, out in outs.items():
        np.testing.assert_allclose(out, outs["xla"], atol=1e-5, err_msg=b)


def _loss_and_grads(cfg, ids):
    model = init_model(cfg, seed=1)
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p):
        return jnp.mean(jnp.square(nnx.merge(graphdef, p)(ids)))

    return jax.jit(jax.value_and_grad(loss))(params)


def test_scan_unrolled_and_remat_policies_give_identical_gradients():
    ids = _ids(2, 8, 5)
    ref_loss, ref_grads = _loss_and_grads(small_cfg(), ids)
    for extra in (["model.scan_layers=false"], ["model.remat_policy=full"],
                  ["model.remat_policy=dots_no_batch"], ["model.remat_policy=save_qkv_attn_out"]):
        loss, grads = _loss_and_grads(small_cfg(*extra), ids)
        assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6), extra
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(g, r, atol=1e-6, rtol=1e-5, err_msg=str(extra))


def test_bf16_compute_and_params_track_fp32():
    ids = _ids(2, 8, 6)
    ref = init_model(small_cfg(), seed=1)(ids)
    for extra in (["model.compute_dtype=bfloat16"], ["model.param_dtype=bfloat16", "model.compute_dtype=bfloat16"]):
        out = init_model(small_cfg(*extra), seed=1)(ids)
        assert out.dtype == jnp.float32
        assert float(jnp.max(jnp.abs(out - ref))) < 0.05, extra


@pytest.fixture(scope="module")
def splash_model():
    return init_model(small_cfg("model.attention_backend=splash"), seed=1)


@pytest.mark.parametrize("which", ["xla", "splash"])
def test_cached_decode_matches_full_forward(which, model, splash_model):
    """Decode attends over the cache with the xla formula whatever the backend: it must continue
    a prompt exactly as the backend's own full forward does."""
    model = splash_model if which == "splash" else model
    ids = _ids(2, 9, 7)
    full = model(ids)
    cache = KVCache.zeros(model.cfg, batch=2, max_len=16)
    pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
    logits, cache = model.decode(ids[:, :5], pos, cache)
    np.testing.assert_allclose(logits, full[:, :5], atol=1e-4)
    for t in range(5, 9):
        step_logits, cache = model.decode(ids[:, t:t + 1], jnp.full((2, 1), t), cache)
        np.testing.assert_allclose(step_logits[:, 0], full[:, t], atol=1e-4)
