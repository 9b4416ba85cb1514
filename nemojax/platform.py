"""Which accelerator this host has, decided before JAX starts its backends (imports no JAX).

With libtpu installed (the `tpu` extra, also used for AOT compilation on CPU hosts) JAX tries to
start the TPU backend on every host; on a machine without TPUs that prints libtpu's
initialisation errors and costs seconds. `skip_absent_tpu()` (run when nemojax is imported)
restricts JAX to the CPU on hosts with libtpu, no TPU chip on the PCI bus and no NVIDIA GPU,
unless the user chose platforms (`JAX_PLATFORMS`) already. Compile-only TPU topologies for
`nemojax compile` do not need the TPU backend and keep working.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from pathlib import Path

_GOOGLE_PCI_VENDOR = "0x1ae0"
# PCI device ids of TPU chips (v3, v4, v5p, v5e, v6e, 7x); other Google PCI devices (gVNIC) are not TPUs.
_TPU_PCI_DEVICES = {"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"}
_NVIDIA_DEVICES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")


def tpu_chips() -> int:
    """Number of TPU chips attached to this host's PCI bus (0 on anything else)."""
    n = 0
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            if Path(vendor).read_text().strip() != _GOOGLE_PCI_VENDOR:
                continue
            if (Path(vendor).parent / "device").read_text().strip() in _TPU_PCI_DEVICES:
                n += 1
        except OSError:
            continue
    return n


def skip_absent_tpu(environ: dict[str, str] | None = None) -> bool:
    """Set JAX_PLATFORMS=cpu when libtpu is installed but this host has no TPU (and no GPU), so
    JAX never probes for one. Returns True when it did. No-op once JAX has started (then the
    caller's platforms stand) or when JAX_PLATFORMS / JAX_FORCE_TPU_INIT is set."""
    env = os.environ if environ is None else environ
    if env.get("JAX_PLATFORMS") or env.get("JAX_FORCE_TPU_INIT") or "jax" in __import__("sys").modules:
        return False
    if importlib.util.find_spec("libtpu") is None or tpu_chips() > 0:
        return False
    if any(os.path.exists(d) for d in _NVIDIA_DEVICES):
        return False
    env["JAX_PLATFORMS"] = "cpu"
    return True
