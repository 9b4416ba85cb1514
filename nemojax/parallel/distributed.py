"""Joining a multi-host job: one call to `jax.distributed.initialize`, from config or environment.

Every host runs the same program. `initialize()` must run before anything touches a device
(before `jax.devices()`, before building the mesh); afterwards `jax.devices()` lists all
hosts' devices, the mesh spans them, and each host feeds only its own rows of the batch
(the rows its devices hold: `nemojax.parallel.batching`).

Where the settings come from, first match wins:
1. explicit keys (`coordinator_address`, `num_processes`, `process_id`, `local_device_ids`)
   passed as a mapping or keyword arguments;
2. `NEMOJAX_COORDINATOR`, `NEMOJAX_NUM_PROCESSES`, `NEMOJAX_PROCESS_ID`,
   `NEMOJAX_LOCAL_DEVICE_IDS` (comma-separated);
3. JAX's own `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`;
4. a cluster JAX detects by itself: SLURM (`srun`, reads SLURM_* variables), Cloud TPU
   pods / GKE (TPU environment variables, or TPU chips on this host), Open MPI (`mpirun`).
   `jax.distributed.initialize()` is then called with no arguments and finds the coordinator
   on its own;
5. none of the above: a single-process run, nothing to do.
`NEMOJAX_DISTRIBUTED=off` skips initialization altogether.

`jax.distributed.initialize` also starts JAX's preemption sync manager, which installs its own
SIGTERM handler: from then on a SIGTERM to any process is a preemption notice for the whole job
(nemojax.train.preemption decides when the trainer stops on it). Install no Python SIGTERM handler
after initializing, or the notice never leaves the process that got it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping

import jax

from nemojax.config import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedInfo:
    """What this process is in the job."""

    initialized: bool  # jax.distributed.initialize was called (by us or before us)
    process_id: int
    num_processes: int
    source: str  # "explicit" | "nemojax_env" | "jax_env" | "slurm" | "tpu" | "mpi" | "single"


_DONE: DistributedInfo | None = None


def _int(value: Any, key: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be an integer, got {value!r}") from None


def _device_ids(value: Any, key: str) -> list[int] | None:
    if value in (None, ""):
        return None
    if isinstance(value, str):
        return [_int(v, key) for v in value.split(",") if v.strip()]
    if isinstance(value, int):
        return [value]
    return [_int(v, key) for v in value]


def detect_cluster(env: Mapping[str, str]) -> str | None:
    """Name of a cluster environment JAX can auto-configure from, or None."""
    if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1:
        return "slurm"
    workers = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(workers) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"  # a multi-host slice, or several slices
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return "mpi"
    return None


def jax_detected_cluster() -> str | None:
    """"tpu" on a Cloud TPU VM (TPU chips on this host's PCI bus): there
    `jax.distributed.initialize()` finds the pod's workers itself (one or many), so it is called
    without arguments. None elsewhere."""
    from nemojax.platform import tpu_chips

    return "tpu" if tpu_chips() > 0 else None


def resolve_settings(explicit: Mapping[str, Any] | None = None,
                     env: Mapping[str, str] | None = None) -> tuple[str, dict[str, Any]]:
    """(source, kwargs for jax.distributed.initialize); source "single" means do nothing."""
    env = os.environ if env is None else env
    explicit = {k: v for k, v in (explicit or {}).items() if v not in (None, "")}
    if str(env.get("NEMOJAX_DISTRIBUTED", "")).lower() in ("off", "0", "false", "no"):
        return "single", {}
    for source, keys in (
            ("explicit", None),
            ("nemojax_env", ("NEMOJAX_COORDINATOR", "NEMOJAX_NUM_PROCESSES", "NEMOJAX_PROCESS_ID",
                             "NEMOJAX_LOCAL_DEVICE_IDS")),
            ("jax_env", ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", None))):
        if keys is None:
            vals = explicit
            names = ("coordinator_address", "num_processes", "process_id", "local_device_ids")
            got = {n: vals.get(n) for n in names}
        else:
            names = tuple(k for k in keys if k)
            got = {"coordinator_address": env.get(keys[0]), "num_processes": env.get(keys[1]),
                   "process_id": env.get(keys[2]),
                   "local_device_ids": env.get(keys[3]) if keys[3] else None}
        if got["coordinator_address"] is None and got["num_processes"] is None:
            continue
        label = "the explicit settings" if keys is None else ", ".join(names)
        missing = [k for k in ("coordinator_address", "num_processes", "process_id") if got[k] is None]
        if missing:
            raise ConfigError(f"distributed setup from {label} is incomplete: missing {missing}; set "
                              f"coordinator address (host:port), number of processes and this "
                              f"process' id together")
        kwargs = {"coordinator_address": str(got["coordinator_address"]),
                  "num_processes": _int(got["num_processes"], "num_processes"),
                  "process_id": _int(got["process_id"], "process_id")}
        if not 0 <= kwargs["process_id"] < kwargs["num_processes"]:
            raise ConfigError(f"process_id={kwargs['process_id']} must be in [0, num_processes="
                              f"{kwargs['num_processes']})")
        ids = _device_ids(got["local_device_ids"], "local_device_ids")
        if ids is not None:
            kwargs["local_device_ids"] = ids
        if kwargs["num_processes"] == 1:
            return "single", {}
        return source, kwargs
    cluster = detect_cluster(env)
    if cluster is None and env is os.environ:
        cluster = jax_detected_cluster()  # e.g. a Cloud TPU pod found via its metadata server
    return (cluster, {}) if cluster else ("single", {})


def initialize(settings: Mapping[str, Any] | None = None, *, timeout_s: int = 300,
               cpu_collectives: str | None = "gloo", **kwargs: Any) -> DistributedInfo:
    """Join the job described by `settings`/kwargs or the environment (see module docstring).

    Idempotent: a second call returns the first call's result. `cpu_collectives` selects the
    CPU cross-process collective backend (needed for multi-process CPU runs and tests).
    """
    global _DONE
    if _DONE is not None:
        return _DONE
    source, init_kwargs = resolve_settings({**dict(settings or {}), **kwargs})
    if source == "single":
        _DONE = DistributedInfo(False, 0, 1, "single")
        return _DONE
    if cpu_collectives:
        try:
            jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
        except (AttributeError, ValueError):  # option renamed/removed in this JAX version
            log.warning("could not select CPU collectives %r", cpu_collectives)
    log.info("jax.distributed.initialize from %s: %s", source, init_kwargs or "auto-detect")
    jax.distributed.initialize(**init_kwargs, initialization_timeout=timeout_s)
    _DONE = DistributedInfo(True, jax.process_index(), jax.process_count(), source)
    return _DONE
