"""cuDNN flash attention on NVIDIA GPUs, with packed documents given to cuDNN as ragged sequences.

`jax.nn.dot_product_attention(implementation="cudnn")` takes a causal flag or a dense boolean
mask. A packed row needs a mask (documents must not see each other), and a dense
[batch, 1, seq, seq] mask becomes an additive bias that the kernel reads in full: quadratic
memory and HBM traffic, not the flash path. cuDNN's own answer to packing is the ragged
("THD") layout: every document is a sequence of its own, described by a length and an offset
into the packed row, and the mask is PADDING_CAUSAL (causal inside each sequence, nothing
across). JAX exposes that layout only on the function behind the public API,
`jax._src.cudnn.fused_attention_stablehlo.dot_product_attention` (`q_seqlen`/`q_offsets`); the
public function calls the same one without offsets. Packed layouts need Hopper (sm90) or newer.

Here a "sequence" is a maximal run of equal segment ids in a row, so padding (segment 0) is a
run too and every token has a well-defined output, as in the `xla` reference. (The reference
lets a token see any earlier key with its segment id; the two agree whenever each id forms
one contiguous run, which is how nemojax packs: 1, 2, 3, ... then 0s.)

cuDNN takes a static number of runs per row (`model.attention_max_segments`): every row is
described by that many (length, offset) slots, -1 where unused. A batch with a row holding
more runs goes through the dense-mask kernel instead (`lax.cond`, so the cost is paid only
then; under `vmap` a cond becomes a select and both run, so keep the cap above what the data
packs per row). The cap costs launch overhead: cuDNN schedules every slot as a sequence of up
to `seq` tokens, so a cap far above the real document count wastes thread blocks.

Under `vmap` (the circular pipeline runs the blocks in one) the call is made safe by folding
the vmapped dim into the batch (`_fold_vmap`): JAX's own batching rule for cuDNN attention does
not handle the ragged lengths or a broadcast mask.

On the CPU none of this can run (JAX refuses cuDNN without a GPU); tests/test_attention_cudnn.py
checks the arguments built here against JAX's own argument checks and against an independent
emulation of cuDNN's documented ragged semantics.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap

try:  # private, pinned by jax's version: the only route to cuDNN's ragged (packed) layout
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_sdpa
except ImportError as exc:  # pragma: no cover - depends on the installed jax
    cudnn_sdpa = None
    _IMPORT_ERROR: Exception | None = exc
else:
    _IMPORT_ERROR = None

CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


class RaggedRuns(NamedTuple):
    """Per row: lengths [B, M] and start offsets [B, M + 1] of its runs (-1 past the last), and
    the run count [B]. `fits` says every row has at most M runs."""

    seqlen: jax.Array
    offsets: jax.Array
    runs: jax.Array

    @property
    def fits(self) -> jax.Array:
        return jnp.all(self.runs <= self.seqlen.shape[1])


def segment_runs(segment_ids: jax.Array, max_runs: int) -> RaggedRuns:
    """The ragged description of packed rows: each maximal run of equal ids is one sequence.

    For segment ids [[1, 1, 1, 2, 2, 0, 0]] and max_runs 4: seqlen [[3, 2, 2, -1]], offsets
    [[0, 3, 5, -1, -1]], runs [3]. Runs past `max_runs` are left out (and `fits` is False).
    """
    if max_runs < 2:
        raise ValueError(f"max_runs must be >= 2 (cuDNN's packed layout), got {max_runs}")
    seg = segment_ids.astype(jnp.int32)
    b, t = seg.shape
    starts = jnp.concatenate([jnp.ones((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    run = jnp.cumsum(starts, axis=1, dtype=jnp.int32) - 1  # run index of every token
    runs = run[:, -1] + 1
    rows = jnp.arange(b)[:, None]
    lengths = jnp.zeros((b, max_runs), jnp.int32).at[rows, run].add(1, mode="drop")
    seqlen = jnp.where(jnp.arange(max_runs)[None, :] < runs[:, None], lengths, -1)
    # A run's offset is the index of its first token; slots past the last run (and slot
    # max_runs itself) stay -1, as the packed API expects.
    slot = jnp.where(starts & (run < max_runs), run, max_runs + 1)  # max_runs + 1 is dropped
    offsets = jnp.full((b, max_runs + 1), -1, jnp.int32).at[rows, slot].set(
        jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)), mode="drop")
    return RaggedRuns(seqlen, offsets, runs)


def _dense_mask(segment_ids: jax.Array) -> jax.Array:
    """Boolean [B, 1, T, T]: causal and same segment (the fallback for rows over the cap)."""
    t = segment_ids.shape[1]
    causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]
    return (causal[None] & (segment_ids[:, :, None] == segment_ids[:, None, :]))[:, None]


def _cudnn_call(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None,
                max_segments: int) -> jax.Array:
    """The cuDNN calls themselves: plain causal, ragged (packed), or dense mask over the cap."""
    scale = q.shape[-1] ** -0.5
    mt = cudnn_sdpa.MaskType
    if segment_ids is None:
        return cudnn_sdpa.dot_product_attention(q, k, v, scale=scale, mask_type=mt.CAUSAL,
                                                qkv_layout="BTNH")
    ragged = segment_runs(segment_ids, max_segments)

    def packed(q, k, v, ragged, seg):
        del seg
        return cudnn_sdpa.dot_product_attention(
            q, k, v, None, None, ragged.seqlen, ragged.seqlen, ragged.offsets, ragged.offsets,
            scale=scale, mask_type=mt.PADDING_CAUSAL, qkv_layout="BTNH")

    def dense(q, k, v, ragged, seg):
        del ragged
        return cudnn_sdpa.dot_product_attention(q, k, v, None, _dense_mask(seg), scale=scale,
                                                mask_type=mt.NO_MASK, qkv_layout="BTNH")

    return jax.lax.cond(ragged.fits, packed, dense, q, k, v, ragged, segment_ids)


def _fold_vmap(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` of arrays that all lead with the batch dim, made safe under `vmap`: a vmapped dim is
    folded into the batch dim and `fn` runs once on the merged batch.

    Why: JAX's batching rule for the cuDNN primitive reshapes the sequence lengths to [batch]
    and a bias to [batch, heads, ...], which breaks for the ragged [batch, runs] lengths and for
    a head-broadcast mask, and the circular pipeline runs every block under `vmap`."""
    wrapped = custom_vmap(fn)

    @wrapped.def_vmap
    def rule(axis_size: int, in_batched: Any, *args: jax.Array) -> tuple[Any, Any]:
        args = tuple(a if batched else jnp.broadcast_to(a, (axis_size, *a.shape))
                     for a, batched in zip(args, in_batched))
        out = wrapped(*(a.reshape(-1, *a.shape[2:]) for a in args))
        return (jax.tree.map(lambda o: o.reshape(axis_size, -1, *o.shape[1:]), out),
                jax.tree.map(lambda _: True, out))

    return wrapped


@functools.lru_cache(maxsize=None)
def _differentiable(max_segments: int, segmented: bool) -> Callable[..., jax.Array]:
    """attention(q, k, v[, segment_ids]) with a custom VJP whose forward and backward are each
    `_fold_vmap`-ed (a custom_vmap function cannot itself be differentiated). The backward
    takes cuDNN's VJP of a recomputed forward: one extra forward kernel per backward."""

    def forward(q, k, v, *seg):
        return _cudnn_call(q, k, v, seg[0] if segmented else None, max_segments)

    def backward(q, k, v, *rest):
        *seg, g = rest
        _, vjp = jax.vjp(lambda q, k, v: forward(q, k, v, *seg), q, k, v)
        return vjp(g)

    fwd_safe, bwd_safe = _fold_vmap(forward), _fold_vmap(backward)

    @jax.custom_vjp
    def attention(q, k, v, *seg):
        return fwd_safe(q, k, v, *seg)

    def attention_fwd(q, k, v, *seg):
        return fwd_safe(q, k, v, *seg), (q, k, v, *seg)

    def attention_bwd(res, g):
        return (*bwd_safe(*res, g), *(None,) * (len(res) - 3))  # no cotangent for segment ids

    attention.defvjp(attention_fwd, attention_bwd)
    return attention


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None, *,
                    max_segments: int) -> jax.Array:
    """Causal GQA self-attention by cuDNN's flash kernel. q [B, T, H, d]; k, v [B, T, KV, d]."""
    if cudnn_sdpa is None:
        raise RuntimeError(f"model.attention_backend=cudnn: this jax has no cuDNN attention module "
                           f"({_IMPORT_ERROR}); use attention_backend=xla")
    if q.dtype not in CUDNN_DTYPES:
        raise ValueError(f"model.attention_backend=cudnn runs in bfloat16/float16, but attention "
                         f"inputs are {q.dtype}: set model.compute_dtype=bfloat16 or pick "
                         f"attention_backend=xla")
    if segment_ids is None:
        return _differentiable(max_segments, False)(q, k, v)
    return _differentiable(max_segments, True)(q, k, v, segment_ids.astype(jnp.int32))
