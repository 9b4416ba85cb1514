"""Which collectives a compiled step runs per call, over which mesh axes, in which dtype, how many bytes.

Read from HLO text, so it works for any program: the optimized module of a TPU AOT compile
(`nemojax compile` reports it) or, on CPU, the module right after SPMD partitioning
(`spmd_partitioned_hlo`: the CPU backend later promotes bf16 all-reduces to f32, which would hide
the dtype the partitioner chose).

Counting is per execution of the entry computation: a collective inside a `while` body counts
once per iteration (the trip count is read from XLA's `known_trip_count`, or from the loop's
`i < N` condition for the counted loops `lax.scan` emits); one inside a conditional branch
counts as if the branch ran (an upper bound) and is flagged `in_conditional`. A collective's mesh
axes are the axes along which the devices of one of its groups differ (device ids are positions
in the mesh's flattened device array, which is how jit numbers a mesh's devices).

`bytes` is the size of the collective's result on one device; `wire_bytes` what one device
sends for it with ring algorithms: all-reduce 2(n-1)/n x size, all-gather (n-1)/n x result,
reduce-scatter (n-1) x result, all-to-all (n-1)/n x size, collective-permute the whole buffer.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
import tempfile
from typing import Any, Iterable, Sequence

import jax
import numpy as np
from jax.experimental.compilation_cache import compilation_cache

COLLECTIVES = ("all-reduce", "reduce-scatter", "all-gather", "all-to-all", "collective-permute",
               "collective-broadcast", "ragged-all-to-all")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128|f8e\w+)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([\w\-]+)\((.*)$")
_HEADER = re.compile(r"^\s*(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_CALLEES = re.compile(r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction of the program and how often one step runs it."""

    kind: str  # all-reduce, reduce-scatter, all-gather, all-to-all, collective-permute, ...
    name: str
    dtypes: tuple[str, ...]  # element types of its result (several for a combined all-reduce)
    bytes: int  # result bytes on one device
    group_size: int
    axes: tuple[str, ...]  # mesh axes its device groups span
    count: int | None  # executions per step (None: inside a loop of unknown trip count)
    in_conditional: bool

    @property
    def wire_bytes(self) -> int:
        """Bytes one device sends per execution (ring algorithms; see the module docstring)."""
        n = self.group_size
        if n <= 1:
            return 0
        factor = {"all-reduce": 2 * (n - 1) / n, "all-gather": (n - 1) / n, "reduce-scatter": n - 1,
                  "all-to-all": (n - 1) / n, "ragged-all-to-all": (n - 1) / n}.get(self.kind, 1.0)
        return int(self.bytes * factor)


def _array_bytes(type_text: str) -> tuple[int, tuple[str, ...]]:
    total, dtypes = 0, []
    for dt, dims in _ARRAY.findall(type_text):
        n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        total += n * _DTYPE_BYTES.get(dt, 4)
        dtypes.append(dt)
    return total, tuple(dict.fromkeys(dtypes))


def _iota_groups(text: str) -> list[list[int]]:
    """`[G,S]<=[d0,d1,...]T(p...)`: iota over the dims, transposed by p, reshaped to G x S."""
    m = re.match(r"\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?", text)
    if m is None:
        raise ValueError(f"cannot parse replica groups {text[:80]!r}")
    out_shape = [int(x) for x in m.group(1).split(",")]
    dims = [int(x) for x in m.group(2).split(",")]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if m.group(3):
        ids = ids.transpose([int(x) for x in m.group(3).split(",")])
    return ids.reshape(out_shape[0], -1).tolist()


def _mesh_groups(text: str) -> list[list[int]]:
    """`mesh['a'=4,'b'=2], device_ids=(...) {'b'}`: devices that differ only along the listed axes."""
    m = re.match(r"mesh\[([^\]]*)\](?:,\s*device_ids=\(([^)]*\)?)\))?\s*\{([^}]*)\}", text)
    if m is None:
        raise ValueError(f"cannot parse replica groups {text[:80]!r}")
    axes = [(a.split("=")[0].strip().strip("'"), int(a.split("=")[1])) for a in m.group(1).split(",")]
    shape = [n for _, n in axes]
    ids = np.arange(math.prod(shape)).reshape(shape)
    if m.group(2):
        dev = m.group(2).strip()
        flat = (_iota_groups("[1," + str(math.prod(shape)) + "]<=" + dev)[0] if dev.startswith("[")
                else [int(x) for x in dev.split(",")])
        ids = np.asarray(flat).reshape(shape)
    names = [n for n, _ in axes]
    inside = [names.index(a.strip().strip("'")) for a in m.group(3).split(",") if a.strip()]
    outside = [i for i in range(len(shape)) if i not in inside]
    moved = ids.transpose(outside + inside)
    return moved.reshape(-1, math.prod(shape[i] for i in inside) if inside else 1).tolist()


def replica_groups(attrs: str) -> list[list[int]] | None:
    """The device groups of a collective's attribute text (any of XLA's three spellings)."""
    m = re.search(r"replica_groups=(\{\{[^=]*?\}\}|\{\}|\[[0-9,]+\]<=\[[0-9,]+\](?:T\([0-9,]+\))?|"
                  r"mesh\[[^\]]*\](?:,\s*device_ids=\([^)]*\)?\))?\s*\{[^}]*\})", attrs)
    if m is None:
        return None
    text = m.group(1)
    if text.startswith("{"):
        return [[int(x) for x in g.split(",") if x.strip()] for g in re.findall(r"\{([0-9,\s]*)\}", text[1:-1])]
    if text.startswith("mesh"):
        return _mesh_groups(text)
    return _iota_groups(text)


def _permute_groups(attrs: str) -> list[list[int]]:
    m = re.search(r"source_target_pairs=\{(.*?)\}\}", attrs)
    if m is None:
        return []
    return [[int(a), int(b)] for a, b in re.findall(r"\{?(\d+),(\d+)\}?", m.group(1) + "}")]


def _axes_of(groups: Sequence[Sequence[int]], axis_names: Sequence[str], shape: Sequence[int]) -> tuple[str, ...]:
    total = math.prod(shape)
    varying: set[int] = set()
    for g in groups:
        coords = [np.unravel_index(d % total, shape) for d in g]
        for i in range(len(shape)):
            if len({c[i] for c in coords}) > 1:
                varying.add(i)
    return tuple(axis_names[i] for i in sorted(varying))


@dataclasses.dataclass
class _Instr:
    name: str
    type_text: str
    op: str
    rest: str


def _parse(hlo: str) -> tuple[dict[str, list[_Instr]], str]:
    comps: dict[str, list[_Instr]] = {}
    entry, current = "", None
    for line in hlo.splitlines():
        h = _HEADER.match(line)
        if h:
            current = h.group(2)
            comps[current] = []
            if h.group(1):
                entry = current
            continue
        if current is None:
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTR.match(line)
        if m:
            comps[current].append(_Instr(m.group(1), m.group(2), m.group(3), m.group(4)))
    if not entry:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


def _trip_count(instr: _Instr, comps: dict[str, list[_Instr]]) -> int | None:
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', instr.rest)
    if m:
        return int(m.group(1))
    cond = re.search(r"condition=%?([\w.\-]+)", instr.rest)
    body = comps.get(cond.group(1), []) if cond else []
    consts = [int(c.group(1)) for i in body if i.op == "constant"
              for c in [re.match(r"(-?\d+)\)", i.rest)] if c and i.type_text.startswith("s32[]")]
    compares = [i for i in body if i.op == "compare" and "direction=LT" in i.rest]
    if len(consts) == 1 and len(compares) == 1:
        return consts[0]
    return None


def analyze(hlo: str, axis_names: Sequence[str], mesh_shape: Sequence[int]) -> list[Collective]:
    """Every collective of the HLO module with its per-step execution count (see the module docstring)."""
    comps, entry = _parse(hlo)
    by_name = {i.name: i for body in comps.values() for i in body}
    found: list[Collective] = []

    def visit(comp: str, mult: int | None, in_cond: bool, depth: int) -> None:
        if depth > 64:
            raise ValueError("HLO call graph deeper than 64: cyclic?")
        for ins in comps.get(comp, []):
            base = ins.op[:-len("-done")] if ins.op.endswith("-done") else ins.op
            if base in COLLECTIVES and not ins.op.endswith("-start"):
                attrs = ins.rest
                if ins.op.endswith("-done"):  # the groups are on the matching -start
                    start = by_name.get(re.match(r"%?([\w.\-]+)", ins.rest).group(1))
                    attrs = start.rest if start is not None else ""
                groups = _permute_groups(attrs) if base == "collective-permute" else replica_groups(attrs)
                groups = groups or [[0]]
                nbytes, dtypes = _array_bytes(ins.type_text)
                size = 2 if base == "collective-permute" else max(len(g) for g in groups)
                found.append(Collective(base, ins.name, dtypes, nbytes, size,
                                        _axes_of(groups, axis_names, mesh_shape), mult, in_cond))
            if ins.op == "while":
                trips = _trip_count(ins, comps)
                body = re.search(r"body=%?([\w.\-]+)", ins.rest).group(1)
                visit(body, None if mult is None or trips is None else mult * trips, in_cond, depth + 1)
                continue
            branches = _BRANCHES.search(ins.rest)
            if ins.op == "conditional":
                names = ([b.strip().lstrip("%") for b in branches.group(1).split(",")] if branches else
                         re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", ins.rest))
                for b in names:
                    visit(b, mult, True, depth + 1)
                continue
            if ins.op in ("fusion", "call", "async-start", "custom-call"):
                for callee in _CALLEES.findall(ins.rest):
                    visit(callee, mult, in_cond, depth + 1)

    visit(entry, 1, False, 0)
    return found


def summarize(collectives: Iterable[Collective]) -> dict[str, Any]:
    """Per (kind, axes, dtype): executions and bytes per step, plus totals; JSON-ready."""
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    for c in collectives:
        key = (c.kind, "+".join(c.axes) or "none", "+".join(c.dtypes))
        r = rows.setdefault(key, {"kind": c.kind, "axes": key[1], "dtype": key[2], "ops": 0, "per_step": 0,
                                  "bytes_per_step": 0, "wire_bytes_per_step": 0, "in_conditional": False})
        r["ops"] += 1
        r["in_conditional"] |= c.in_conditional
        if c.count is None or r["per_step"] is None:
            r["per_step"] = r["bytes_per_step"] = r["wire_bytes_per_step"] = None
            continue
        r["per_step"] += c.count
        r["bytes_per_step"] += c.count * c.bytes
        r["wire_bytes_per_step"] += c.count * c.wire_bytes
    table = sorted(rows.values(), key=lambda r: (r["axes"], r["kind"], r["dtype"]))
    known = [r for r in table if r["per_step"] is not None]
    return {"collectives": table,
            "bytes_per_step": sum(r["bytes_per_step"] for r in known),
            "wire_bytes_per_step": sum(r["wire_bytes_per_step"] for r in known),
            "unknown_trip_counts": len(table) - len(known),
            "note": "per device; counts multiply loop bodies by their trip counts; collectives in "
                    "conditional branches counted as if the branch ran (upper bound)"}


def spmd_partitioned_hlo(lowered: Any) -> str:
    """The HLO module right after SPMD partitioning of a lowered jit (compiles it once, uncached).

    The partitioner's choice of collectives and dtypes, before a backend rewrites them (the CPU
    backend promotes bf16 all-reduces to f32; the persistent cache would skip the compile)."""
    with tempfile.TemporaryDirectory(prefix="nemojax_hlo_") as d:
        # Dump flags are not part of the persistent cache's key: a cached executable would skip
        # the compile, and so the dump. The cache reads its on/off flag once; reset makes it reread.
        prev = jax.config.jax_enable_compilation_cache
        jax.config.update("jax_enable_compilation_cache", False)
        compilation_cache.reset_cache()
        try:
            lowered.compile(compiler_options={"xla_dump_to": d, "xla_dump_hlo_pass_re": "spmd-partitioning"})
        finally:
            jax.config.update("jax_enable_compilation_cache", prev)
            compilation_cache.reset_cache()
        files = sorted(glob.glob(os.path.join(d, "*after_spmd-partitioning*.txt")))
        if not files:
            raise RuntimeError("XLA wrote no module after spmd-partitioning (was the pass renamed?)")
        return open(files[-1]).read()


__all__ = ["COLLECTIVES", "Collective", "analyze", "replica_groups", "spmd_partitioned_hlo", "summarize"]
