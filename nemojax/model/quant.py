"""Weight-only quantization of the block projections (model.quant in the config).

A quantized weight W ([in dims..., out dims...], one per layer, stacked like the float weights)
is stored as two arrays of the SAME RANK:

    values  W's shape, int8 | float8_e4m3fn; NF4: uint8 holding two 4-bit codes (elements 2j and
            2j+1 of the last dim in the low and high nibble), so the last dim is halved
    scale   float32; along each output dim W's size, along the input dims W's input shape cut
            into blocks of `block_size` elements of the flattened input (row-major): size 1 on
            every input dim for one scale per output channel (block_size 0)

    W ~= decode(values) * scale   (the scale broadcast over its block)

    int8  values = round(W / s) in [-127, 127],         s = absmax / 127
    fp8   values = float8_e4m3fn(W / s) in [-448, 448], s = absmax / 448 (e4m3's largest finite)
    nf4   values = index of the nearest of QLoRA's 16 NormalFloat levels to W / s, s = absmax

with absmax over the block (a block of zeros gets s = 1). Keeping the rank means any transpose
or concatenation of the values applies unchanged to the scale (the engine's per-layer layouts
do both), and the scale's logical axes shard like the weight's output dims.

Compute: `einsum(spec, x, w)` takes a plain array or a `QArray`. With one scale per output
channel the values (cast to the compute dtype, exact for int8 and e4m3 in bf16) go into the
matmul and its result is multiplied by the scale in fp32: y = (x @ v) * s, exact since s is
constant along the contraction; the conversion is elementwise, which XLA fuses into the dot's
operand on GPU and TPU. With blocks
the weight is dequantized first (`dequantize`), one layer at a time.

Activations and the KV cache are not quantized; embeddings, the LM head and the norms keep
`param_dtype` (vLLM and TensorRT-LLM leave lm_head unquantized too).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

QUANT_TARGETS = ("q", "k", "v", "o", "up", "down")
SCALE_SUFFIX = "_qscale"
# Input dims (leading) of each target's per-layer weight [in dims..., out dims...].
N_IN = {"q": 1, "k": 1, "v": 1, "o": 2, "up": 1, "down": 1}
SCALE_IN_AXIS = "quant_block"  # logical name of a scale's input dims (replicated: scales are small)

FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0
# QLoRA's NormalFloat4 levels (Dettmers et al. 2023, appendix E; bitsandbytes' table).
NF4_LEVELS = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                       -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                       0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                       0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)
VALUE_DTYPES = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn, "nf4": jnp.uint8}
_QMAX = {"int8": INT8_MAX, "fp8": FP8_MAX, "nf4": 1.0}


class QArray(NamedTuple):
    """A quantized weight inside a traced computation: values and same-rank fp32 scale."""

    values: jax.Array
    scale: jax.Array


def scale_name(target: str) -> str:
    return target + SCALE_SUFFIX


def scale_shape(shape: tuple[int, ...], n_in: int, block_size: int) -> tuple[int, ...]:
    """The scale's shape for a weight of `shape` with `n_in` input dims (see the module docstring).

    A block of `block_size` elements of the flattened input spans the last input dim's elements
    (block <= that dim: it must divide it) or whole rows of it (block a multiple of it), and so
    on leftwards. block_size 0 = the whole input.
    """
    ins, outs = shape[:n_in], shape[n_in:]
    left = int(np.prod(ins)) if block_size == 0 else block_size
    cut = []
    for d in reversed(ins):
        if left >= d:
            if left % d:
                raise ValueError(f"block size {block_size} does not tile input dims {ins}")
            cut.append(1)
            left //= d
        else:
            if d % left:
                raise ValueError(f"block size {block_size} does not divide input dim {d} of {ins}")
            cut.append(d // left)
            left = 1
    if left != 1:
        raise ValueError(f"block size {block_size} exceeds the input size {int(np.prod(ins))} of {ins}")
    return (*reversed(cut), *outs)


def _blocked(x: jax.Array, blocks: tuple[int, ...]) -> jax.Array:
    """x reshaped so that every dim d of size n becomes (blocks[d], n // blocks[d])."""
    shape = []
    for n, b in zip(x.shape, blocks):
        shape += [b, n // b]
    return x.reshape(shape)


def _reduce_axes(ndim: int) -> tuple[int, ...]:
    return tuple(range(1, 2 * ndim, 2))  # the within-block axes of `_blocked`


def quantize(w: jax.Array, mode: str, n_in: int, block_size: int = 0, *, layered: bool = False) -> QArray:
    """Quantize weight `w` ([layers,] in dims..., out dims...) to `mode` (int8 | fp8 | nf4).

    layered: `w` has a leading layers axis, which gets its own scales (size kept in the scale).
    Computed in float32 whatever `w`'s dtype.
    """
    if mode not in VALUE_DTYPES:
        raise ValueError(f"quantization mode must be one of {sorted(VALUE_DTYPES)}, got {mode!r}")
    w32 = jnp.asarray(w, jnp.float32)
    lead = (w.shape[0],) if layered else ()
    blocks = (*lead, *scale_shape(tuple(w.shape[len(lead):]), n_in, block_size))
    absmax = jnp.max(jnp.abs(_blocked(w32, blocks)), axis=_reduce_axes(w.ndim))
    scale = jnp.where(absmax > 0, absmax / _QMAX[mode], 1.0).astype(jnp.float32)
    x = (_blocked(w32, blocks) / _blocked(scale, blocks)).reshape(w.shape)
    if mode == "int8":
        values = jnp.clip(jnp.round(x), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    elif mode == "fp8":
        values = jnp.clip(x, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)
    else:
        mids = jnp.asarray((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2)
        codes = jnp.searchsorted(mids, jnp.clip(x, -1.0, 1.0)).astype(jnp.uint8)
        values = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return QArray(values, scale)

def decode_values(values: jax.Array) -> jax.Array:
    """The stored numbers as float32 (NF4: codes unpacked and looked up in the level table)."""
    if values.dtype == jnp.uint8:
        codes = jnp.stack([values & 15, values >> 4], axis=-1).reshape(*values.shape[:-1], -1)
        return jnp.asarray(NF4_LEVELS)[codes.astype(jnp.int32)]
    return values.astype(jnp.float32)


def dequantize(w: QArray, dtype: Any = jnp.float32) -> jax.Array:
    """decode(values) * scale, in `dtype`."""
    v = decode_values(w.values)
    out = _blocked(v, w.scale.shape) * _blocked(w.scale, w.scale.shape)
    return out.reshape(v.shape).astype(dtype)


def per_channel(w: QArray, contracted: tuple[int, ...]) -> bool:
    """True when the scale is constant along every contracted dim (one scale per output)."""
    return all(w.scale.shape[a] == 1 for a in contracted)


def einsum(spec: str, x: jax.Array, w: jax.Array | QArray) -> jax.Array:
    """`jnp.einsum(spec, x, w)` for a plain or quantized weight, in x's dtype (the compute dtype).

    Quantized, one scale per output channel: (x @ values) * scale; blocked: x @ dequantize(w).
    """
    out_dtype = x.dtype
    if not isinstance(w, QArray):
        return jnp.einsum(spec, x, w.astype(out_dtype))
    ins, out = spec.replace(" ", "").split("->")
    wl = ins.split(",")[1]
    contracted = tuple(i for i, c in enumerate(wl) if c not in out)
    if not per_channel(w, contracted):
        return jnp.einsum(spec, x, dequantize(w, out_dtype))
    values = decode_values(w.values).astype(out_dtype) if w.values.dtype == jnp.uint8 else w.values.astype(out_dtype)
    y = jnp.einsum(spec, x, values)  # in the compute dtype, like an unquantized projection
    kept = "".join(c for c in wl if c in out)
    s = w.scale.reshape([w.scale.shape[i] for i, c in enumerate(wl) if c in out])
    return jnp.einsum(f"{out},{kept}->{out}", y.astype(jnp.float32), s).astype(out_dtype)


def gather(p: dict[str, jax.Array]) -> dict[str, Any]:
    """A layer's params with each quantized target's values and scale joined into a `QArray`."""
    out = {k: v for k, v in p.items() if not k.endswith(SCALE_SUFFIX)}
    for k, scale in p.items():
        if k.endswith(SCALE_SUFFIX):
            t = k[:-len(SCALE_SUFFIX)]
            out[t] = QArray(p[t], scale)
    return out


def compute_weights(p: dict[str, jax.Array], dtype: Any) -> dict[str, Any]:
    """`gather(p)` with the plain arrays cast to the compute dtype (QArrays stay as stored)."""
    return {k: (v if isinstance(v, QArray) else v.astype(dtype)) for k, v in gather(p).items()}

def dequantize_blocks(blocks: dict[str, Any], dtype: Any) -> dict[str, Any]:
    """The stacked block params with every quantized target dequantized to `dtype`, scales dropped."""
    out = {k: v for k, v in blocks.items() if not k.endswith(SCALE_SUFFIX)}
    for t in QUANT_TARGETS:
        if scale_name(t) in blocks:
            out[t] = dequantize(QArray(blocks[t], blocks[scale_name(t)]), dtype)
    return out
