"""The 1F1B tick table: which stage runs the forward (F) and the backward (B) of which chunk when.

Units. A step's N microbatches each pass through the P * V chunks of the model (chunk
c = r * P + p runs on stage p as its virtual stage r, nemojax.parallel.pipeline); a unit is one
(microbatch, chunk). Every tick, each stage runs at most one F and then at most one B; at the
end of the tick activations move one stage forward and cotangents one stage back (stage P-1's
output goes to stage 0 for the next virtual stage, and back again for the cotangents).

Order (Megatron's interleaved 1F1B, in lockstep ticks). Microbatches go in groups of G (G = P
with virtual stages, G = N without): a stage forwards group g's G microbatches through its
virtual stage 0, then the same G through virtual stage 1, ..., so the forward unit with index

    u = g*G*V + r*G + i      (microbatch n = g*G + i, virtual stage r)

runs on stage p at tick u + p. Backward runs the units in the mirrored order, starting as soon
as the first microbatch has left the last chunk:

    tick_B = (V-1)*G + P - 1 + g*G*V + (V-1-r)*G + i + (P-1-p)

so the last chunk's B follows its F in the same tick (after the loss), every B finds its
cotangent sent by the neighbour the tick before, and with G = P the activation stage P-1
sends on arrives at stage 0 exactly when its next virtual stage starts (no buffers).

Consequences: a stage holds the input of every unit it has forwarded and not yet backwarded;
that is at most (V-1)*G + 2*(P-1-p) + 1 units, bounded by the pipeline depth, not by N. The
forward ticks of the whole schedule span N*V + P - 1 ticks and so do the backward ones, so the
idle share of a stage's time (each tick costs F when only forwards run anywhere, B when only
backwards, F + B otherwise) is at most

    bubble = (P - 1) / (N*V + P - 1)

with N = all the microbatches of the optimizer step (every accumulation slice goes through the
same flush). Stash slots (where a unit's input waits for its B) are assigned here, statically.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from nemojax.config import ConfigError

# Columns of the table, per (tick, stage).
FIELDS = ("f_valid", "f_mb", "f_rep", "f_slot", "f_first", "f_last",
          "b_valid", "b_mb", "b_rep", "b_slot", "b_first", "b_last")
COL = {name: i for i, name in enumerate(FIELDS)}


class TickTable(NamedTuple):
    """table[t, p, COL[field]]; `slots` stash slots per stage; `ticks` = table.shape[0]."""

    table: np.ndarray
    slots: int
    ticks: int
    group: int


def group_size(P: int, V: int, N: int) -> int:
    """Microbatches per group: P with virtual stages (so recirculation needs no buffer), N without."""
    return P if V > 1 else N


def validate(P: int, V: int, N: int) -> None:
    """ConfigError naming the keys when N microbatches cannot be scheduled on P stages x V."""
    if N < 1:
        raise ConfigError(f"the pipelined step has {N} microbatches; it needs at least one")
    if V > 1 and N % P:
        raise ConfigError(
            f"with pipeline.virtual_stages={V} > 1 the interleaved 1F1B schedule runs microbatches in "
            f"groups of mesh.pipeline={P}, but the step has {N} (accumulation slices x "
            f"pipeline.microbatches); make pipeline.microbatches (times the slices) a multiple of {P}")


def build(P: int, V: int, N: int) -> TickTable:
    """The tick table for P stages, V virtual stages and N microbatches (module docstring)."""
    validate(P, V, N)
    G = group_size(P, V, N)
    off = (V - 1) * G + P - 1
    fwd: dict[tuple[int, int], tuple[int, int]] = {}  # (tick, stage) -> (microbatch, repeat)
    bwd: dict[tuple[int, int], tuple[int, int]] = {}
    for n in range(N):
        g, i = divmod(n, G)
        for r in range(V):
            for p in range(P):
                tf = g * G * V + r * G + i + p
                tb = off + g * G * V + (V - 1 - r) * G + i + (P - 1 - p)
                assert (tf, p) not in fwd and (tb, p) not in bwd, "two units on one stage in one tick"
                fwd[(tf, p)] = (n, r)
                bwd[(tb, p)] = (n, r)
    ticks = 1 + max(t for t, _ in bwd)
    table = np.zeros((ticks, P, len(FIELDS)), np.int32)
    slots = 0
    for p in range(P):
        free: list[int] = []
        held: dict[tuple[int, int], int] = {}
        used = 0
        for t in range(ticks):
            if (t, p) in fwd:  # F writes its input before this tick's B reads (and frees) a slot
                n, r = fwd[(t, p)]
                slot = free.pop() if free else used
                used = max(used, slot + 1)
                held[(n, r)] = slot
                table[t, p, [COL["f_valid"], COL["f_mb"], COL["f_rep"], COL["f_slot"], COL["f_first"],
                             COL["f_last"]]] = (1, n, r, slot, r == 0 and p == 0, r == V - 1 and p == P - 1)
            if (t, p) in bwd:
                n, r = bwd[(t, p)]
                slot = held.pop((n, r))
                table[t, p, [COL["b_valid"], COL["b_mb"], COL["b_rep"], COL["b_slot"], COL["b_first"],
                             COL["b_last"]]] = (1, n, r, slot, r == 0 and p == 0, r == V - 1 and p == P - 1)
                free.append(slot)
        assert not held, "a unit was forwarded and never backwarded"
        slots = max(slots, used)
    return TickTable(table, slots, ticks, G)


def bubble_fraction(P: int, V: int, N: int) -> float:
    """Idle share of a stage's time, (P-1)/(N*V + P - 1) (module docstring)."""
    if P < 1 or V < 1 or N < 1:
        raise ValueError(f"P, V, N must be >= 1, got {P}, {V}, {N}")
    return (P - 1) / (N * V + P - 1)


def live_units_bound(P: int, V: int, N: int) -> int:
    """Most unit inputs any stage holds at once: (V-1)*G + 2*(P-1) + 1, at most N*V."""
    return min((V - 1) * group_size(P, V, N) + 2 * (P - 1) + 1, N * V)


def schedule_summary(P: int, V: int, M: int, accum: int, num_layers: int) -> dict[str, Any]:
    """What `nemojax compile` / `info` print about the training step's pipeline schedule."""
    N = M * accum
    table = build(P, V, N)
    return {
        "schedule": "interleaved 1F1B, one flush per optimizer step" if V > 1 else "1F1B, one flush per optimizer step",
        "stages": P, "virtual_stages": V, "microbatches_per_slice": M, "accumulation_slices": accum,
        "microbatches_per_flush": N,
        "layers_per_chunk": num_layers // (P * V) if num_layers % (P * V) == 0 else None,
        "ticks": table.ticks,
        "live_chunk_inputs_per_stage": table.slots,
        "bubble_fraction": round(bubble_fraction(P, V, N), 6),
    }


__all__ = ["schedule_summary", "COL", "FIELDS", "TickTable", "bubble_fraction", "build", "group_size", "live_units_bound", "validate"]
