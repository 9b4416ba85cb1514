"""When a training run stops to save: a signal seen by this process or, on several hosts, by any.

A cluster announces preemption with SIGTERM -- to every process, or only to the ones on the host
being reclaimed -- and kills the job when its grace period ends. Every process must then stop
after the *same* step: the checkpoint save is collective, and a process that stopped alone would
leave the others waiting in the next step's collectives until the kill.

- One process: SIGTERM and SIGINT (Ctrl-C) set a flag; the loop stops after the current step.
- Several processes: JAX's preemption sync manager, started by `jax.distributed.initialize`,
  owns SIGTERM. Its handler (C++, installed with the service) records the notice and posts it
  to the coordination service; every process then reports how many steps it has run and all
  agree to stop after the fastest one's next step. The loop asks
  `multihost_utils.reached_preemption_sync_point` after each step (a mutex and a compare in the
  runtime: no host sync). No Python SIGTERM handler is installed over it -- that would silently
  replace it, and the notice would never leave the host. Ctrl-C is chained into it: SIGINT
  raises SIGTERM in this process, and the notice spreads as a cluster's would.
- Several processes without that service (`jax_enable_preemption_service=False`, or a Python
  SIGTERM handler installed before the trainer replaced JAX's): signals set a local flag and
  every step all processes all-gather their flags -- a host sync per step, so it is the fallback.

A second Ctrl-C stops at once, without saving.

The sync manager is told the number of steps run *in this launch* (1, 2, ...), the same on every
process, and only by the loop. Its counters start at 0, so a notice that arrives before the
first step (while a process is starting, restoring or compiling) sets the stop point to step 1
of this launch -- with global steps a resumed run would never reach it. (Orbax's
CheckpointManager would report steps too, global ones, from its save-finalising thread;
nemojax.train.checkpointing turns that off.)
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

LOCAL, JAX_SYNC, ALLGATHER = "local", "jax_sync", "allgather"


def _jax_owns_sigterm() -> bool:
    """JAX's preemption service is running and its (non-Python) SIGTERM handler is in place."""
    try:
        multihost_utils.reached_preemption_sync_point(0)  # the manager's initial count: a no-op
    except RuntimeError:  # jax_enable_preemption_service=False
        return False
    # Python reports the handler it last installed itself (SIG_DFL if none), not the C++ one JAX
    # installed later; a Python function here means someone replaced JAX's handler after it.
    return not callable(signal.getsignal(signal.SIGTERM))


class StopSignals:
    """Signal handling and stop agreement for one training run (see the module docstring).

    Use as a context manager around restore and loop, and call `should_stop(steps_run)` after
    every step with the number of steps this launch has run. `gather` replaces the cross-process
    all-gather of the fallback mode (tests).
    """

    def __init__(self, process_count: int | None = None,
                 gather: Callable[[np.ndarray], np.ndarray] | None = None):
        self.process_count = jax.process_count() if process_count is None else process_count
        self.received: str | None = None  # the signal this process saw, if any
        if self.process_count == 1:
            self.mode = LOCAL
        else:
            self.mode = JAX_SYNC if gather is None and _jax_owns_sigterm() else ALLGATHER
        self._gather = gather or (lambda x: np.asarray(multihost_utils.process_allgather(x)))
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        wanted = (signal.SIGINT,) if self.mode == JAX_SYNC else (signal.SIGTERM, signal.SIGINT)
        try:
            for s in wanted:
                self._previous[s] = signal.signal(s, self._on_signal)
        except ValueError:  # not the main thread: leave the handlers alone
            pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the final save
        self.received = signal.Signals(signum).name
        if self.mode == JAX_SYNC:  # hand Ctrl-C to JAX's notifier, which tells every process
            os.kill(os.getpid(), signal.SIGTERM)

    def should_stop(self, steps_run: int) -> bool:
        """Stop (and save) after this step? The same answer on every process."""
        if self.mode == LOCAL:
            return self.received is not None
        if self.mode == JAX_SYNC:
            return bool(multihost_utils.reached_preemption_sync_point(steps_run))
        flags = self._gather(np.asarray(self.received is not None, np.int32))
        return bool(np.asarray(flags).any())

    def describe(self) -> str:
        """What stopped the run, for the log line."""
        if self.received:
            return self.received
        return "a preemption notice (SIGTERM to a process of this job)" if self.mode == JAX_SYNC \
            else "a stop signal on another process"

    def warn_if_costly(self) -> None:
        if self.mode == ALLGATHER and jax.process_index() == 0:
            print("WARNING: JAX's preemption service is not active (jax_enable_preemption_service=False, or a "
                  "Python SIGTERM handler replaced its own), so processes agree on a stop signal with a host "
                  "all-gather after every step. Enable the service and leave SIGTERM to JAX to avoid it.",
                  file=sys.stderr, flush=True)
