"""Splash attention (JAX's Pallas TPU kernel) for causal, packed, grouped-query self-attention.

The kernel walks [block_q, block_kv] tiles with an online softmax, never holding the
[seq, seq] score matrix, and skips the tiles a static causal mask rules out. Packed documents
are its segment ids (a query sees keys of its own id only), GQA is native (query head h reads
key/value head h // (heads / kv_heads)). It does not scale the queries: that is done here.

Sharding. A Pallas call is opaque to the SPMD partitioner, so under a sharded train step
(`nemojax.model.axes.use_rules` active) the kernel runs inside a `shard_map` over the batch and
heads axes that the rules give those dims (sequence unsharded), each device on its own
rows and heads. Axes already manual in the surrounding context (a pipeline's shard_map) are
left out; a `vmap` with `spmd_axis_name` (the circular pipeline) adds its axis itself.

Shapes. Tiles are multiples of 128 tokens: a sequence that is not is padded at its end
(causality keeps real queries from ever seeing the padding) and cut back afterwards.

On a CPU (tests) the same kernel runs in Pallas interpret mode.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import Mesh, PartitionSpec

from nemojax.model.axes import Rules, active_rules, logical_to_spec, mesh_shape, spec_axes

LANES = 128  # the kernel's tile granularity along the sequence
BLOCKS = (512, 256, 128)  # tile sizes tried, largest first (MaxText's v5p defaults are 512)


def _padded_length(seq: int) -> int:
    return -(-seq // LANES) * LANES


def block_size(padded_seq: int) -> int:
    """The largest tile size in BLOCKS that divides the (padded) sequence."""
    return next(b for b in BLOCKS if padded_seq % b == 0)


@functools.lru_cache(maxsize=64)
def _kernel(heads: int, seq: int, interpret: bool) -> splash.splash_attention_kernel.SplashAttentionKernel:
    """A causal multi-head splash kernel for `heads` query heads over `seq` (padded) tokens."""
    b = block_size(seq)
    mask = splash.MultiHeadMask([splash.CausalMask((seq, seq)) for _ in range(heads)])
    sizes = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                              block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    # The kernel holds its block-mask tables as arrays: make them concrete constants even when
    # called while tracing, so the cached kernel never carries one trace's tracers into another.
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                      interpret=interpret)


def _local(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None, *,
           interpret: bool) -> jax.Array:
    """The kernel on one device's arrays: q [b, T, h, d], k/v [b, T, kv, d] -> [b, T, h, d]."""
    b, t, h, d = q.shape
    tp = _padded_length(t)
    pad = ((0, 0), (0, tp - t), (0, 0), (0, 0))
    q = (q.astype(jnp.float32) * d ** -0.5).astype(q.dtype)
    qt, kt, vt = (jnp.pad(x, pad).transpose(0, 2, 1, 3) for x in (q, k, v))  # [b, heads, T, d]
    kernel = _kernel(h, tp, interpret)
    if segment_ids is None:
        out = jax.vmap(kernel)(qt, kt, vt)
    else:
        seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, tp - t)))  # any id: cut away below
        out = jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=splash.SegmentIds(q=s1, kv=s1)))(
            qt, kt, vt, seg)
    return out.transpose(0, 2, 1, 3)[:, :t]


def _dim_spec(name: str, size: int, rules: Rules, mesh: Mesh, skip: set[str]) -> tuple[str, ...]:
    """Mesh axes for one dim named `name`: the rules' axes, minus manual ones, if they divide it."""
    spec = logical_to_spec((name,), rules, mesh)
    axes = tuple(a for a in spec_axes(spec[0] if len(spec) else None) if a not in skip)
    sizes = mesh_shape(mesh)
    cuts = 1
    for a in axes:
        cuts *= sizes[a]
    return axes if axes and size % cuts == 0 else ()


def _entry(axes: tuple[str, ...]) -> str | tuple[str, ...] | None:
    return None if not axes else axes[0] if len(axes) == 1 else axes


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None, *,
                     interpret: bool = False) -> jax.Array:
    """Causal GQA self-attention with segment ids by the splash kernel (sharded when rules are active)."""
    active = active_rules()
    local = functools.partial(_local, interpret=interpret)
    if active is None or all(n == 1 for n in mesh_shape(active[0]).values()):
        return local(q, k, v, segment_ids)
    mesh, rules = active
    context = jax.sharding.get_abstract_mesh()
    manual = set(context.manual_axes) if not context.empty else set()
    batch = _dim_spec("batch", q.shape[0], rules, mesh, manual)
    heads = _dim_spec("heads", q.shape[2], rules, mesh, manual | set(batch))
    kv_heads = _dim_spec("kv_heads", k.shape[2], rules, mesh, manual | set(batch))
    if kv_heads != heads:
        # A device's query heads must find their key/value heads locally: when the two are
        # split differently (KV heads replicated under wide tensor parallelism), give every
        # query head its own copy of its KV head.
        group = q.shape[2] // k.shape[2]
        k, v = (jnp.repeat(x, group, axis=2) for x in (k, v))
    qspec = PartitionSpec(_entry(batch), None, _entry(heads), None)
    segspec = PartitionSpec(_entry(batch), None)
    target = context if manual else mesh
    if segment_ids is None:
        return jax.shard_map(lambda a, b, c: local(a, b, c, None), mesh=target,
                             in_specs=(qspec, qspec, qspec), out_specs=qspec, check_vma=False)(q, k, v)
    return jax.shard_map(local, mesh=target, in_specs=(qspec, qspec, qspec, segspec), out_specs=qspec,
                         check_vma=False)(q, k, v, segment_ids)
