"""Ahead-of-time compilation of the full training step for a TPU topology, from a CPU host.

Why: whether a layout (mesh, remat policy, microbatches) fits a chip's HBM is known only
after XLA has compiled the step for that chip, and the hardware may not exist yet or be busy.
libtpu can compile for any TPU topology without TPUs attached (`jax.experimental.topologies`
makes "compile-only" devices), so this host can compile the exact sharded program a pod
would run and read its memory analysis.

Topology names (`--topology`):
  * libtpu form `TYPE:SHAPE`: `v5p:2x2x1`, `v5p:4x4x4`, `v5p:8x8x8`, `v4:2x2x1`, `v5e:2x2`,
    `v6e:4x4` (chips per dim; 3-D for v4/v5p, 2-D for v5e/v6e);
  * Cloud slice form `TYPE-N`: `v5p-8`, `v5p-1024`, `v4-32` (N = TensorCores, 2 per chip),
    `v5e-16` / `v5litepod-16`, `v6e-64` (N = chips), translated to the libtpu form below;
  * `cpu`: this host's CPU devices (labelled as such: not a TPU memory estimate).
`--num-slices K` compiles a K-slice multislice job (DCN between slices).

This module knows topologies and how to read a compiled program's memory; what is compiled is
the caller's: `nemojax compile` lowers the train step from `nemojax.train.build.build_training`,
the same function the trainer runs.
"""

from __future__ import annotations

import math
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp

from nemojax.config import ConfigError
from nemojax.parallel.collectives import analyze, summarize

# HBM per chip in GiB (public spec sheets); used only to say whether a compiled step fits.
HBM_GIB: dict[str, float] = {"v4": 32.0, "v5p": 95.0, "v5e": 16.0, "v6e": 32.0}
_CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1, "v5litepod": 1}
_DIMS = {"v4": 3, "v5p": 3, "v5e": 2, "v6e": 2}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e"}
_LOCAL_ACCELERATOR = {"v4": "v4-8", "v5p": "v5p-8", "v5e": "v5litepod-4", "v6e": "v6e-4"}


def _slice_shape(chips: int, dims: int) -> list[int]:
    """Chip count -> the standard slice shape: 3-D 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ...;
    2-D 1x2, 2x2, 2x4, 4x4, 4x8, ... (a power of two; other shapes must be given explicitly)."""
    if chips < 1 or chips & (chips - 1):
        raise ConfigError(f"a TPU slice of {chips} chips is not a power of two; give the shape "
                          f"explicitly, e.g. --topology v5p:4x4x8")
    if dims == 3:
        if chips < 4:
            return [chips, 1, 1]
        shape, order = [2, 2, 2], [2, 1, 0]  # 2x2x1 doubled along z gives 2x2x2
        if chips == 4:
            return [2, 2, 1]
        chips //= 8
    else:
        shape, order = [1, 1], [1, 0]
    i = 0
    while chips > 1:
        shape[order[i % len(order)]] *= 2
        chips //= 2
        i += 1
    return shape


def libtpu_topology_name(name: str) -> tuple[str, str]:
    """(libtpu topology name, chip family) for a user-facing name; see the module docstring."""
    name = name.strip()
    m = re.fullmatch(r"([A-Za-z0-9]+):([0-9]+(?:x[0-9]+)+)", name)
    if m:
        fam = _ALIASES.get(m.group(1).lower(), m.group(1).lower())
        return f"{fam}:{m.group(2)}", fam
    m = re.fullmatch(r"([A-Za-z0-9]+)-([0-9]+)", name)
    if m:
        fam = m.group(1).lower()
        n = int(m.group(2))
        cores = _CORES_PER_CHIP.get(fam)
        fam = _ALIASES.get(fam, fam)
        if cores is None or fam not in _DIMS:
            raise ConfigError(f"unknown TPU type in topology {name!r}; known: "
                              f"{sorted(set(_CORES_PER_CHIP) | set(_DIMS))}")
        if n % cores:
            raise ConfigError(f"topology {name!r}: {fam} slices are named by TensorCores "
                              f"({cores} per chip), so N must be a multiple of {cores}")
        chips = n // cores
        shape = _slice_shape(chips, _DIMS[fam])
        return f"{fam}:{'x'.join(map(str, shape))}", fam
    raise ConfigError(f"cannot parse topology {name!r}: use e.g. v5p:4x4x4, v5p-128, v5e-16 or cpu")


def topology_devices(name: str, num_slices: int = 1) -> tuple[list[Any], dict[str, Any]]:
    """Compile-only devices for `name` and a description of them (platform, chips, HBM)."""
    if name == "cpu":
        devs = jax.devices("cpu")
        return devs, {"platform": "cpu", "topology": "cpu", "devices": len(devs), "hbm_gib": None,
                      "note": "compiled for this host's CPU devices: NOT a TPU memory estimate"}
    topo, fam = libtpu_topology_name(name)
    # libtpu takes a process-wide lock file; compile-only use needs no exclusive TPU access.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from nemojax.platform import tpu_chips

    # No TPU here: libtpu would look this host up in the TPU metadata service and print
    # initialisation errors. Name a local host of this family while libtpu starts (the
    # compile-only topology is the requested one whatever these say), then restore the
    # environment, so that nothing started later (a training subprocess) takes this host for a
    # TPU worker.
    local = {"TPU_ACCELERATOR_TYPE": _LOCAL_ACCELERATOR.get(fam, "v5p-8"), "TPU_WORKER_HOSTNAMES": "localhost"} \
        if tpu_chips() == 0 else {}
    saved = {k: os.environ.get(k) for k in local}
    for k, v in local.items():
        os.environ.setdefault(k, v)
    try:
        try:
            import libtpu  # noqa: F401
        except ImportError:
            raise ConfigError("AOT compilation for TPU needs libtpu: pip install 'nemojax[tpu]' "
                              "(or use --topology cpu for a CPU-only compile)") from None
        from jax.experimental import topologies

        kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
        try:
            desc = topologies.get_topology_desc(topo, "tpu", **kwargs)
        except Exception as e:  # libtpu reports bad names as a runtime error
            raise ConfigError(f"libtpu rejected topology {topo!r} (from {name!r}): {e}") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    devs = list(desc.devices)
    return devs, {"platform": "tpu", "topology": topo, "requested": name, "num_slices": num_slices,
                  "device_kind": devs[0].device_kind, "devices": len(devs),
                  "hbm_gib": HBM_GIB.get(fam)}


def _memory(compiled: Any) -> dict[str, Any]:
    ma = compiled.memory_analysis()
    if ma is None:
        return {"available": False}
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
              "alias_size_in_bytes", "generated_code_size_in_bytes",
              "host_argument_size_in_bytes", "host_output_size_in_bytes", "host_temp_size_in_bytes")
    out: dict[str, Any] = {f.replace("_size_in_bytes", "_bytes"): int(getattr(ma, f, 0) or 0) for f in fields}
    # Donated state aliases its outputs: those bytes are counted in both arguments and outputs.
    total = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
             + out["generated_code_bytes"])
    out["total_bytes"] = total
    out["total_gib"] = round(total / 2**30, 3)
    return out


def state_bytes(state: Any) -> dict[str, int]:
    """Per-device bytes of a TrainState of sharded ShapeDtypeStructs (no compile needed): the
    floor that arguments can never go below, reported even when compilation runs out of HBM."""
    def nbytes(tree: Any) -> int:
        total = 0
        for leaf in jax.tree.leaves(tree):
            shard = leaf.sharding.shard_shape(leaf.shape)
            total += int(math.prod(shard)) * jnp.dtype(leaf.dtype).itemsize
        return total
    return {"params": nbytes(state.params), "opt_state": nbytes(state.opt_state)}


def compile_report(lowered: Any, hbm_gib: float | None, mesh: Any = None) -> dict[str, Any]:
    """Compile `lowered` and report per-device memory, whether it fits `hbm_gib`, and (given the
    `mesh` it runs on) the collectives one call runs: per kind, mesh axes and dtype, how often and
    how many bytes (nemojax.parallel.collectives, read from the optimized program).

    When the TPU compiler refuses a program that cannot fit, that refusal is the measurement:
    `fits: false` and `compile_error` with the required and available bytes it reported.
    """
    t0 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        msg = str(e)
        if "RESOURCE_EXHAUSTED" not in msg:
            raise
        m = re.search(r"HLO temporaries \(([0-9.]+)([GMK])\) exceeds available HBM \(([0-9.]+)([GMK])\)", msg)
        unit = {"G": 1.0, "M": 1 / 1024, "K": 1 / 2**20}
        oom: dict[str, Any] = {"message": msg.strip().splitlines()[0][:2000]}
        if m:
            oom["temporaries_required_gib"] = float(m.group(1)) * unit[m.group(2)]
            oom["hbm_available_gib"] = float(m.group(3)) * unit[m.group(4)]
        return {"fits": False, "compile_error": oom, "compile_until_oom_s": round(time.perf_counter() - t0, 2)}
    out: dict[str, Any] = {"memory_per_device": _memory(compiled), "compile_s": round(time.perf_counter() - t0, 2)}
    if mesh is not None:
        out["collectives_per_step"] = summarize(analyze(compiled.as_text(), mesh.axis_names, mesh.devices.shape))
    total = out["memory_per_device"].get("total_bytes")
    if hbm_gib and total is not None:
        out["fits"] = bool(total <= hbm_gib * 2**30)
        out["headroom_gib"] = round(hbm_gib - total / 2**30, 3)
    return out


__all__ = ["HBM_GIB", "compile_report", "libtpu_topology_name", "state_bytes", "topology_devices"]
