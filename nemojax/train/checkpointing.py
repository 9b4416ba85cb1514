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
bits of every array; a restore that does not reproduce them, or that fails to read, is treated
as corrupt: the step directory is moved to `<run_dir>/checkpoints_corrupt/` with a warning and
the previous checkpoint is tried. Nothing good is ever deleted except by `max_to_keep`.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

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


class Checkpointer:
    """Saves and restores trainer checkpoints under `<run_dir>/checkpoints`."""

    def __init__(self, run_dir: str | Path, *, keep: int = 3, use_async: bool = True):
        self.run_dir = Path(run_dir).resolve()
        self.directory = self.run_dir / "checkpoints"
        self.keep = keep
        self.use_async = use_async
        self._open()

    def _open(self) -> None:
        self.manager = ocp.CheckpointManager(
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
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(pure),
            opt_state=ocp.args.StandardSave(state.opt_state),
            train=ocp.args.JsonSave(meta),
        ), force=True)
        return step

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def _restore_step(self, step: int, template: TrainState) -> tuple[TrainState, dict]:
        pure_t = params_to_pure(template.params)
        head = self.manager.restore(step, args=ocp.args.Composite(train=ocp.args.JsonRestore()))
        saved_sig = head["train"].get("signature")
        if saved_sig is not None:
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
        out = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(pure_t)),
            opt_state=ocp.args.StandardRestore(_abstract(template.opt_state)),
            train=ocp.args.JsonRestore(),
        ))
        meta = dict(out["train"])
        sums = meta.get("checksums") or {}
        for name, tree in (("params", out["params"]), ("opt_state", out["opt_state"])):
            if name in sums and tree_checksums(tree) != list(sums[name]):
                raise CheckpointError(f"{name} do not match the checksums recorded when saving")
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

    def restore_latest(self, template: TrainState) -> tuple[TrainState, dict] | None:
        """The newest checkpoint that reads back intact, or None when there is none.

        An unreadable or checksum-failing step is moved aside with a warning on stderr (so a
        later save of the same step number does not collide with it) and the one before it
        is tried.
        """
        for step in reversed(self.all_steps()):
            try:
                return self._restore_step(step, template)
            except IncompatibleCheckpoint:
                raise
            except Exception as e:  # noqa: BLE001 - any failure to read means "corrupt"
                msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
                dest = self.run_dir / "checkpoints_corrupt" / f"{step}-{int(time.time())}"
                print(f"WARNING: checkpoint {self.directory / str(step)} is corrupt or incomplete "
                      f"({type(e).__name__}: {msg}); moving it to {dest} and trying the previous one",
                      file=sys.stderr, flush=True)
                if jax.process_index() == 0:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(str(self.directory / str(step)), str(dest))
                self.manager.close()
                self._open()
        return None


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


def numpy_equal(a: Any, b: Any) -> bool:
    """Bitwise equality of two pytrees of arrays (used by tests and sanity checks)."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))
