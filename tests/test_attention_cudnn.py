"""The cuDNN flash path, checked on a CPU: what cuDNN would receive, and what it would compute.

JAX refuses to trace cuDNN attention without a GPU, so nothing here runs cuDNN. Checked instead:
* segment ids -> cuDNN's ragged description (`segment_runs`), by hand;
* JAX's own argument checks (`check_layout`) accept those arguments, and JAX's own conversion
  (`_fix_seqlen_offsets`, run just before the custom call) turns them into the sequence
  lengths and element offsets cuDNN gets;
* the backend end to end, with JAX's cuDNN entry point replaced by an emulation of cuDNN's
  documented semantics (each (offset, length) slot is one sequence, causal inside it; CAUSAL;
  a dense mask), written from those arguments, never from segment ids: its output must equal
  the attention formula, on the ragged path and on the dense fallback taken when a row holds
  more runs than the cap. A debug callback records which path ran. The emulation refuses to
  be vmapped, as JAX's batching rule does for ragged lengths: under the pipeline's vmap (with
  remat and gradients) the backend must fold the vmapped dim into the batch instead.
What awaits a GPU: the kernel itself (benchmarks/gpu_check.py compares it with `xla`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax.model import cudnn_attention as cd
from nemojax.model.attention import self_attention
from test_attention import numpy_attention

sdpa = cd.cudnn_sdpa
B, T, H, KV, D = 2, 16, 4, 2, 8
runs_of = jax.jit(cd.segment_runs, static_argnums=1)  # eager dispatch compiles op by op: slow
PACKED = np.array([[1] * 5 + [2] * 4 + [3] * 3 + [0] * 4, [7] * 10 + [8] * 6], np.int32)


def test_segment_runs_by_hand():
    r = runs_of(jnp.array([[1, 1, 1, 2, 2, 0, 0], [4] * 7]), 4)
    assert r.seqlen.tolist() == [[3, 2, 2, -1], [7, -1, -1, -1]]
    assert r.offsets.tolist() == [[0, 3, 5, -1, -1], [0, -1, -1, -1, -1]]
    assert r.runs.tolist() == [3, 1] and bool(r.fits)
    # a repeated id after another id is a new run (cuDNN sequences are contiguous)
    r = runs_of(jnp.array([[1, 2, 1, 1, 3, 3, 3, 4]]), 3)
    assert r.runs.tolist() == [5] and not bool(r.fits)
    assert r.seqlen.tolist() == [[1, 1, 2]] and r.offsets.tolist() == [[0, 1, 2, -1]]
    with pytest.raises(ValueError, match=">= 2"):
        cd.segment_runs(jnp.ones((1, 4), jnp.int32), 1)


def test_jax_accepts_the_arguments_and_hands_cudnn_the_ragged_sequences():
    seg = jnp.array([[1, 1, 1, 2, 2, 0, 0], [4] * 7])
    r = runs_of(seg, 4)
    q = jnp.zeros((2, 7, H, D), jnp.bfloat16)
    k = jnp.zeros((2, 7, KV, D), jnp.bfloat16)
    sdpa.check_layout(q, k, k, None, r.seqlen, r.seqlen, r.offsets, r.offsets, None, None,
                      sdpa.AttentionLayout.BTNH)
    seqlen, _, offsets, _ = jax.jit(sdpa._fix_seqlen_offsets)(r.seqlen, r.seqlen, r.offsets, r.offsets, q, k)
    # four sequences (3, 2, 2 tokens in row 0; 7 in row 1), then empty slots
    assert seqlen.reshape(-1).tolist() == [3, 2, 2, 7, 0, 0, 0, 0]
    # token offsets into the flattened [2 x 7] batch, end marker 14, in elements (x heads x dim)
    assert (offsets // (H * D)).reshape(-1).tolist() == [0, 3, 5, 7, 14, 14, 14, 14, 14, 14]


def _emulated_cudnn(record):
    """cuDNN's attention per its documented arguments, in fp32, as a drop-in for
    fused_attention_stablehlo.dot_product_attention."""

    def fake(query, key, value, bias=None, mask=None, q_seqlen=None, kv_seqlen=None, q_offsets=None,
             kv_offsets=None, fp8_params=None, *, scale=1.0, mask_type=sdpa.MaskType.NO_MASK,
             qkv_layout="BTNH", **unused):
        assert qkv_layout == "BTNH" and query.dtype in (jnp.bfloat16, jnp.float16)
        assert scale == pytest.approx(query.shape[-1] ** -0.5) and bias is None
        sdpa.check_layout(query, key, value, None, q_seqlen, kv_seqlen, q_offsets, kv_offsets, None, None,
                          sdpa.AttentionLayout.BTNH)
        b, t = query.shape[:2]
        causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]
        if mask_type == sdpa.MaskType.PADDING_CAUSAL:
            tok = jnp.arange(t)[None, :, None]
            start, length = q_offsets[:, None, :-1], q_seqlen[:, None, :]
            inside = (tok >= start) & (tok < start + length) & (length > 0)  # [b, t, slot]
            slot = jnp.where(inside.any(-1), jnp.argmax(inside, -1), -1)
            visible = causal[None] & (slot[:, :, None] == slot[:, None, :]) & (slot[:, :, None] >= 0)
        elif mask_type == sdpa.MaskType.CAUSAL:
            visible = jnp.broadcast_to(causal, (b, t, t))
        else:
            assert mask_type == sdpa.MaskType.NO_MASK and mask is not None
            visible = mask[:, 0]
        jax.debug.callback(lambda: record.append(mask_type.name))
        # Tripwire: like JAX's batching rule for the cuDNN primitive on ragged lengths, refuse
        # to be vmapped (a pure_callback without vmap_method raises under vmap).
        query = query + 0 * jax.pure_callback(lambda a: a, jax.ShapeDtypeStruct(query.shape, query.dtype),
                                              jax.lax.stop_gradient(query))
        group = query.shape[2] // key.shape[2]
        kk, vv = (jnp.repeat(x.astype(jnp.float32), group, axis=2) for x in (key, value))
        s = jnp.einsum("bthd,bshd->bhts", query.astype(jnp.float32), kk) * scale
        s = jnp.where(visible[:, None], s, -1e30)
        return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, -1), vv).astype(query.dtype)

    return fake


@pytest.fixture
def emulated(monkeypatch):
    record: list[str] = []
    monkeypatch.setattr(sdpa, "dot_product_attention", _emulated_cudnn(record))
    return record


def _bf16_inputs():
    rng = np.random.default_rng(3)
    return [jnp.asarray(rng.normal(size=(B, T, n, D)), jnp.bfloat16) for n in (H, KV, KV)]


@pytest.mark.parametrize("segments,cap,path", [
    (PACKED, 4, "PADDING_CAUSAL"),  # 4 runs in row 0 (3 documents + padding): the ragged path
    (PACKED, 3, "NO_MASK"),  # over the cap: the dense-mask fallback, same result
    (None, 4, "CAUSAL"),
])
def test_cudnn_backend_equals_the_formula(emulated, segments, cap, path):
    q, k, v = _bf16_inputs()
    seg = None if segments is None else jnp.asarray(segments)
    out = jax.jit(lambda q, k, v, s: self_attention(q, k, v, backend="cudnn", segment_ids=s, max_segments=cap))(
        q, k, v, seg)
    jax.effects_barrier()
    assert emulated == [path]  # the branch that ran, not only traced
    want = numpy_attention(*(np.asarray(x, np.float32) for x in (q, k, v)), segments)
    np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=2e-2)  # bf16 output


def test_cudnn_refuses_fp32_with_the_key_to_change(emulated):
    q, k, v = (x.astype(jnp.float32) for x in _bf16_inputs())
    with pytest.raises(ValueError, match="compute_dtype=bfloat16"):
        self_attention(q, k, v, backend="cudnn", segment_ids=None)


def test_cudnn_under_vmap_remat_and_grad_folds_the_batch(emulated):
    """The circular pipeline runs blocks under vmap (stages) with remat; the cuDNN call must see
    the stages folded into its batch, and the gradients must still be attention's."""
    stages = 2
    rng = np.random.default_rng(5)
    q, k, v = (jnp.asarray(rng.normal(size=(stages, B, T, n, D)), jnp.bfloat16) for n in (H, KV, KV))
    seg = jnp.asarray(np.stack([PACKED, PACKED[::-1]]))
    proj = jnp.asarray(rng.normal(size=(stages, B, T, H, D)), jnp.float32)

    def loss(backend, q, k, v):
        att = jax.checkpoint(lambda q, k, v, s: self_attention(q, k, v, backend=backend, segment_ids=s,
                                                                max_segments=4))
        out = jax.vmap(att)(q, k, v, seg)
        return jnp.sum(out.astype(jnp.float32) * proj), out

    grad = jax.jit(jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True), static_argnums=0)
    (_, out), grads = grad("cudnn", q, k, v)
    jax.effects_barrier()
    assert set(emulated) == {"PADDING_CAUSAL"} and len(emulated) >= 2  # forward, and backward's recompute
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    for s in range(stages):
        want = numpy_attention(*(np.asarray(x[s]) for x in f32), np.asarray(seg[s]))
        np.testing.assert_allclose(np.asarray(out[s], np.float32), want, atol=2e-2)
    (_, _), ref = grad("xla", *f32)
    for g, r in zip(grads, ref):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r), atol=3e-2, rtol=3e-2)
