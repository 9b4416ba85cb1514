"""The device mesh: four named axes sized from `MeshConfig`, plain or hybrid (ICI x DCN).

Axis order is `MESH_AXES = ("data", "pipeline", "fsdp", "tensor")`, outermost first. The
innermost axis gets the closest devices (same chip pair / NVLink domain / ICI neighbours),
so it is `tensor`, whose all-reduces sit on every layer's critical path; `fsdp` all-gathers
each layer's weights and comes next; `pipeline` only sends activations between neighbours
and `data` only reduces gradients once per step, so they tolerate the slowest links (DCN).

Sizes in `MeshConfig` are *global* (the whole job); `dcn_<axis>` says how many of that
axis' slices sit on different slices/nodes. With any dcn factor > 1 the mesh is built with
`create_hybrid_device_mesh(ici_shape, dcn_shape)` so that only the DCN part crosses slow links.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AbstractMesh, Mesh

from nemojax.config import ConfigError, MeshConfig
from nemojax.model.axes import mesh_shape

MESH_AXES: tuple[str, ...] = ("data", "pipeline", "fsdp", "tensor")


def axis_sizes(mesh_cfg: MeshConfig, num_devices: int) -> dict[str, int]:
    """Global size of each mesh axis for `num_devices`, with the one -1 axis filled in.

    Raises ConfigError naming the product and the device count when they do not fit.
    """
    mesh_cfg.validate("mesh")
    sizes = {a: getattr(mesh_cfg, a) for a in MESH_AXES}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    fill = [a for a, v in sizes.items() if v == -1]
    desc = " x ".join(f"{a}={v}" for a, v in sizes.items())
    if fill:
        if num_devices % fixed:
            raise ConfigError(
                f"mesh {desc}: the fixed axes multiply to {fixed}, which does not divide the "
                f"{num_devices} available devices, so mesh.{fill[0]}=-1 cannot be filled; make the "
                f"product of the other axes a divisor of {num_devices}")
        sizes[fill[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(
            f"mesh {desc} multiplies to {fixed} devices but {num_devices} are available; "
            f"set one axis to -1 to fill the rest, or make the product equal {num_devices}")
    return sizes


def dcn_sizes(mesh_cfg: MeshConfig, sizes: dict[str, int]) -> dict[str, int]:
    """DCN (cross-slice / cross-node) factor of each axis, checked to divide the axis size."""
    dcn = {a: getattr(mesh_cfg, f"dcn_{a}") for a in MESH_AXES}
    for a in MESH_AXES:
        if sizes[a] % dcn[a]:
            raise ConfigError(
                f"mesh.dcn_{a}={dcn[a]} does not divide mesh.{a}={sizes[a]}: the DCN factor is the "
                f"number of slices/nodes the axis spans, so it must divide the axis' global size")
    return dcn


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
    """A `jax.sharding.Mesh` with axes MESH_AXES over `devices` (default: all global devices)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = axis_sizes(mesh_cfg, len(devices))
    dcn = dcn_sizes(mesh_cfg, sizes)
    shape = [sizes[a] for a in MESH_AXES]
    if any(d > 1 for d in dcn.values()):
        ici = [sizes[a] // dcn[a] for a in MESH_AXES]
        dcn_shape = [dcn[a] for a in MESH_AXES]
        # TPU devices know their slice; elsewhere (GPU nodes, CPU tests) a process is a granule
        # (multi-process CPU devices carry a slice_index too, but it is 0 on every process).
        by_process = getattr(devices[0], "platform", "") != "tpu"
        try:
            arr = mesh_utils.create_hybrid_device_mesh(ici, dcn_shape, devices,
                                                       process_is_granule=by_process)
        except (ValueError, AssertionError) as e:
            if jax.process_count() > 1 or not by_process:
                raise ConfigError(
                    f"cannot build a hybrid mesh with per-slice shape {dict(zip(MESH_AXES, ici))} and "
                    f"DCN shape {dict(zip(MESH_AXES, dcn_shape))} over {len(devices)} devices: {e}"
                ) from None
            # One process, no slices (fake CPU devices): treat consecutive device blocks as slices.
            arr = _blocked_hybrid(devices, ici, dcn_shape)
    else:
        try:
            arr = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        except (ValueError, AssertionError, NotImplementedError):
            # Topology-aware placement is a TPU nicety; any order is correct elsewhere.
            arr = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(arr, MESH_AXES)


def _blocked_hybrid(devices: Sequence[Any], ici: list[int], dcn: list[int]) -> np.ndarray:
    """Hybrid layout with consecutive blocks of devices as the "slices": on each axis the DCN
    index is the major part (index = dcn_index * ici_size + ici_index), as on a real pod."""
    n = len(ici)
    arr = np.asarray(devices, dtype=object).reshape(*dcn, *ici)
    arr = arr.transpose([k for i in range(n) for k in (i, n + i)])
    return arr.reshape([d * c for d, c in zip(dcn, ici)])


def make_abstract_mesh(mesh_cfg: MeshConfig, num_devices: int) -> AbstractMesh:
    """The mesh's shape and axis names without devices: for memory estimates and AOT planning."""
    sizes = axis_sizes(mesh_cfg, num_devices)
    dcn_sizes(mesh_cfg, sizes)
    return AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES)


__all__ = ["MESH_AXES", "axis_sizes", "dcn_sizes", "make_abstract_mesh", "make_mesh", "mesh_shape"]
