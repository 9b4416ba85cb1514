"""Trainer checkpoints: async orbax saves of the TrainState plus the data iterator's position.

Layout (one directory per step, written by `orbax.checkpoint.CheckpointManager`):

    <run_dir>/checkpoints/<step>/params      the weights as a plain nested dict of arrays
                                             (nemojax.load and `init_from` read only this)
    <run_dir>/checkpoints/<step>/opt_state   the optax state
    <run_dir>/checkpoints/<step>/train       JSON: step, consumed tokens, data iterator state,
                                             and checksums of every array saved

Orbax writes each step into a temporary directory and renames it when complete, so a killed
save never looks like a checkpoint. Orbax does not, however, notice a file that was damaged
later (a bit flip reads back silently), so each save records a wrap-around uint32 sum of the
bits of every array.

Restore falls back only on real corruption: a checksum mismatch, or a missing, truncated or
unparsable file (`is_corruption`). Then the step directory is moved to
`<run_dir>/checkpoints_corrupt/` with a warning and the previous checkpoint is tried. Any other
failure (out of memory, permission denied, an I/O error, anything not recognised as corruption)
stops the run with that error and leaves every checkpoint where it is. On several hosts the
decision is collective: each host reports how its own read went, all hosts take the same
decision (any failure -> stop; else any corruption -> set aside; else resume), and only after
that does process 0 move anything. Checkpoints that exist but none of which can be restored
stop the run (`NoRestorableCheckpoint`) instead of silently training from step 0.

The data stream's position (nemojax.data.pretrain) is global -- the same on every process --
so it is saved once, in the `train` JSON, and restores on every host and with any process count.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from nemojax.train.step import TrainState


class CheckpointError(RuntimeError):
    """A checkpoint a user pointed at cannot be used; the message says why."""


def _bits_sum(x: jax.Array) -> jax.Array:
    """Sum of the array's raw bits as uint32 (mod 2**32): changes on any single flipped bit."""
    x = jnp.asarray(x)
    if x.dtype.itemsize == 4:
        u = jax.lax.bitcast_convert_type(x, jnp.uint32)
    elif x.dtype.itemsize == 2:
        u = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    elif x.dtype.itemsize == 1:
        u = jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
    else:  # 8-byte types: fold both halves
        u = jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    return jnp.sum(u.reshape(-1), dtype=jnp.uint32)


_checksum_tree = jax.jit(lambda tree: jax.tree.map(_bits_sum, tree))


def tree_checksums(tree: Any) -> list[int]:
    """Per-leaf bit sums of a pytree of arrays, in leaf order (a few bytes fetched to host)."""
    return [int(v) for v in jax.device_get(jax.tree.leaves(_checksum_tree(tree)))]


def params_to_pure(params: Any) -> dict:
    """nnx.State of Params -> plain nested dict of arrays (the on-disk `params` item)."""
    return params.to_pure_dict() if isinstance(params, nnx.State) else params


def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def state_signature(state: TrainState) -> dict[str, list]:
    """Shapes/dtypes of every saved array, by path: what a compatible restore must match.

    Recorded with each checkpoint so that resuming with a changed model or optimizer structure
    fails with a clear message instead of looking like a corrupt checkpoint.
    """
    def sig(tree: Any) -> list:
        return [[jax.tree_util.keystr(k), list(v.shape), str(v.dtype)]
                for k, v in jax.tree_util.tree_leaves_with_path(tree)]
    return {"params": sig(params_to_pure(state.params)), "opt_state": sig(state.opt_state)}


class IncompatibleCheckpoint(CheckpointError):
    """The run dir's checkpoints were written by a different model/optimizer configuration."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint's contents do not match what was saved (checksums)."""


class CheckpointReadError(CheckpointError):
    """A checkpoint could not be read for a reason other than corruption; nothing was moved."""


class NoRestorableCheckpoint(CheckpointError):
    """Checkpoints exist (or were set aside) but none can be restored."""


# Words of orbax / tensorstore / OS errors that mean "the files are damaged or incomplete".
_CORRUPTION_MARKERS = ("DATA_LOSS", "OUT_OF_RANGE", "Truncated", "truncated", "NOT_FOUND", "does not exist",
                       "was not found in the checkpoint", "checksum", "corrupt")
# ...and that mean "the files may be fine, this attempt failed": these win over the above.
_FATAL_MARKERS = ("RESOURCE_EXHAUSTED", "PERMISSION_DENIED", "Permission denied", "out of memory",
                  "Out of memory", "UNAVAILABLE", "DEADLINE_EXCEEDED", "Input/output error")


def _chain(e: BaseException) -> list[BaseException]:
    out, seen = [], set()
    while e is not None and id(e) not in seen:
        out.append(e)
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return out


def is_corruption(e: BaseException) -> bool:
    """True only for a damaged or incomplete checkpoint: a checksum mismatch, a missing, truncated
    or unparsable file. Out-of-memory, permission and other I/O errors are not corruption."""
    chain = _chain(e)
    text = " ".join(str(x) for x in chain)
    if any(isinstance(x, (MemoryError, PermissionError)) for x in chain) or any(m in text for m in _FATAL_MARKERS):
        return False
    if any(isinstance(x, (CorruptCheckpoint, FileNotFoundError, json.JSONDecodeError)) for x in chain):
        return True
    return any(m in text for m in _CORRUPTION_MARKERS)


OK, CORRUPT, FAILED = 0, 1, 2  # per-host outcome of reading a checkpoint; the worst one wins


def agree(code: int, gather: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[int, list[int]]:
    """(the decision every host takes, the processes that reported it), from each host's `code`.

    One host: its own code. Several: every host's code is gathered (a collective all hosts join),
    so all of them act the same way; a failure anywhere stops all, else corruption anywhere
    sets the checkpoint aside everywhere.
    """
    if gather is None:
        gather = (lambda x: np.asarray(multihost_utils.process_allgather(x))) if jax.process_count() > 1 \
            else (lambda x: x[None])
    codes = np.asarray(gather(np.asarray(code, np.int32))).reshape(-1)
    decision = int(codes.max())
    return decision, [int(i) for i in np.flatnonzero(codes == decision)]


class _Manager(ocp.CheckpointManager):
    """orbax's CheckpointManager, minus its preemption reporting.

    orbax asks JAX's preemption sync manager `reached_preemption_sync_point(step)` while saving
    and again from its save-finalising thread. Each call tells the sync manager where this
    process is, so those global (and, from the thread, stale) steps would mix with the trainer's
    own count; a notice arriving then could set the stop point to a step a process has already
    passed, and it would never stop. The trainer alone reports steps and decides when a
    preemption stops the run (nemojax.train.preemption)."""

    def reached_preemption(self, step: int) -> bool:
        return False


class Checkpointer:
    """Saves and restores trainer checkpoints under `<run_dir>/checkpoints`."""

    def __init__(self, run_dir: str | Path, *, keep: int = 3, use_async: bool = True):
        self.run_dir = Path(run_dir).resolve()
        self.directory = self.run_dir / "checkpoints"
        self.keep = keep
        self.use_async = use_async
        self._open()

    def _open(self) -> None:
        self.manager = _Manager(
            self.directory,
            item_names=("params", "opt_state", "train"),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=self.keep if self.keep > 0 else None,
                enable_async_checkpointing=self.use_async,
                create=True,
            ),
        )

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, state: TrainState, info: dict[str, Any]) -> int:
        """Start an async save of `state` with JSON `info` (data state, tokens...); returns the step.

        Returns once the arrays are copied off the device buffers, so the caller may donate
        `state` to the next step right away; `wait()` blocks until the files are complete.
        """
        step = int(jax.device_get(state.step))
        pure = params_to_pure(state.params)
        meta = dict(info, step=step, saved_at=time.time(), signature=state_signature(state),
                    checksums={"params": tree_checksums(pure), "opt_state": tree_checksums(state.opt_state)})
        items = {"params": ocp.args.StandardSave(pure), "train": ocp.args.JsonSave(meta)}
        if jax.tree.leaves(state.opt_state):  # a stateless optimizer (plain SGD) saves no item
            items["opt_state"] = ocp.args.StandardSave(state.opt_state)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        return step

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def _read_items(self, step: int, items: dict[str, Any]) -> dict[str, Any]:
        """Read items of one step with orbax's handlers directly: unlike CheckpointManager.restore
        this ends in no cross-host barrier, so a host whose read fails never leaves another host
        waiting inside orbax while it joins the agreement collective (which would then pair with
        orbax's barrier and exchange garbage)."""
        handler = ocp.CompositeCheckpointHandler()
        try:
            return dict(handler.restore(self.directory / str(step), args=ocp.args.Composite(**items)))
        finally:
            handler.close()

    def _check_signature(self, step: int, template: TrainState) -> None:
        head = self._read_items(step, {"train": ocp.args.JsonRestore()})
        saved_sig = head["train"].get("signature")
        if saved_sig is None:
            return
        want = state_signature(template)
        for part in ("params", "opt_state"):
            if saved_sig[part] != want[part]:
                diff = next((f"{a} vs {b}" for a, b in zip(saved_sig[part], want[part]) if a != b),
                            f"{len(saved_sig[part])} arrays saved vs {len(want[part])} expected")
                raise IncompatibleCheckpoint(
                    f"{self.directory / str(step)} holds a {part} structure this config does not "
                    f"produce (first difference, saved vs now: {diff}). The model or optimizer "
                    f"config changed since it was written: restore the old config, use a new "
                    f"run_dir, or start from its weights with init_from={self.run_dir}")

    def _read_step(self, step: int, template: TrainState) -> dict[str, Any]:
        """This host's part of reading a checkpoint (no cross-host collectives)."""
        pure_t = params_to_pure(template.params)
        self._check_signature(step, template)
        items = {"params": ocp.args.StandardRestore(_abstract(pure_t)), "train": ocp.args.JsonRestore()}
        if jax.tree.leaves(template.opt_state):
            items["opt_state"] = ocp.args.StandardRestore(_abstract(template.opt_state))
        out = self._read_items(step, items)
        out.setdefault("opt_state", template.opt_state)
        return out

    def _verify(self, out: dict[str, Any]) -> None:
        """Recompute the checksums (a collective over all hosts' shards) and compare."""
        sums = out["train"].get("checksums") or {}
        for name in ("params", "opt_state"):
            if name in sums and tree_checksums(out[name]) != list(sums[name]):
                raise CorruptCheckpoint(f"{name} do not match the checksums recorded when saving")

    def _to_state(self, out: dict[str, Any], template: TrainState) -> tuple[TrainState, dict]:
        meta = dict(out["train"])
        params = template.params
        if isinstance(params, nnx.State):
            params = jax.tree.map(lambda x: x, params)  # a copy whose leaves we replace
            params.replace_by_pure_dict(out["params"])
        else:
            params = out["params"]
        opt_state = jax.tree.unflatten(jax.tree.structure(template.opt_state),
                                       jax.tree.leaves(out["opt_state"]))
        step_arr = jnp.asarray(meta["step"], jnp.int32)
        sharding = getattr(template.step, "sharding", None)
        state = TrainState(jax.device_put(step_arr, sharding) if sharding is not None else step_arr,
                           params, opt_state)
        return state, meta

    @property
    def corrupt_dir(self) -> Path:
        return self.run_dir / "checkpoints_corrupt"

    def _set_aside(self, step: int, why: str) -> None:
        dest = self.corrupt_dir / f"{step}-{int(time.time())}"
        print(f"WARNING: checkpoint {self.directory / str(step)} is corrupt or incomplete ({why}); "
              f"moving it to {dest} and trying the previous one", file=sys.stderr, flush=True)
        if jax.process_index() == 0:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), str(dest))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"nemojax_set_aside_{step}")
        self.manager.close()
        self._open()

    def restore_latest(self, template: TrainState,
                       gather: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[TrainState, dict] | None:
        """The newest checkpoint that reads back intact; None only when the run has never saved one.

        See the module docstring for what counts as corruption and how hosts agree. Raises
        IncompatibleCheckpoint (another config wrote them), CheckpointReadError (a non-corruption
        failure; nothing moved) or NoRestorableCheckpoint (checkpoints exist, none restorable).
        `gather` replaces the cross-host exchange (tests).
        """
        steps = self.all_steps()
        for step in reversed(steps):
            code, err, out = OK, None, None
            try:
                out = self._read_step(step, template)
            except IncompatibleCheckpoint:
                raise
            except Exception as e:  # noqa: BLE001 - classified below
                code, err = (CORRUPT if is_corruption(e) else FAILED), e
            decision, who = agree(code, gather)
            if decision == OK:
                try:
                    self._verify(out)  # collective: every host computes the same global sums
                except CorruptCheckpoint as e:
                    decision, err, who = CORRUPT, e, list(range(jax.process_count()))
            if decision == FAILED:
                where = self.directory / str(step)
                if err is not None and code == FAILED:
                    raise CheckpointReadError(
                        f"could not read checkpoint {where} ({type(err).__name__}: {_first_line(err)}). This "
                        f"is not corruption (it may be memory, permissions or storage), so the checkpoint "
                        f"was left in place; fix the cause and rerun to resume") from err
                raise CheckpointReadError(
                    f"process(es) {who} could not read checkpoint {where} for a reason other than corruption "
                    f"(see their log); the checkpoint was left in place. Fix the cause and rerun to resume")
            if decision == CORRUPT:
                why = f"{type(err).__name__}: {_first_line(err)}" if err is not None \
                    else f"reported by process(es) {who}"
                self._set_aside(step, why)
                continue
            return self._to_state(out, template)
        set_aside = sorted(p.name for p in self.corrupt_dir.iterdir()) if self.corrupt_dir.is_dir() else []
        if steps or set_aside:
            raise NoRestorableCheckpoint(
                f"{self.run_dir} has checkpoints but none can be restored: {len(set_aside)} were set aside as "
                f"corrupt in {self.corrupt_dir} ({', '.join(set_aside)}). Refusing to train from step 0 over "
                f"them; to start afresh, move that directory away (or use a new run_dir)")
        return None


def _first_line(e: BaseException) -> str:
    # The innermost cause usually says what happened (orbax wraps tensorstore's message).
    for x in reversed(_chain(e)):
        text = str(x).strip()
        if text:
            return text.splitlines()[0][:300]
    return type(e).__name__


def read_data_state(path: str | Path) -> dict | None:
    """The data-stream position saved with a training checkpoint (a run dir or a step dir), or
    None for anything else (a model checkpoint, a Hugging Face directory, no checkpoint)."""
    from nemojax.checkpoint import resolve_checkpoint

    try:
        kind, params_dir, _ = resolve_checkpoint(path)
    except FileNotFoundError:
        return None
    step_dir = params_dir.parent
    if kind != "nemojax" or not step_dir.name.isdigit() or not (step_dir / "train").is_dir():
        return None
    mngr = ocp.CheckpointManager(step_dir.parent, item_names=("train",))
    try:
        head = mngr.restore(int(step_dir.name), args=ocp.args.Composite(train=ocp.args.JsonRestore()))
    finally:
        mngr.close()
    return head["train"].get("data_state")


# --------------------------------------------------------------------------- weights only


def load_init_weights(path: str | Path, model_cfg: Any, sharding: Any = None) -> dict:
    """Weights for `init_from` (continued pretraining), as a plain nested dict of arrays.

    Accepts whatever `nemojax.checkpoint.resolve_checkpoint` does: a trainer run dir (its
    latest step), a step dir, a nemojax model checkpoint, or a Hugging Face Nemotron dir.
    Only the weights are read -- never the optimizer state or the step -- and their shapes
    must match this run's model config (a mismatch names the offending parameter).
    """
    from nemojax.checkpoint import load_params, resolve_checkpoint

    try:
        kind, where, _ = resolve_checkpoint(path)
    except FileNotFoundError as e:
        raise CheckpointError(f"init_from={str(path)!r}: {e}") from None
    if kind == "hf":
        from nemojax.convert.hf import load_hf_model

        model = load_hf_model(where, param_dtype=model_cfg.param_dtype, sharding=sharding, progress=False)
        return nnx.state(model, nnx.Param).to_pure_dict()
    return load_params(where, model_cfg, sharding=sharding)
