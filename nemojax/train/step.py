"""The pretraining step as a pure function: (state, batch) -> (state, metrics).

A batch is a dict of int32 arrays [accum, micro_batch, seq]: `input_ids`, `targets`,
`positions`, `segment_ids`, and float `loss_mask`. The leading `accum` axis is scanned for
gradient accumulation; the loss is normalised by the total token count of the whole step, so
accumulated and unaccumulated steps give the same update.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nemojax.train.losses import lm_nll_sums


class TrainState(NamedTuple):
    step: jax.Array
    params: Any  # nnx.State of the model's Params
    opt_state: Any


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation) -> tuple[Any, TrainState]:
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))


def lm_loss_sums(graphdef: Any, params: Any, mb: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(sum of token NLL, token count) for one microbatch."""
    model = nnx.merge(graphdef, params)
    logits = model(mb["input_ids"], positions=mb["positions"], segment_ids=mb["segment_ids"])
    return lm_nll_sums(logits, mb["targets"], mb["loss_mask"])


def make_train_step(graphdef: Any, tx: optax.GradientTransformation,
                    loss_sums: Callable = lm_loss_sums) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Build the pure step; the caller jits it (with shardings and donated state)."""

    def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict]:
        def body(carry, mb):
            g_acc, nll_acc, cnt_acc = carry
            g, (nll, cnt) = _grads(state.params, mb)
            return (jax.tree.map(jnp.add, g_acc, g), nll_acc + nll, cnt_acc + cnt), None

        def _grads(params, mb):
            (_, aux), g = jax.value_and_grad(
                lambda p: (lambda s: (s[0], s))(loss_sums(graphdef, p, mb)), has_aux=True)(params)
            return g, aux

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        (g_sum, nll_sum, count), _ = jax.lax.scan(body, init, batch)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), g_sum, state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": nll_sum / denom, "tokens": count, "grad_norm": optax.global_norm(grads)}
        return TrainState(state.step + 1, params, opt_state), metrics

    return step
