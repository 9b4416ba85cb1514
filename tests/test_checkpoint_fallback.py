"""When a checkpoint does not restore: fall back only on real corruption, agree across hosts,
never train from step 0 over checkpoints that exist.

A small TrainState is saved a few times with the real Checkpointer (no training needed); the
files are then damaged (a flipped bit, a truncated or deleted file), or a read failure that is
NOT corruption (out of memory, permission denied, an I/O error) is injected where orbax reads.
The multi-host decision is exercised through `restore_latest(gather=...)`, which stands in for
the all-gather of every host's outcome.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax.train import checkpointing
from nemojax.train.checkpointing import (CheckpointReadError, Checkpointer, NoRestorableCheckpoint, agree,
                                         is_corruption)
from nemojax.train.step import TrainState


def _state(step: int) -> TrainState:
    w = jnp.arange(4096, dtype=jnp.float32).reshape(64, 64) * (step + 1)
    return TrainState(jnp.asarray(step, jnp.int32), {"w": w, "b": jnp.ones(64) * step},
                      {"mu": jnp.zeros((64, 64)) + step})


TEMPLATE = jax.eval_shape(lambda: _state(0))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ckpt") / "run"
    ck = Checkpointer(run, keep=5, use_async=False)
    for step in (2, 4, 6):
        ck.save(_state(step), {"data_state": {"rows": step}})
    ck.close()
    return run


def _copy(saved: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(saved, run)
    return run


def _biggest(step_dir: Path) -> Path:
    return max((step_dir / "params").rglob("d/*"), key=lambda p: p.stat().st_size)


def _snapshot(run: Path) -> dict[str, int]:
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in (run / "checkpoints").rglob("*") if p.is_file()}


def _restore(run: Path, **kw):
    ck = Checkpointer(run, keep=5)
    try:
        return ck.restore_latest(TEMPLATE, **kw)
    finally:
        ck.close()


def test_intact_latest_is_restored(saved, tmp_path) -> None:
    state, meta = _restore(_copy(saved, tmp_path))
    assert meta["step"] == 6 and meta["data_state"] == {"rows": 6}
    np.testing.assert_array_equal(np.asarray(state.params["w"]), np.asarray(_state(6).params["w"]))


@pytest.mark.parametrize("damage", ["bitflip", "truncate", "delete_file", "delete_item"])
def test_real_corruption_falls_back_to_the_previous_step(saved, tmp_path, damage, capsys) -> None:
    run = _copy(saved, tmp_path)
    step6 = run / "checkpoints" / "6"
    f = _biggest(step6)
    if damage == "bitflip":  # orbax reads it back silently: only the checksum notices
        raw = bytearray(f.read_bytes())
        raw[len(raw) // 2] ^= 0x10
        f.write_bytes(bytes(raw))
    elif damage == "truncate":
        with f.open("r+b") as fh:
            fh.truncate(f.stat().st_size // 2)
    elif damage == "delete_file":
        f.unlink()
    else:
        shutil.rmtree(step6 / "opt_state")
    state, meta = _restore(run)
    assert meta["step"] == 4
    err = capsys.readouterr().err
    assert "WARNING: checkpoint" in err and "corrupt or incomplete" in err
    assert [p.name.split("-")[0] for p in (run / "checkpoints_corrupt").iterdir()] == ["6"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]


@pytest.mark.parametrize("failure", [
    MemoryError("out of memory while restoring"),
    PermissionError(errno.EACCES, "Permission denied", "params/d/0"),
    OSError(errno.EIO, "Input/output error"),
    RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 12 GiB on device"),
    ValueError("PERMISSION_DENIED: Error reading local file"),
    RuntimeError("something nobody has seen before"),
], ids=["memory", "permission", "io", "device_oom", "ts_permission", "unknown"])
def test_other_failures_stop_and_move_nothing(saved, tmp_path, monkeypatch, failure) -> None:
    run = _copy(saved, tmp_path)
    before = _snapshot(run)

    def fail(self, step, template):
        raise failure

    monkeypatch.setattr(Checkpointer, "_read_step", fail)
    with pytest.raises(CheckpointReadError, match="left in place") as e:
        _restore(run)
    assert "checkpoints/6" in str(e.value)
    assert _snapshot(run) == before and not (run / "checkpoints_corrupt").exists()


def test_classification_of_real_error_texts() -> None:
    def chained(outer: str, inner: Exception) -> Exception:
        try:
            try:
                raise inner
            except Exception as cause:
                raise Exception(outer) from cause
        except Exception as e:  # noqa: BLE001
            return e

    read = "Encountered error while reading array index: (slice(0, 100, 1),)."
    assert is_corruption(chained(read, ValueError('OUT_OF_RANGE: Error reading "w/0.0" in OCDBT database: '
                                                  'Requested byte range [0, 268713) is not valid')))
    assert is_corruption(chained(read, ValueError("FAILED_PRECONDITION: Error reading \"w/0.0\": Truncated "
                                                  "Zstd-compressed stream; at byte 0")))
    assert is_corruption(KeyError('Item "params" was not found in the checkpoint.'))
    assert is_corruption(checkpointing.CorruptCheckpoint("params do not match the checksums"))
    assert not is_corruption(chained(read, ValueError("RESOURCE_EXHAUSTED: Out of memory")))
    assert not is_corruption(chained(read, PermissionError(errno.EACCES, "denied")))


def test_hosts_agree_before_anything_moves(saved, tmp_path) -> None:
    # This host read step 6 fine, another host found it corrupt: everyone sets it aside.
    run = _copy(saved, tmp_path)
    outcomes = iter([np.array([0, 1]), np.array([0, 0])])
    state, meta = _restore(run, gather=lambda code: next(outcomes))
    assert meta["step"] == 4 and [p.name.split("-")[0] for p in (run / "checkpoints_corrupt").iterdir()] == ["6"]
    # Another host failed for another reason: everyone stops, nothing is moved.
    run2 = tmp_path / "run2"
    shutil.copytree(saved, run2)
    before = _snapshot(run2)
    with pytest.raises(CheckpointReadError, match=r"process\(es\) \[1\] could not read"):
        _restore(run2, gather=lambda code: np.array([0, 2]))
    assert _snapshot(run2) == before and not (run2 / "checkpoints_corrupt").exists()
    # The decision itself: the worst outcome wins, and says who reported it.
    assert agree(0, lambda c: np.array([0, 0, 0])) == (0, [0, 1, 2])
    assert agree(0, lambda c: np.array([1, 0, 1])) == (1, [0, 2])
    assert agree(1, lambda c: np.array([1, 2, 0])) == (2, [1])


def test_none_restorable_stops_instead_of_training_from_scratch(saved, tmp_path) -> None:
    run = _copy(saved, tmp_path)
    for step in (2, 4, 6):
        f = _biggest(run / "checkpoints" / str(step))
        with f.open("r+b") as fh:
            fh.truncate(1)
    with pytest.raises(NoRestorableCheckpoint, match="none can be restored"):
        _restore(run)
    assert len(list((run / "checkpoints_corrupt").iterdir())) == 3
    # Rerunning does not quietly start over either: the set-aside checkpoints still count.
    with pytest.raises(NoRestorableCheckpoint, match="move that directory away"):
        _restore(run)
    shutil.rmtree(run / "checkpoints_corrupt")
    assert _restore(run) is None  # an empty run dir: a fresh start is right
