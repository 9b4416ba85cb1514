"""Interleaved pipeline parallelism over the mesh axis `pipeline`: layout, forward schedule, selection.

Layout. The model's `L` stacked layers are cut into `P * V` chunks of `Lc = L / (P * V)`
consecutive layers (`P` = size of the `pipeline` mesh axis, `V` = `pipeline.virtual_stages`).
Chunk `c` runs on pipeline stage `c % P` as that stage's virtual stage (repeat) `c // P`, as in
Megatron's interleaved schedule. Storage keeps the canonical layer order, split over `pipeline`
in contiguous blocks (checkpoints and the plain forward stay valid); `relayout_local` moves each
stage's chunks into its run layout, point to point.

Training (gradients) does not go through this module's forward: the train step runs the 1F1B
schedule of nemojax.parallel.pipeline_table / pipeline_grads (forward and backward per chunk, all
the step's microbatches in one flush, live activations bounded by the pipeline depth).

Forward-only passes (evaluation, reference log-probs) run the circular schedule below
("stacked stages + vmap + roll"). The state is one activation slot per stage, `[P, micro, seq,
hidden]`, sharded over `pipeline`. Each of the `T = V * M + P - 1` iterations
 1. feeds stage 0 from a circular buffer of the `M` microbatches (fresh embeddings for repeat 0,
    stage `P-1`'s earlier output for later repeats),
 2. runs every stage's current chunk at once: `vmap` over the stage dim, so under GSPMD each
    device runs only its own chunk (a `lax.scan` over its `Lc` layers),
 3. stores stage `P-1`'s output in the buffer and rotates the state by one stage
    (`jnp.roll` on the sharded dim, which XLA lowers to a collective-permute to the neighbour).
Stage `p` at iteration `t` works on microbatch `(t - p) mod M`, repeat `(t - p) // M`.
Recirculation needs `M >= P` when `V > 1`; the training schedule needs `M` to be a multiple of
`P` then, which the config validation asks for. Other mesh axes (data, fsdp, tensor) are left to
the rules: the sharding constraints name only `pipeline`.

Use. An objective asks for hidden states with `hidden_states(lm, input_ids, ...)` instead of
`lm.hidden(...)`; while a step is traced under `use_pipeline(schedule)` (the train-step builder
enters it whenever the resolved mesh has `pipeline > 1`) that runs the blocks through the
pipeline, otherwise it is exactly `lm.hidden`; under `hidden_states_hook` (the 1F1B step) it is
what the hook says. So any objective built on a NemotronLM (language modelling, a reward head,
preference losses) is pipelined without knowing, provided it calls `hidden_states` once.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as PS

from nemojax.config import Config, ConfigError, ModelConfig
from nemojax.model.axes import active_rules, logical_to_spec, mesh_shape, spec_axes
from nemojax.model.layers import layernorm1p, rope_tables
from nemojax.model.transformer import DTYPES, REMAT_POLICIES, block, embed_tokens

PIPELINE_AXIS = "pipeline"
_STAGE_WEIGHTS = "pipeline_stage_weights"
_U = PS.UNCONSTRAINED


def num_iterations(P: int, V: int, M: int) -> int:
    """Iterations of the circular forward schedule (each runs one chunk on every stage)."""
    return V * M + P - 1


def validate_pipeline(num_layers: int, P: int, V: int, M: int, batch: int | None = None,
                      batch_split: int = 1) -> None:
    """Raise ConfigError (naming the keys) if the layout cannot run this model and batch.

    batch: the per-slice micro batch; batch_split: the devices it is split over (data x fsdp),
    each of which cuts its rows into the M microbatches."""
    if num_layers % (P * V):
        divs = [v for v in range(1, num_layers + 1) if num_layers % (P * v) == 0]
        raise ConfigError(
            f"model.num_layers={num_layers} is not divisible by mesh.pipeline * pipeline.virtual_stages = "
            f"{P} * {V} = {P * V}: every virtual stage needs the same number of layers; with "
            f"pipeline={P} valid pipeline.virtual_stages are {divs or 'none (change mesh.pipeline)'}")
    if V > 1 and M % P:
        raise ConfigError(
            f"pipeline.microbatches={M} is not a multiple of mesh.pipeline={P} with pipeline.virtual_stages={V}: "
            f"the interleaved schedule runs microbatches through the virtual stages in groups of {P}; "
            f"set pipeline.microbatches to a multiple of {P}")
    if batch is not None and batch % (M * batch_split):
        raise ConfigError(
            f"the per-slice micro batch of {batch} sequences does not split into pipeline.microbatches={M} "
            f"on each of the {batch_split} devices the batch is split over; choose a micro batch that is "
            f"a multiple of {M * batch_split}")


def to_stages(stacked: dict[str, jax.Array], P: int, V: int) -> dict[str, jax.Array]:
    """[L, ...] stacked block params -> [V, P, Lc, ...]: layer (r*P + p)*Lc + l at [r, p, l]."""
    def f(a: jax.Array) -> jax.Array:
        L = a.shape[0]
        return a.reshape(V, P, L // (P * V), *a.shape[1:])
    return jax.tree.map(f, stacked)


def relayout_local(x: jax.Array, P: int, V: int) -> jax.Array:
    """Inside a region manual over `pipeline`: this stage's storage slice [L/P, ...] (chunks
    dV .. dV+V-1, canonical layer order) -> its run layout [V, Lc, ...] (chunks d, d+P, d+2P, ...).

    Letting XLA reshard the global reshape all-gathers the whole stack on every stage (P x the
    weights); here chunks move point to point: in round k (k = 1..P-1) every stage ppermutes to
    stage d+k the (at most ceil(V/P)) chunks destined there. Linear, so its transpose
    (`jax.linear_transpose`) moves gradients back the reverse way. With V = 1 it is a reshape.
    """
    Lc = x.shape[0] // V
    if V == 1:
        return x.reshape(1, *x.shape)
    J = -(-V // P)  # chunks per (device, round) at most
    d = jax.lax.axis_index(PIPELINE_AXIS)
    x = x.reshape(V, Lc, *x.shape[1:])  # slot v holds chunk d*V + v
    out = jnp.zeros_like(x)  # slot r will hold chunk r*P + d
    for k in range(P):
        src = (d - k) % P  # the device this round receives from (sender side: d sends to d+k)
        # Sender side: my slots v with (d*V + v - d) % P == k.
        v0 = jnp.mod(k - d * (V - 1), P)
        vs = v0 + P * jnp.arange(J)
        send = x[jnp.minimum(vs, V - 1)]
        if k:
            send = jax.lax.ppermute(send, PIPELINE_AXIS, [(i, (i + k) % P) for i in range(P)])
        # Receiver side: the same slots as computed by the sender `src`, landing at r = c // P.
        rv = jnp.mod(k - src * (V - 1), P) + P * jnp.arange(J)
        valid = rv < V
        r = jnp.where(valid, (src * V + rv) // P, V + jnp.arange(J))  # >= V: out of range, dropped
        out = out.at[r].set(send, mode="drop", unique_indices=True)  # distinct chunks: transposable
    return out


def _relayout_interleaved(a: jax.Array, P: int, V: int, mesh: Mesh) -> jax.Array:
    """[L, ...] sharded in contiguous blocks over `pipeline` -> [V, P, Lc, ...] sharded on P
    (`relayout_local` on every stage)."""
    return jax.shard_map(lambda x: relayout_local(x, P, V)[:, None], mesh=mesh, in_specs=PS(PIPELINE_AXIS),
                         out_specs=PS(None, PIPELINE_AXIS), axis_names=frozenset({PIPELINE_AXIS}),
                         check_vma=False)(a)


def stage_weights(stacked: dict[str, jax.Array], P: int, V: int, mesh: Mesh | None,
                  compute_dtype: Any) -> dict[str, jax.Array]:
    """Block params [L, ...] -> [V, P, Lc, ...] with P over `pipeline`, moving as little as needed.

    Matrices are cast to the compute dtype first (block() casts them anyway), so a relayout moves
    bf16, not fp32; norm vectors keep their dtype (block() reads them uncast).
    """
    def one(a: jax.Array) -> jax.Array:
        if a.ndim >= 3:
            a = a.astype(compute_dtype)
        if mesh is None or mesh.shape.get(PIPELINE_AXIS, 1) == 1:
            return to_stages({"a": a}, P, V)["a"]
        if V == 1:  # contiguous blocks are already the stage chunks: a local reshape
            staged = to_stages({"a": a}, P, V)["a"]
        else:
            staged = _relayout_interleaved(a, P, V, mesh)
        return _constrain(staged, mesh, PS(None, PIPELINE_AXIS, *([_U] * (a.ndim - 1))))
    return jax.tree.map(one, stacked)


def _constrain(x: jax.Array, mesh: Mesh | None, spec: PS) -> jax.Array:
    if mesh is None or mesh.shape.get(PIPELINE_AXIS, 1) == 1:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def pipelined_blocks(cfg: ModelConfig, stacked: dict[str, jax.Array], x: jax.Array, *,
                     positions: jax.Array, segment_ids: jax.Array | None, P: int, V: int,
                     mesh: Mesh | None = None) -> jax.Array:
    """All decoder blocks over microbatched activations with the circular schedule.

    x: [M, micro, seq, hidden] activations (M microbatches); positions / segment_ids:
    [M, micro, seq]. stacked: block params with the leading [L] layers axis. Returns the blocks'
    output, [M, micro, seq, hidden], equal to `run_blocks` applied to each microbatch.
    """
    M = x.shape[0]
    L = next(iter(stacked.values())).shape[0]
    validate_pipeline(L, P, V, M)
    T = num_iterations(P, V, M)
    Lc = L // (P * V)
    # Weights: [V, P, Lc, ...] with P over `pipeline`; other dims as the rules made them.
    staged = stage_weights(stacked, P, V, mesh, DTYPES[cfg.compute_dtype])
    q_index = jnp.broadcast_to(jnp.arange(x.shape[2]), x.shape[1:3])
    stage_ids = jnp.arange(P)
    state_spec = PS(PIPELINE_AXIS, *([_U] * (x.ndim - 1)))

    policy = REMAT_POLICIES[cfg.remat_policy]
    spmd = PIPELINE_AXIS if mesh is not None and mesh.shape.get(PIPELINE_AXIS, 1) > 1 else None

    def layer(carry, xs):
        p, cos, sin, seg = xs
        y, _ = block(cfg, p, carry, cos=cos, sin=sin, q_index=q_index, segment_ids=seg)
        return y

    # Remat per layer with the model's policy, but the checkpointed layer takes the whole
    # loop-invariant `staged` weights plus (repeat, layer) indices and gathers its own slice
    # inside. The alternative, gathering a chunk's weights per iteration outside the checkpoint,
    # makes autodiff of the iteration scan stash that gathered copy for every one of the T
    # iterations (measured: 107.55 GiB of temporaries for 340B at P=8, V=12). Loop-invariant
    # residuals (`staged`) are kept once; per layer and iteration only what the policy saves
    # (for "full": the layer input) is kept. With "none" everything but the weights is saved.
    layer_policy = policy if cfg.remat_policy != "none" else \
        jax.checkpoint_policies.save_anything_except_these_names(_STAGE_WEIGHTS)

    def layer_at(h: jax.Array, staged_p: dict[str, jax.Array], r: jax.Array, l: jax.Array,
                 cos: jax.Array, sin: jax.Array, seg: jax.Array | None) -> jax.Array:
        w = jax.tree.map(lambda a: checkpoint_name(a[r, l], _STAGE_WEIGHTS), staged_p)
        return layer(h, (w, cos, sin, seg))

    layer_ckpt = jax.checkpoint(layer_at, policy=layer_policy, prevent_cse=False)

    def chunk(staged_p: dict[str, jax.Array], r: jax.Array, h: jax.Array, pos: jax.Array,
              seg: jax.Array | None) -> jax.Array:
        """One stage's Lc layers (of repeat r) on one microbatch: a scan over layers."""
        cos, sin = rope_tables(pos, cfg.rotary_dim, cfg.rope_base)

        def body(c, l):
            return layer_ckpt(c, staged_p, r, l, cos, sin, seg), None
        h, _ = jax.lax.scan(body, h, jnp.arange(Lc))
        return h

    def run_stages(staged_w: dict[str, jax.Array], rep: jax.Array, inp: jax.Array, pos: jax.Array,
                   seg: jax.Array | None) -> jax.Array:
        """Every stage's current chunk on its current microbatch (one pipeline iteration).

        spmd_axis_name: sharding constraints inside the model (rules.constrain) keep the stage
        dim on `pipeline` instead of replicating it."""
        return jax.vmap(chunk, in_axes=(1, 0, 0, 0, 0), spmd_axis_name=spmd)(staged_w, rep, inp, pos, seg)

    def iteration(carry, t):
        state, buf = carry
        rel = t - stage_ids  # how far each stage is into its work
        mb = jnp.mod(rel, M)  # microbatch index per stage
        rep = jnp.clip(rel // M, 0, V - 1)  # virtual stage (repeat) per stage
        first = jax.lax.dynamic_index_in_dim(buf, jnp.mod(t, M), 0, keepdims=False)
        inp = jnp.where((stage_ids == 0).reshape(P, *([1] * (x.ndim - 1))), first[None], state)
        inp = _constrain(inp, mesh, state_spec)
        pos = positions[mb]
        seg = None if segment_ids is None else segment_ids[mb]
        out = run_stages(staged, rep, inp, pos, seg)
        out = _constrain(out, mesh, state_spec)
        # Stage P-1's output for microbatch (t - P + 1) goes back to the buffer (for the next
        # repeat, or as the final result after repeat V-1); before t = P-1 it is bubble garbage.
        done = t - (P - 1)
        slot = jnp.mod(done, M)
        old = jax.lax.dynamic_index_in_dim(buf, slot, 0, keepdims=False)
        buf = jax.lax.dynamic_update_index_in_dim(buf, jnp.where(done >= 0, out[P - 1], old), slot, 0)
        state = _constrain(jnp.roll(out, 1, axis=0), mesh, state_spec)
        return (state, buf), None

    state0 = _constrain(jnp.zeros((P, *x.shape[1:]), x.dtype), mesh, state_spec)
    (_, buf), _ = jax.lax.scan(iteration, (state0, x), jnp.arange(T))
    return buf


def split_microbatches(a: jax.Array, M: int) -> jax.Array:
    """[B, ...] -> [M, B/M, ...] taking rows m, m+M, m+2M, ... for microbatch m.

    Strided (not contiguous) so that a batch sharded in contiguous blocks over data axes keeps
    that sharding on the per-microbatch dim: no data movement.
    """
    B = a.shape[0]
    if B % M:
        raise ConfigError(f"batch of {B} sequences is not divisible by pipeline.microbatches={M}")
    return a.reshape(B // M, M, *a.shape[1:]).swapaxes(0, 1)


def merge_microbatches(a: jax.Array) -> jax.Array:
    """Inverse of split_microbatches: [M, b, ...] -> [M*b, ...]."""
    return a.swapaxes(0, 1).reshape(a.shape[0] * a.shape[1], *a.shape[2:])


def pipelined_hidden(model: nnx.Module, input_ids: jax.Array, *, positions: jax.Array | None,
                     segment_ids: jax.Array | None, P: int, V: int, M: int,
                     mesh: Mesh | None = None) -> jax.Array:
    """Final-normed hidden states [B, S, D] of `model` (a NemotronLM), blocks pipelined.

    Numerically the same computation as `model.hidden(...)`: only the schedule differs.
    """
    cfg = model.cfg
    b, s = input_ids.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    x = embed_tokens(cfg, model.embed[...], input_ids)
    seg = None if segment_ids is None else split_microbatches(segment_ids, M)
    y = pipelined_blocks(cfg, model.blocks.arrays(), split_microbatches(x, M),
                         positions=split_microbatches(positions, M), segment_ids=seg, P=P, V=V,
                         mesh=mesh)
    y = merge_microbatches(y)
    return layernorm1p(y, model.final_norm_scale[...], model.final_norm_bias[...], cfg.norm_eps)


def _spread_over_pipeline(h: jax.Array, mesh: Mesh | None) -> jax.Array:
    """Shard the post-pipeline batch over `pipeline` too, so the LM head, logits and loss are
    computed once, split P ways, instead of redundantly on every stage (the logits
    [batch, seq, vocab] are the largest activation of the step). Skipped when the batch does
    not divide; the batch's data-parallel axes come from the active rules."""
    if mesh is None or mesh.shape.get(PIPELINE_AXIS, 1) == 1:
        return h
    active = active_rules()
    batch_axes: tuple[str, ...] = ()
    if active is not None:
        batch_axes = spec_axes(logical_to_spec(("batch",), active[1], mesh)[0]
                               if len(logical_to_spec(("batch",), active[1], mesh)) else None)
    batch_axes = tuple(a for a in batch_axes if a != PIPELINE_AXIS) + (PIPELINE_AXIS,)
    n = 1
    for a in batch_axes:
        n *= mesh.shape[a]
    if h.shape[0] % n:
        return h
    return jax.lax.with_sharding_constraint(h, NamedSharding(mesh, PS(batch_axes, *([_U] * (h.ndim - 1)))))


class Schedule(NamedTuple):
    """An active pipeline schedule: P stages, V virtual stages each, M microbatches, on `mesh`."""

    P: int
    V: int
    M: int
    mesh: Mesh | None


_ACTIVE = threading.local()
_HOOK = threading.local()


@contextlib.contextmanager
def use_pipeline(schedule: Schedule | None) -> Iterator[None]:
    """Make `hidden_states` pipeline the blocks while tracing under this context (thread-local)."""
    prev = getattr(_ACTIVE, "value", None)
    _ACTIVE.value = schedule if schedule is not None and schedule.P > 1 else None
    try:
        yield
    finally:
        _ACTIVE.value = prev


def active_schedule() -> Schedule | None:
    return getattr(_ACTIVE, "value", None)


@contextlib.contextmanager
def hidden_states_hook(fn: Any) -> Iterator[None]:
    """While tracing under this context, `hidden_states(model, ids, positions=..., segment_ids=...)`
    returns `fn(model, ids, positions, segment_ids)`: how the 1F1B step splits an objective around
    its hidden states (nemojax.parallel.pipeline_grads). Thread-local."""
    prev = getattr(_HOOK, "value", None)
    _HOOK.value = fn
    try:
        yield
    finally:
        _HOOK.value = prev


def hidden_states(model: nnx.Module, input_ids: jax.Array, *, positions: jax.Array | None = None,
                  segment_ids: jax.Array | None = None) -> jax.Array:
    """Final-normed hidden states [B, S, D] of a NemotronLM, through the active pipeline schedule
    if there is one (`use_pipeline`), else `model.hidden`. Objectives call this, not model.hidden.

    With a schedule, the batch is cut into its M microbatches (B must divide by M) and the
    result is re-sharded over `pipeline` as well as the data axes, so whatever follows (LM head,
    a reward head, the loss) is computed once, split P ways, not redundantly on every stage.
    """
    hook = getattr(_HOOK, "value", None)
    if hook is not None:
        return hook(model, input_ids, positions, segment_ids)
    sched = active_schedule()
    if sched is None:
        return model.hidden(input_ids, positions=positions, segment_ids=segment_ids)[0]
    h = pipelined_hidden(model, input_ids, positions=positions, segment_ids=segment_ids,
                         P=sched.P, V=sched.V, M=sched.M, mesh=sched.mesh)
    return _spread_over_pipeline(h, sched.mesh)


def pipeline_schedule(cfg: Config, mesh: Mesh | Any, micro_batches: Iterable[int] = (),
                      batch_split: int = 1) -> Schedule | None:
    """The schedule for `cfg` on `mesh`, with P from the RESOLVED mesh (so `mesh.pipeline=-1`
    counts), validated against the model and each of the step's `micro_batches` sizes (split over
    `batch_split` devices); None when the mesh has a single pipeline stage."""
    P = mesh_shape(mesh).get(PIPELINE_AXIS, 1)
    if P == 1:
        return None
    V, M = cfg.pipeline.virtual_stages, cfg.pipeline.microbatches
    validate_pipeline(cfg.model.num_layers, P, V, M)
    for micro in micro_batches:
        validate_pipeline(cfg.model.num_layers, P, V, M, micro, batch_split)
    return Schedule(P, V, M, mesh if isinstance(mesh, Mesh) else None)
