"""The XLA flags of every test process: pytest's own (tests/conftest.py) and the subprocesses it starts.

Tests compile hundreds of small programs, and on the CPU compiling costs more than running
them: `--xla_backend_optimization_level=0` roughly halves compile time (tests/test_trainer.py,
test_model.py and test_optim.py: 140 -> 90 CPU-s). Every process of a test uses the same level,
so runs compared with each other (resume, multi-process, cached programs) compile alike. The
level changes how XLA schedules and fuses, not what a program computes: the independent
references (numpy, transformers) are compared at tolerances, and tests whose point is a numeric
effect of batching (tests/test_sdg_determinism.py) were checked to still fail their mutants at
this level. Users get XLA's default level; benchmarks never import this.
"""

from __future__ import annotations

FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test process with `devices` fake CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
