"""Self-attention backends against a numpy formula, and the splash kernel on the CPU.

The reference is written here from the definition (per row, per head: softmax over the keys a
query may see, i.e. earlier-or-equal positions of its own segment), independent of
nemojax.model.attention. `xla`, `dot_product` and `splash` (Pallas interpret mode: the TPU
kernel's own code, run by the interpreter) must equal it in the forward; their gradients must
equal the `xla` backend's (autodiff of the verified forward). Shapes are tiny: one 128-token
tile, GQA with 2 query heads per KV head, packed rows with padding.
The cuDNN path is in tests/test_attention_cudnn.py.
"""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from nemojax.model.attention import BACKENDS, compile_platform, resolve_backend, self_attention
from nemojax.model.axes import use_rules

B, T, H, KV, D = 2, 128, 4, 2, 16
# Row 0: three packed documents then padding (segment 0); row 1: one document, no segments
# would do, but packed ids must also work with a single segment.
SEGMENTS = np.array([[1] * 40 + [2] * 50 + [3] * 20 + [0] * 18, [5] * 128], np.int32)


def _inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, T, H, D)).astype(np.float32)
    k = rng.normal(size=(B, T, KV, D)).astype(np.float32)
    v = rng.normal(size=(B, T, KV, D)).astype(np.float32)
    return q, k, v


def numpy_attention(q, k, v, seg):
    """The definition, with loops: query t of head h sees keys s <= t with seg[s] == seg[t]."""
    b, t, h, d = q.shape
    group = h // k.shape[2]
    out = np.zeros_like(q, dtype=np.float64)
    for r in range(b):
        for head in range(h):
            kh, vh = k[r, :, head // group].astype(np.float64), v[r, :, head // group].astype(np.float64)
            for i in range(t):
                seen = [j for j in range(i + 1) if seg is None or seg[r, j] == seg[r, i]]
                s = kh[seen] @ q[r, i, head].astype(np.float64) / np.sqrt(d)
                p = np.exp(s - s.max())
                out[r, i, head] = (p / p.sum()) @ vh[seen]
    return out


@pytest.fixture(scope="module")
def reference():
    q, k, v = _inputs()
    return {"packed": numpy_attention(q, k, v, SEGMENTS), "causal": numpy_attention(q, k, v, None)}


def _run(backend: str, segments: np.ndarray | None):
    """Forward output and the gradient of a fixed random projection of it, jitted."""
    q, k, v = _inputs()
    seg = None if segments is None else jnp.asarray(segments)
    proj = jnp.asarray(np.random.default_rng(9).normal(size=(B, T, H, D)), jnp.float32)

    def loss(q, k, v):
        out = self_attention(q, k, v, backend=backend, segment_ids=seg)
        return jnp.sum(out * proj), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return np.asarray(out), [np.asarray(g) for g in grads]


@pytest.fixture(scope="module")
def xla_runs():
    return {"packed": _run("xla", SEGMENTS), "causal": _run("xla", None)}


@pytest.mark.parametrize("backend", ["xla", "dot_product", "splash"])
@pytest.mark.parametrize("layout", ["packed", "causal"])
def test_backend_matches_the_formula_and_xla_gradients(backend, layout, reference, xla_runs):
    out, grads = _run(backend, SEGMENTS if layout == "packed" else None)
    np.testing.assert_allclose(out, reference[layout], atol=2e-5)
    for g, want in zip(grads, xla_runs[layout][1]):
        np.testing.assert_allclose(g, want, atol=5e-5, rtol=1e-4)


def test_splash_pads_a_length_off_the_tile_grid(reference):
    """A 77-token sequence is padded to the 128-token tile and cut back; padding never leaks."""
    q, k, v = _inputs()
    t = 77
    seg = SEGMENTS[:, :t]
    out = jax.jit(lambda q, k, v, s: self_attention(q, k, v, backend="splash", segment_ids=s))(
        q[:, :t], k[:, :t], v[:, :t], jnp.asarray(seg))
    assert out.shape == (B, t, H, D)
    np.testing.assert_allclose(np.asarray(out), numpy_attention(q[:, :t], k[:, :t], v[:, :t], seg), atol=2e-5)


def test_auto_resolution_table():
    bf16, f32 = jnp.bfloat16, jnp.float32
    assert resolve_backend("auto", platform="tpu", dtype=f32) == "splash"
    assert resolve_backend("auto", platform="tpu", dtype=bf16) == "splash"
    assert resolve_backend("auto", platform="cuda", dtype=bf16) == "cudnn"
    assert resolve_backend("auto", platform="cuda", dtype="bfloat16") == "cudnn"
    assert resolve_backend("auto", platform="cuda", dtype=f32) == "xla"  # cuDNN has no fp32 path
    assert resolve_backend("auto", platform="rocm", dtype=bf16) == "xla"
    assert resolve_backend("auto", platform="cpu", dtype=bf16) == "xla"
    for explicit in set(BACKENDS) - {"auto"}:
        assert resolve_backend(explicit, platform="cpu", dtype=f32) == explicit
    with pytest.raises(ValueError, match="unknown"):
        resolve_backend("flash", platform="cpu", dtype=f32)
    assert compile_platform() == "cpu"


# --------------------------------------------------------------------------- sharded splash

def _mesh(shape: dict[str, int]):
    from nemojax.parallel.mesh import MESH_AXES

    sizes = [shape.get(a, 1) for a in MESH_AXES]
    devices = np.array(jax.devices()[:int(np.prod(sizes))]).reshape(sizes)
    return jax.sharding.Mesh(devices, MESH_AXES)


RULES = {"batch": ("data", "fsdp"), "heads": ("tensor",), "kv_heads": ("tensor",)}


@pytest.mark.parametrize("mesh_shape,rules", [
    ({"data": 2, "tensor": 2}, RULES),
    # 4-way heads, KV heads replicated: each device gets copies of its query heads' KV head
    ({"data": 2, "tensor": 4}, {**RULES, "kv_heads": ()}),
], ids=["data2-tensor2", "tensor4-kv-replicated"])
def test_splash_under_sharding_rules_matches_the_formula(mesh_shape, rules, reference):
    """Under `use_rules` the kernel runs in a shard_map over batch and heads (a Pallas call is
    opaque to the partitioner); each device must compute its own rows and heads exactly."""
    mesh = _mesh(mesh_shape)
    q, k, v = _inputs()
    spec = NamedSharding(mesh, PartitionSpec(("data",), None, "tensor" if rules["kv_heads"] else None))

    @jax.jit
    def run(q, k, v, seg):
        with use_rules(mesh, rules):
            return self_attention(q, k, v, backend="splash", segment_ids=seg)

    args = [jax.device_put(x, NamedSharding(mesh, PartitionSpec("data", None, "tensor"))) for x in (q,)]
    args += [jax.device_put(x, spec) for x in (k, v)]
    out = run(*args, jnp.asarray(SEGMENTS))
    np.testing.assert_allclose(np.asarray(out), reference["packed"], atol=2e-5)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
def test_auto_lowers_to_the_splash_kernel_for_a_tpu_mesh_from_this_cpu_host():
    """`nemojax compile --topology v5p-...` traces on a CPU host: `auto` must follow the mesh's
    devices (TPU), not the host's default backend, and emit the Pallas kernel, not [T, T] scores."""
    from nemojax.parallel.aot import topology_devices

    devices, _ = topology_devices("v5p:2x2x1")
    mesh = jax.sharding.Mesh(np.array(devices).reshape(2, 1, 1, 2), ("data", "pipeline", "fsdp", "tensor"))
    seq = 384  # lowered only; distinct from the kernel's 128-wide tiles
    shapes = [jax.ShapeDtypeStruct((B, seq, n, D), jnp.bfloat16,
                                   sharding=NamedSharding(mesh, PartitionSpec("data", None, "tensor")))
              for n in (H, KV, KV)]

    def run(q, k, v, seg):
        with use_rules(mesh, RULES):
            return self_attention(q, k, v, backend="auto", segment_ids=seg)

    hlo = jax.jit(run).lower(*shapes, jax.ShapeDtypeStruct((B, seq), jnp.int32)).as_text()
    assert "tpu_custom_call" in hlo and "splash" in hlo
    assert f"{seq}x{seq}x" not in hlo  # no materialised score matrix or mask
    # the kernel runs on each device's block (shard_map): one row, H / 2 query heads
    calls = [line for line in hlo.splitlines() if "tpu_custom_call" in line]
    assert calls and all(f"tensor<{H // 2}x{seq}x{D}xbf16>" in c and f"tensor<{H}x{seq}" not in c for c in calls)
