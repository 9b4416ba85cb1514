"""The train step's own arithmetic on a model small enough to differentiate by hand.

`make_train_step` with a linear model and a masked squared-error objective, against numpy from
the formula: the step's mean loss is sum(numerators) / sum(denominators) over every microbatch;
its gradient is d(sum of numerators) / d(params) divided once by that denominator; `grad_norm`
is the norm BEFORE clipping; the update is the optimizer's on that gradient; extra metric sums
are divided by the same denominator; `learning_rate` is the schedule at the state's step. With a
`trainable` filter only those params move and carry optimizer state. An all-padding batch gives
a zero loss and gradient (the denominator is clamped to 1), never NaN.

Kills step.py mutants that divide per microbatch, drop the clamp, add the gradient in another
order or dtype, report the norm after clipping, lose an extra metric, swap trainable / frozen,
or start the accumulators at anything but zero (tests/test_stage_objectives.py checks the same
step with the real objectives; this file isolates the step from the model).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nemojax.train.step import create_train_state, make_eval_sums, make_train_step

ACCUM, MICRO, DIN, DOUT = 2, 3, 4, 2
LR, CLIP = 0.1, 0.5


class Linear(nnx.Module):
    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.w = nnx.Param(jnp.asarray(rng.normal(size=(DIN, DOUT)), jnp.float32))
        self.b = nnx.Param(jnp.asarray(rng.normal(size=(DOUT,)), jnp.float32))


def squared_error_sums(graphdef, params, mb):
    """(summed squared error over real rows and outputs, real rows, {summed |error|})."""
    m = nnx.merge(graphdef, params)
    err = (mb["x"] @ m.w[...] + m.b[...] - mb["y"]) * mb["mask"][:, None]
    return jnp.sum(err ** 2), jnp.sum(mb["mask"]), {"abs_error": jnp.sum(jnp.abs(err))}


def batch(seed: int, mask=None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    if mask is None:
        mask = np.array([[1, 1, 0], [1, 0, 1]], np.float32)  # unequal real rows per microbatch
    return {"x": rng.normal(size=(ACCUM, MICRO, DIN)).astype(np.float32),
            "y": rng.normal(size=(ACCUM, MICRO, DOUT)).astype(np.float32), "mask": np.asarray(mask, np.float32)}


def by_formula(w, b, data):
    """(loss, grad_w, grad_b, abs_error mean) in float64: one division by the whole batch's count."""
    x, y, m = (data[k].reshape(ACCUM * MICRO, -1).astype(np.float64) for k in ("x", "y", "mask"))
    err = (x @ w + b - y) * m
    den = max(m.sum(), 1.0)
    return (err ** 2).sum() / den, 2 * x.T @ err / den, 2 * err.sum(0) / den, np.abs(err).sum() / den


def run_step(trainable=None, data=None, step0: int = 3, objective=squared_error_sums):
    model = Linear()
    w0, b0 = np.asarray(model.w[...], np.float64), np.asarray(model.b[...], np.float64)
    schedule = optax.linear_schedule(1.0, 0.0, 10)
    # momentum: its first update equals plain SGD's, and its trace shows what has optimizer state
    tx = optax.chain(optax.clip_by_global_norm(CLIP), optax.sgd(LR, momentum=0.9))
    graphdef, state = create_train_state(model, tx, trainable)
    assert state.step.dtype == jnp.int32 and int(state.step) == 0
    state = state._replace(step=jnp.asarray(step0, jnp.int32))
    step = jax.jit(make_train_step(graphdef, tx, objective, trainable=trainable, lr_schedule=schedule))
    data = batch(1) if data is None else data
    new, metrics = step(state, {k: jnp.asarray(v) for k, v in data.items()})
    return w0, b0, data, state, new, {k: float(v) for k, v in metrics.items()}, graphdef


def test_one_step_is_the_formula_clipped_after_the_norm():
    w0, b0, data, _, new, m, _ = run_step()
    loss, gw, gb, abs_err = by_formula(w0, b0, data)
    norm = np.sqrt((gw ** 2).sum() + (gb ** 2).sum())
    assert norm > CLIP, "the batch must be one where clipping acts"
    assert m["loss"] == pytest.approx(loss, rel=1e-5)
    assert m["loss_denominator"] == data["mask"].sum()
    assert m["grad_norm"] == pytest.approx(norm, rel=1e-5)
    assert m["abs_error"] == pytest.approx(abs_err, rel=1e-5)
    assert m["learning_rate"] == pytest.approx(0.7) and m["finite"] == 1.0
    scale = CLIP / norm
    np.testing.assert_allclose(np.asarray(new.params["w"][...]), w0 - LR * scale * gw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(new.params["b"][...]), b0 - LR * scale * gb, rtol=1e-5, atol=1e-6)
    assert int(new.step) == 4


def test_only_the_trainable_params_move_and_carry_optimizer_state():
    only_w = nnx.PathContains("w")
    w0, b0, data, _, new, m, _ = run_step(trainable=only_w)
    _, gw, _, _ = by_formula(w0, b0, data)
    norm = np.sqrt((gw ** 2).sum())  # the norm over what trains
    assert m["grad_norm"] == pytest.approx(norm, rel=1e-5)
    np.testing.assert_array_equal(np.asarray(new.params["b"][...]), b0.astype(np.float32))
    np.testing.assert_allclose(np.asarray(new.params["w"][...]), w0 - LR * min(1.0, CLIP / norm) * gw,
                               rtol=1e-5, atol=1e-6)
    traces = [np.asarray(x) for x in jax.tree.leaves(new.opt_state)]
    assert [t.shape for t in traces] == [(DIN, DOUT)]  # no optimizer state for the frozen bias
    np.testing.assert_allclose(traces[0], min(1.0, CLIP / norm) * gw, rtol=1e-5, atol=1e-6)
    assert set(nnx.to_pure_dict(new.params)) == {"w", "b"}
    assert sorted(x.shape for x in jax.tree.leaves(run_step()[4].opt_state)) == [(DOUT,), (DIN, DOUT)]


def test_an_all_padding_batch_gives_zero_not_nan_and_a_nan_is_flagged():
    data = batch(2, mask=np.zeros((ACCUM, MICRO)))
    w0, b0, _, _, new, m, _ = run_step(data=data)
    assert (m["loss"], m["loss_denominator"], m["grad_norm"], m["finite"]) == (0.0, 0.0, 0.0, 1.0)
    np.testing.assert_array_equal(np.asarray(new.params["w"][...]), w0.astype(np.float32))
    bad = batch(3)
    bad["y"][0, 0, 0] = np.nan
    m = run_step(data=bad)[5]
    assert m["finite"] == 0.0

    def finite_loss_infinite_gradient(graphdef, params, mb):  # d sqrt(|x|) / dx at 0 is inf
        m = nnx.merge(graphdef, params)
        return jnp.sqrt(jnp.abs(m.w[0, 0] - jax.lax.stop_gradient(m.w[0, 0]))), jnp.float32(1.0), {}

    m = run_step(objective=finite_loss_infinite_gradient)[5]
    assert m["loss"] == 0.0 and not np.isfinite(m["grad_norm"]) and m["finite"] == 0.0


def test_one_real_row_divides_by_one():
    """A batch with a single real row (denominator 1): the loss and update are that row's own,
    undivided (a clamp above 1 would halve them)."""
    mask = np.zeros((ACCUM, MICRO), np.float32)
    mask[1, 2] = 1.0
    data = batch(5, mask=mask)
    w0, b0, _, _, new, m, _ = run_step(data=data)
    loss, gw, gb, _ = by_formula(w0, b0, data)
    assert m["loss_denominator"] == 1.0 and m["loss"] == pytest.approx(loss, rel=1e-5)
    norm = np.sqrt((gw ** 2).sum() + (gb ** 2).sum())
    assert m["grad_norm"] == pytest.approx(norm, rel=1e-5)
    np.testing.assert_allclose(np.asarray(new.params["w"][...]), w0 - LR * min(1.0, CLIP / norm) * gw,
                               rtol=1e-5, atol=1e-6)


def test_eval_sums_add_every_microbatch():
    model = Linear()
    graphdef, params = nnx.split(model, nnx.Param)
    data = batch(4)
    num, den = make_eval_sums(graphdef, squared_error_sums)(params, {k: jnp.asarray(v) for k, v in data.items()})
    loss, *_ = by_formula(np.asarray(model.w[...], np.float64), np.asarray(model.b[...], np.float64), data)
    assert float(den) == data["mask"].sum()
    assert float(num) / float(den) == pytest.approx(loss, rel=1e-5)
