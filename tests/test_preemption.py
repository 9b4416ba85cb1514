"""nemojax.train.preemption.StopSignals in this process, with real signals sent to it.

What the 2-process CLI tests (tests/test_multihost.py) cannot show cheaply: Ctrl-C twice, the
fallback agreement without JAX's preemption service, and that Ctrl-C on a multi-process run is
handed to JAX's SIGTERM handler instead of a Python one being put over it.
"""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from nemojax.train.preemption import ALLGATHER, JAX_SYNC, LOCAL, StopSignals


def _raise(signum: int) -> None:
    os.kill(os.getpid(), signum)  # the Python handler runs before the next bytecode


def test_one_process_stops_on_sigterm_and_restores_the_handlers() -> None:
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopSignals(process_count=1) as stop:
        assert stop.mode == LOCAL and not stop.should_stop(1)
        _raise(signal.SIGTERM)
        assert stop.should_stop(2) and stop.describe() == "SIGTERM"
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_second_ctrl_c_stops_at_once() -> None:
    with StopSignals(process_count=1) as stop:
        _raise(signal.SIGINT)
        assert stop.should_stop(1) and stop.received == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            _raise(signal.SIGINT)


def test_fallback_stops_every_process_when_any_saw_a_signal() -> None:
    """Without JAX's service: a host all-gather of the flags. Mutant: asking only the local flag
    (this process got no signal, the other did: it must stop too)."""
    other = {"flag": 0}
    sent = []

    def gather(mine: np.ndarray) -> np.ndarray:
        sent.append(int(mine))
        return np.array([int(mine), other["flag"]])

    with StopSignals(process_count=2, gather=gather) as stop:
        assert stop.mode == ALLGATHER
        assert not stop.should_stop(1)
        other["flag"] = 1
        assert stop.should_stop(2) and stop.describe() == "a stop signal on another process"
        other["flag"] = 0
        _raise(signal.SIGTERM)  # the fallback handles SIGTERM itself
        assert stop.should_stop(3) and sent == [0, 0, 1]


def test_ctrl_c_is_handed_to_jaxs_sigterm_handler() -> None:
    """With JAX's service the trainer leaves SIGTERM alone (a Python handler would replace JAX's
    notifier) and turns Ctrl-C into a SIGTERM for it. A Python recorder stands in for JAX's C++
    handler here."""
    got = []

    def jax_handler(signum: int, _frame) -> None:
        got.append(signum)

    previous = signal.signal(signal.SIGTERM, jax_handler)
    try:
        stop = StopSignals(process_count=1)
        stop.mode = JAX_SYNC  # as a multi-process run with the service decides
        with stop:
            assert signal.getsignal(signal.SIGTERM) is jax_handler
            _raise(signal.SIGINT)
            assert got == [signal.SIGTERM] and stop.received == "SIGINT"
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_checkpoint_saves_report_nothing_to_jaxs_sync_manager(tmp_path, monkeypatch) -> None:
    """Only the loop tells JAX's preemption sync manager where a process is. Mutant: orbax's own
    reports (the global step, again later from its finalising thread) left on -- they would mix with
    the loop's count and could set the stop point behind a process."""
    import jax.numpy as jnp
    from jax.experimental import multihost_utils

    from nemojax.train.checkpointing import Checkpointer
    from nemojax.train.step import TrainState

    reported = []
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", lambda step: reported.append(step))
    ckpt = Checkpointer(tmp_path)
    try:
        ckpt.save(TrainState(jnp.asarray(7, jnp.int32), {"w": jnp.ones(4)}, {"m": jnp.zeros(4)}), {})
        ckpt.wait()
        assert ckpt.all_steps() == [7]
    finally:
        ckpt.close()
    assert reported == []
