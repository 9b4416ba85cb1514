"""The plain single-device training run that every parallel layout is compared against."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx

from nemojax.config import Config
from nemojax.model.transformer import NemotronLM
from nemojax.train.optim import make_optimizer
from nemojax.train.step import create_train_state, make_train_step


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


def single_device_run(cfg: Config, batch: dict[str, np.ndarray], steps: int,
                      ) -> tuple[list[float], dict[str, np.ndarray]]:
    """Losses and final params of `steps` plain jitted steps on device 0 (no nemojax.parallel)."""
    dev = jax.devices()[0]
    tx = make_optimizer(cfg.optimizer, cfg.steps)
    model = NemotronLM(cfg.model, rngs=nnx.Rngs(params=jax.random.key(cfg.seed)))
    graphdef, state = create_train_state(model, tx)
    state = jax.device_put(state, dev)
    step = jax.jit(make_train_step(graphdef, tx))
    batch = jax.device_put(batch, dev)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[1] < losses[0], "reference run must learn"
    return losses, flat_params(state.params)
