"""Gradients of a pipelined step with the 1F1B schedule: forward and backward written per chunk.

Autodiff of a pipelined forward runs every backward after every forward (GPipe order) and keeps
every microbatch's chunk inputs alive. Here the step's own loop runs the tick table of
nemojax.parallel.pipeline_table: each tick a stage runs at most one chunk forward (F) and one
chunk backward (B, `jax.vjp` of the chunk recomputed from its stashed input), so a stage holds
the inputs of at most (V-1)*G + 2*(P-1) + 1 units, whatever the number of microbatches, and all
the microbatches of the optimizer step (every accumulation slice) go through one pipeline flush.

Runs inside the step's manual region (nemojax.parallel.data_parallel), manual over `pipeline`
and the data-parallel axes: each device is one stage, `lax.cond` skips the F / B / loss a stage
has no unit for (its bubble costs no compute), activations and cotangents move to the
neighbouring stages with `ppermute`. Tensor and FSDP sharding stay with the partitioner.

The objective stays a black box `loss_sums(graphdef, params, microbatch)` that calls
`hidden_states` once; it is split around that call (nemojax.parallel.pipeline.hidden_states_hook):
* inputs: the (input_ids, positions, segment_ids) it passes to `hidden_states` (captured);
* pre: the embedding of those ids, on stage 0 before virtual stage 0;
* post: the rest of the objective from the final hidden states (final norm, heads, loss), on
  stage P-1 after virtual stage V-1; its vjp gives the cotangent the backward starts from.

Compute per unit: F once, then B = the chunk's forward again + its backward, i.e. the cost of
full rematerialisation (with one layer per chunk nothing is recomputed twice; with more, the
model's remat policy applies per layer inside B). Gradients are accumulated per stage in fp32
in the run layout and moved back to the storage layout once per step (the reverse of the weight
relayout). Returned sums are this device's: the caller reduces them (data_parallel).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.extend.core import Literal

from nemojax.config import ConfigError
from nemojax.model.axes import constrain
from nemojax.model.layers import layernorm1p, rope_tables
from nemojax.model.transformer import ACT_AXES, DTYPES, REMAT_POLICIES, block, embed_tokens
from nemojax.parallel.pipeline import (PIPELINE_AXIS, Schedule, hidden_states_hook, relayout_local,
                                       split_microbatches)
from nemojax.parallel.pipeline_table import COL, build

LossSums = Callable[[Any, Any, dict], tuple[jax.Array, jax.Array, dict[str, jax.Array]]]


def _path_key(path: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path
                 if str(getattr(k, "key", getattr(k, "name", k))) != "value")


def _microbatches(batch: dict[str, jax.Array], M: int) -> dict[str, jax.Array]:
    """[A, b, ...] -> [A*M, b/M, ...]: slice a's strided microbatch m at a*M + m."""
    def one(x: jax.Array) -> jax.Array:
        parts = jax.vmap(lambda s: split_microbatches(s, M))(x)  # [A, M, b/M, ...]
        return parts.reshape(x.shape[0] * M, *parts.shape[2:])
    return jax.tree.map(one, batch)


def _captured_inputs(loss_sums: LossSums, graphdef: Any, params: Any, mb: dict) -> tuple[Any, ...]:
    """(input_ids, positions, segment_ids) the objective passes to `hidden_states` for `mb`."""
    seen: list[tuple[Any, ...]] = []

    def capture(model: Any, ids: jax.Array, positions: Any, segment_ids: Any) -> jax.Array:
        seen.append((ids, positions, segment_ids))
        return jnp.zeros((*ids.shape, model.cfg.hidden_size), DTYPES[model.cfg.compute_dtype])

    with hidden_states_hook(capture):
        loss_sums(graphdef, params, mb)
    if len(seen) != 1:
        raise ConfigError(f"the pipelined step needs an objective that calls hidden_states exactly once per "
                          f"microbatch; this one called it {len(seen)} times")
    ids, positions, segment_ids = seen[0]
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
    return ids, positions, segment_ids


def _used_inputs(fn: Callable, *args: Any) -> list[bool]:
    """Which flattened leaves of `args` the traced `fn` actually reads."""
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    used = {v for eqn in jaxpr.eqns for v in eqn.invars if not isinstance(v, Literal)}
    used |= {v for v in jaxpr.outvars if not isinstance(v, Literal)}
    return [v in used for v in jaxpr.invars]


def pipeline_gradient_sums(graphdef: Any, loss_sums: LossSums, params: Any, batch: dict[str, jax.Array],
                           schedule: Schedule, trainable: Any = None) -> tuple[Any, dict[str, jax.Array]]:
    """(fp32 gradient sums of the trainable params, {"numerator", "denominator", extras}) of this
    stage's share of the step, by the 1F1B tick table (module docstring). Call inside a region
    manual over `pipeline`: block params arrive as this stage's [L/P, ...] storage slice."""
    P, V, M = schedule.P, schedule.V, schedule.M
    stage = jax.lax.axis_index(PIPELINE_AXIS)
    model = nnx.merge(graphdef, params)
    cfg = model.cfg
    cdt = DTYPES[cfg.compute_dtype]
    mbs = _microbatches(batch, M)
    N = next(iter(jax.tree.leaves(mbs))).shape[0]
    tick_table = build(P, V, N)
    table = jnp.asarray(tick_table.table)

    # What is trained: block arrays by name, the embedding, and the other (post) leaves by path.
    train_p = params if trainable is None else nnx.split_state(params, trainable, ...)[0]
    train_flat, train_def = jax.tree_util.tree_flatten_with_path(train_p)
    train_keys = [_path_key(p) for p, _ in train_flat]
    storage = model.blocks.arrays()  # name -> [L/P, ...] (this stage's storage slice)
    block_train = [k[1] for k in train_keys if k[0] == "blocks"]
    Lp = next(iter(storage.values())).shape[0]
    Lc = Lp // V

    def run_layout(a: jax.Array) -> jax.Array:
        return relayout_local(a.astype(cdt) if a.ndim >= 3 else a, P, V)

    weights = {k: run_layout(a) for k, a in storage.items()}  # name -> [V, Lc, ...]
    frozen_w = {k: a for k, a in weights.items() if k not in block_train}
    train_w = {k: a for k, a in weights.items() if k in block_train}

    all_flat, all_def = jax.tree_util.tree_flatten_with_path(params)
    all_keys = [_path_key(p) for p, _ in all_flat]
    post_keys = [k for k in train_keys if k[0] != "blocks"]

    def with_leaves(repl: dict[tuple[str, ...], jax.Array]) -> Any:
        return jax.tree.unflatten(all_def, [repl.get(k, v) for k, (_, v) in zip(all_keys, all_flat)])

    def inputs(mb: dict) -> tuple[Any, ...]:
        return _captured_inputs(loss_sums, graphdef, params, mb)

    policy = REMAT_POLICIES[cfg.remat_policy]

    def chunk(w: dict[str, jax.Array], x: jax.Array, pos: jax.Array, seg: Any) -> jax.Array:
        """Lc layers of one virtual stage on one microbatch (w: name -> [Lc, ...])."""
        cos, sin = rope_tables(pos, cfg.rotary_dim, cfg.rope_base)
        q_index = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])

        def body(h, wl):
            y, _ = block(cfg, wl, h, cos=cos, sin=sin, q_index=q_index, segment_ids=seg)
            return constrain(y, ACT_AXES), None

        if Lc > 1 and cfg.remat_policy != "none":  # bounds B's transient activations to one layer
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        return jax.lax.scan(body, x, w)[0]

    def at_rep(w: dict[str, jax.Array], r: jax.Array) -> dict[str, jax.Array]:
        return {k: jax.lax.dynamic_index_in_dim(a, r, 0, keepdims=False) for k, a in w.items()}

    def mb_at(n: jax.Array) -> dict:
        return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, n, 0, keepdims=False), mbs)

    # The objective after hidden_states, as a function of the trained post leaves and h.
    def post(pp: dict[tuple[str, ...], jax.Array], h: jax.Array, mb: dict):
        def inject(mdl: Any, ids: jax.Array, positions: Any, segment_ids: Any) -> jax.Array:
            return layernorm1p(h, mdl.final_norm_scale[...], mdl.final_norm_bias[...], mdl.cfg.norm_eps)

        with hidden_states_hook(inject):
            num, den, extras = loss_sums(graphdef, with_leaves(pp), mb)
        return num, (den, extras)

    post_leaves = {k: v for k, (_, v) in zip(all_keys, all_flat) if k in post_keys}
    x_shape = inputs(mb_at(jnp.int32(0)))[0].shape + (cfg.hidden_size,)
    probe_h = jnp.zeros(x_shape, cdt)
    used = _used_inputs(lambda pp, h: post(pp, h, mb_at(jnp.int32(0)))[0], post_leaves, probe_h)
    post_used = [k for k, u in zip(sorted(post_leaves), used[:len(post_leaves)]) if u]
    embed_trained = ("embed",) in train_keys
    _, (_, extras0) = jax.eval_shape(lambda pp, h: post(pp, h, mb_at(jnp.int32(0))), post_leaves, probe_h)

    def embed_like(g: jax.Array) -> jax.Array:
        """Laid out like the embedding parameter: conditional branches must agree on it."""
        return constrain(g, ("vocab", "embed"))

    def embed_zeros() -> jax.Array:
        return embed_like(jnp.zeros_like(model.embed[...]))

    def tick(carry, t):
        fwd_in, bwd_in, stash, acc_w, acc_embed, acc_post, sums = carry
        row = jax.lax.dynamic_index_in_dim(jax.lax.dynamic_index_in_dim(table, t, 0, False), stage, 0, False)
        f = {name: row[COL[name]] for name in COL}

        # F: this stage's forward unit (embedding first on virtual stage 0 of stage 0).
        def forward(_):
            ids, pos, seg = inputs(mb_at(f["f_mb"]))
            x = jax.lax.cond(f["f_first"] > 0, lambda: embed_tokens(cfg, model.embed[...], ids).astype(cdt),
                             lambda: fwd_in)
            return x, chunk(at_rep(weights, f["f_rep"]), x, pos, seg)

        x_f, y_f = jax.lax.cond(f["f_valid"] > 0, forward, lambda _: (fwd_in, fwd_in), None)
        stash = jax.lax.dynamic_update_index_in_dim(
            stash, jnp.where(f["f_valid"] > 0, x_f, jax.lax.dynamic_index_in_dim(stash, f["f_slot"], 0, False)),
            f["f_slot"], 0)

        # Loss on the last chunk's output: sums, post-leaf gradients, and B's starting cotangent.
        # The conditionals return this tick's contributions (in the weights' dtype); they are added
        # into the fp32 accumulators outside, in place: an accumulator passed through a
        # conditional is copied (measured: a second copy of every accumulator).
        def loss(_):
            mb = mb_at(f["f_mb"])
            pp = {k: post_leaves[k] for k in post_used}
            num, vjp, (den, extras) = jax.vjp(lambda q, h: post({**post_leaves, **q}, h, mb), pp, y_f,
                                              has_aux=True)
            g_pp, dh = vjp(jnp.ones_like(num))
            got = {"numerator": num, "denominator": den, **extras}
            return dh.astype(cdt), g_pp, {k: jnp.asarray(got[k], jnp.float32) for k in sums}

        def no_loss(_):
            return (jnp.zeros_like(y_f), {k: jnp.zeros_like(post_leaves[k]) for k in post_used},
                    {k: jnp.zeros((), jnp.float32) for k in sums})

        dh, g_post, got = jax.lax.cond((f["f_valid"] > 0) & (f["f_last"] > 0), loss, no_loss, None)
        acc_post = {k: acc_post[k] + g_post[k].astype(jnp.float32) for k in acc_post}
        sums = {k: sums[k] + got[k] for k in sums}

        # B: this stage's backward unit, recomputing the chunk from its stashed input.
        def backward(_):
            ids, pos, seg = inputs(mb_at(f["b_mb"]))
            x = jax.lax.dynamic_index_in_dim(stash, f["b_slot"], 0, False)
            dy = jnp.where(f["b_last"] > 0, dh, bwd_in)
            frozen_r = at_rep(frozen_w, f["b_rep"])
            _, vjp = jax.vjp(lambda w, xx: chunk({**frozen_r, **w}, xx, pos, seg), at_rep(train_w, f["b_rep"]), x)
            dw, dx = vjp(dy)
            if not embed_trained:
                return dw, dx, None
            _, evjp = jax.vjp(lambda e: embed_tokens(cfg, e, ids).astype(cdt), model.embed[...])
            de = jax.lax.cond(f["b_first"] > 0, lambda: embed_like(evjp(dx)[0]), embed_zeros)
            return dw, dx, de

        def idle(_):
            zeros = {k: jnp.zeros(a.shape[1:], a.dtype) for k, a in train_w.items()}
            return zeros, bwd_in, embed_zeros() if embed_trained else None

        dw, dx, de = jax.lax.cond(f["b_valid"] > 0, backward, idle, None)
        r = f["b_rep"]
        acc_w = {k: jax.lax.dynamic_update_index_in_dim(
            a, jax.lax.dynamic_index_in_dim(a, r, 0, False) + dw[k].astype(jnp.float32), r, 0)
            for k, a in acc_w.items()}
        if embed_trained:
            acc_embed = acc_embed + de.astype(jnp.float32)

        fwd_next = jax.lax.ppermute(y_f, PIPELINE_AXIS, [(i, (i + 1) % P) for i in range(P)])
        bwd_next = jax.lax.ppermute(dx, PIPELINE_AXIS, [(i, (i - 1) % P) for i in range(P)])
        return (fwd_next, bwd_next, stash, acc_w, acc_embed, acc_post, sums), None

    act = jnp.zeros(x_shape, cdt)
    init = (act, act, jnp.zeros((tick_table.slots, *x_shape), cdt),
            {k: jnp.zeros(a.shape, jnp.float32) for k, a in train_w.items()},
            jnp.zeros(model.embed[...].shape, jnp.float32) if embed_trained else jnp.zeros((), jnp.float32),
            {k: jnp.zeros(post_leaves[k].shape, jnp.float32) for k in post_used},
            {k: jnp.zeros((), jnp.float32) for k in ("numerator", "denominator", *extras0)})
    (_, _, _, acc_w, acc_embed, acc_post, sums), _ = jax.lax.scan(tick, init, jnp.arange(tick_table.ticks))

    # Back to the storage layout (the reverse of the weight relayout: once per step).
    def to_storage(name: str, g: jax.Array) -> jax.Array:
        shape = jax.ShapeDtypeStruct(storage[name].shape, jnp.float32)
        return jax.linear_transpose(lambda a: relayout_local(a, P, V), shape)(g)[0]

    grads = []
    for key, (_, leaf) in zip(train_keys, train_flat):
        g = jnp.zeros(leaf.shape, jnp.float32)  # a trained leaf the objective never reads
        if key[0] == "blocks":
            g = to_storage(key[1], acc_w[key[1]])
        if key == ("embed",):
            g = g + acc_embed
        if key in acc_post:
            g = g + acc_post[key]
        grads.append(g)
    return jax.tree.unflatten(train_def, grads), sums


__all__ = ["pipeline_gradient_sums"]
