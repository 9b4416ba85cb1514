"""Helpers shared by the equivalence and pipeline tests: a packed test batch and flat parameter dicts."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx


def flat_params(params: Any) -> dict[str, np.ndarray]:
    """{"blocks/q": array, ...} of an nnx.State (or gradient tree of the same shape)."""
    out = {}
    for path, v in nnx.to_flat_state(params):
        v = v.get_value() if hasattr(v, "get_value") else v
        out["/".join(str(k) for k in path)] = np.asarray(jax.device_get(v))
    return out


def packed_batch(vocab: int, batch: int, seq: int, *, seed: int, cut: int, masked_tail: int,
                 ) -> dict[str, np.ndarray]:
    """[accum=1, batch, seq]: two packed documents per row (split at `cut`, exercising segment
    masking and position resets) and the last `masked_tail` positions out of the loss."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (1, batch, seq + 1))
    seg = np.where(np.arange(seq) < cut, 1, 2).astype(np.int32)
    pos = np.where(np.arange(seq) < cut, np.arange(seq), np.arange(seq) - cut).astype(np.int32)
    mask = np.ones((1, batch, seq), np.float32)
    mask[:, :, seq - masked_tail:] = 0.0
    return dict(input_ids=ids[..., :-1].astype(np.int32), targets=ids[..., 1:].astype(np.int32),
                positions=np.broadcast_to(pos, (1, batch, seq)).copy(),
                segment_ids=np.broadcast_to(seg, (1, batch, seq)).copy(), loss_mask=mask)


def numpy_equal(a: Any, b: Any) -> bool:
    """Bitwise equality of two pytrees of arrays."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))
