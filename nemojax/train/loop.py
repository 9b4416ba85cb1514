"""The pretraining loop: data -> jitted step -> metrics, evaluation, checkpoints, resume.

One `Trainer` runs one config in one run directory:

    <run_dir>/config.yaml         the resolved config (what was actually run)
    <run_dir>/metrics.jsonl       one JSON object per logged step (step, loss, lr, tokens/s, MFU...)
    <run_dir>/tensorboard/        the same scalars as TensorBoard event files
    <run_dir>/checkpoints/<step>/ orbax checkpoints (see nemojax.train.checkpointing)

Restarting with the same run_dir resumes from the newest intact checkpoint, bit for bit:
the state, the data stream position and the (step-determined) batch ramp-up are restored, so
the resumed losses equal those of an uninterrupted run. SIGTERM/SIGINT finish the current
step, save, and exit 0. A non-finite loss or gradient norm stops the run (exit code
EXIT_NONFINITE) without saving the bad state.

The hot loop never waits on the device except where it must: metrics are fetched every
`log_every` steps, the non-finite check is a device-side flag read at those points and
before any save, and the step is jitted once per distinct batch shape (one per ramp-up stage)
with the state donated.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nemojax.config import Config, ConfigError, save_config
from nemojax.train.checkpointing import CheckpointError, Checkpointer, load_init_weights
from nemojax.train.metrics import MetricsWriter, ThroughputMeter, format_progress, peak_flops_per_device
from nemojax.train.optim import learning_rate_schedule
from nemojax.train.rampup import BatchSchedule
from nemojax.train.step import TrainState, lm_loss_sums, make_train_step

EXIT_OK = 0
EXIT_NONFINITE = 3

# Test hook: SIGKILL this process right after the checkpoint of this step is complete on disk,
# to simulate a preemption with no chance to clean up (tests/test_resume.py).
KILL_AFTER_SAVE_ENV = "NEMOJAX_TEST_KILL_AFTER_SAVE"

BatchFactory = Callable[..., Iterator[dict[str, np.ndarray]]]


@dataclasses.dataclass
class TrainResult:
    """How a run ended: exit code, last completed step, why, and the last logged metrics."""

    exit_code: int
    step: int
    reason: str  # completed | signal | nonfinite
    metrics: dict[str, Any]
    run_dir: Path


def _default_batch_factory() -> BatchFactory:
    from nemojax.data.pretrain import make_batch_iterator

    return make_batch_iterator


class Trainer:
    """Builds everything for `cfg` and runs `cfg.steps` steps (see the module docstring).

    batch_factory: a `make_batch_iterator`-compatible callable (tests inject synthetic data).
    devices: the devices of the mesh (default: all), e.g. one device for a quick local run.
    log: where console lines go (stdout by default; only process 0 prints).
    """

    def __init__(self, cfg: Config, *, batch_factory: BatchFactory | None = None,
                 log: Callable[[str], None] | None = None, devices: Sequence[Any] | None = None):
        self.cfg = cfg
        self.devices = devices
        self.run_dir = Path(cfg.run_dir).absolute()
        self.batch_factory = batch_factory or _default_batch_factory()
        self._print = log or (lambda s: print(s, flush=True))
        self.process_index, self.process_count = jax.process_index(), jax.process_count()
        self.schedule = BatchSchedule(cfg.data, process_count=self.process_count)
        self._stop_signal: str | None = None
        self._build()

    # ------------------------------------------------------------------ setup

    def log(self, msg: str) -> None:
        if self.process_index == 0:
            self._print(msg)

    def _build(self) -> None:
        from jax.sharding import NamedSharding, PartitionSpec

        from nemojax.parallel.mesh import make_mesh
        from nemojax.parallel.rules import use_rules
        from nemojax.parallel.sharded_train import build_sharded_training

        cfg = self.cfg
        self.mesh = make_mesh(cfg.mesh, self.devices)
        loss_sums = lm_loss_sums
        if cfg.mesh.pipeline > 1:
            from nemojax.parallel.pipeline import make_pipeline_loss_sums

            loss_sums = make_pipeline_loss_sums(cfg.mesh.pipeline, cfg.mesh.virtual_stages,
                                                cfg.mesh.microbatches, self.mesh)
        self.st = build_sharded_training(cfg, self.mesh, loss_sums=loss_sums, total_steps=cfg.steps)
        self.lr_schedule = learning_rate_schedule(cfg.optimizer, cfg.steps)
        divisor = self.st.batch_divisor * self.process_count
        for acc, micro in self.schedule.distinct_shapes():
            if micro % divisor:
                raise ConfigError(f"micro batch {micro} (data.micro_batch_size, or a ramp-up batch size when "
                                  f"it is 0) is not divisible by {divisor}, the devices the batch is split over")
        inner = make_train_step(self.st.graphdef, self.st.tx, loss_sums)
        mesh, rules, lr_fn = self.mesh, self.st.rules, self.lr_schedule
        replicated = NamedSharding(mesh, PartitionSpec())

        def train_step(state: TrainState, batch: dict, first_bad: jax.Array):
            lr = lr_fn(state.step)
            with use_rules(mesh, rules):
                new_state, m = inner(state, batch)
            ok = jnp.isfinite(m["loss"]) & jnp.isfinite(m["grad_norm"])
            first_bad = jnp.where((first_bad < 0) & ~ok, new_state.step, first_bad)
            return new_state, dict(m, learning_rate=lr), first_bad

        self.train_step = jax.jit(
            train_step, in_shardings=(self.st.state_shardings, self.st.batch_sharding, replicated),
            out_shardings=(self.st.state_shardings, replicated, replicated), donate_argnums=0)

        graphdef = self.st.graphdef

        def eval_step(params: Any, batch: dict) -> tuple[jax.Array, jax.Array]:
            with use_rules(mesh, rules):
                sums = jax.lax.map(lambda mb: loss_sums(graphdef, params, mb), batch)
            return jnp.sum(sums[0]), jnp.sum(sums[1])

        self.eval_step = jax.jit(eval_step, in_shardings=(self.st.state_shardings.params, self.st.batch_sharding),
                                 out_shardings=replicated)
        self._replicated = replicated
        self.meter = ThroughputMeter(cfg.model, cfg.data.seq_len, num_devices=self.mesh.devices.size,
                                     peak_flops=peak_flops_per_device(self.mesh.devices.flat[0], cfg.peak_tflops))

    def _abstract_state(self) -> TrainState:
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            self.st.abstract_state, self.st.state_shardings)

    def _initial_state(self, ckpt: Checkpointer) -> tuple[TrainState, dict | None]:
        """Resume (latest intact checkpoint) > init_from (weights only) > fresh init."""
        restored = ckpt.restore_latest(self._abstract_state())
        if restored is not None:
            state, meta = restored
            self.log(f"resumed from {ckpt.directory / str(meta['step'])} (step {meta['step']}, "
                     f"{meta.get('tokens', 0):,} tokens consumed)")
            return state, meta
        if self.cfg.init_from:
            shardings = self.st.state_shardings.params.to_pure_dict()
            try:
                pure = load_init_weights(self.cfg.init_from, self.cfg.model, sharding=shardings)
            except CheckpointError:
                raise
            except (FileNotFoundError, ValueError, RuntimeError) as e:
                raise CheckpointError(f"init_from={self.cfg.init_from!r}: {e}") from None
            params = jax.tree.map(lambda x: x, self.st.abstract_state.params)
            params.replace_by_pure_dict(pure)
            opt_state = jax.jit(self.st.tx.init, out_shardings=self.st.state_shardings.opt_state)(params)
            step = jax.device_put(jnp.zeros((), jnp.int32), self.st.state_shardings.step)
            self.log(f"initialised weights from {self.cfg.init_from} (fresh optimizer state, step 0)")
            return TrainState(step, params, opt_state), None
        return self.st.init_state(self.cfg.seed), None

    # ------------------------------------------------------------------ data

    def _train_iterator(self, step: int, data_state: dict | None):
        it = self.batch_factory(self.cfg.data, split="train", batch_size=self.schedule.batch_size(step),
                                seq_len=self.cfg.data.seq_len, seed=self.cfg.data.shuffle_seed,
                                process_index=self.process_index, process_count=self.process_count)
        if data_state is not None:
            it.set_state(data_state)
        return it

    def _device_batch(self, host: dict[str, np.ndarray], accum: int) -> dict[str, jax.Array]:
        """[local_batch, seq] numpy -> [accum, micro/processes, seq] global arrays."""
        local = {k: np.asarray(v).reshape(accum, -1, *np.shape(v)[1:]) for k, v in host.items()}
        return self.st.global_batch(local)

    def _eval_batches(self) -> list[dict[str, jax.Array]]:
        """The validation set: the first eval_batches batches of the validation stream, kept
        on device so every evaluation sees exactly the same tokens."""
        if self.cfg.eval_batches <= 0 or self.cfg.eval_every <= 0:
            return []
        bs = self.cfg.data.micro_batch_size or self.cfg.data.global_batch_size
        try:
            it = self.batch_factory(self.cfg.data, split="validation", batch_size=bs,
                                    seq_len=self.cfg.data.seq_len, seed=self.cfg.data.shuffle_seed,
                                    process_index=self.process_index, process_count=self.process_count)
        except ConfigError as e:
            self.log(f"no validation: {e}")
            return []
        return [self._device_batch(next(it), 1) for _ in range(self.cfg.eval_batches)]

    def evaluate(self, params: Any, batches: list[dict[str, jax.Array]]) -> float | None:
        if not batches:
            return None
        nll = cnt = 0.0
        for b in batches:
            s, c = jax.device_get(self.eval_step(params, b))
            nll, cnt = nll + float(s), cnt + float(c)
        return nll / max(cnt, 1.0)

    # ------------------------------------------------------------------ signals

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self._stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the final save
        self._stop_signal = signal.Signals(signum).name

    def _should_stop(self, step: int, ckpt: Checkpointer) -> bool:
        """Stop after this step? One process: our own signal flag. Several: JAX's preemption
        sync point, so every host stops (and joins the collective save) at the same step."""
        if self.process_count > 1:
            return bool(ckpt.manager.reached_preemption(step))
        return self._stop_signal is not None

    def _install_signals(self) -> dict[int, Any]:
        old = {}
        try:
            for s in (signal.SIGTERM, signal.SIGINT):
                old[s] = signal.signal(s, self._on_signal)
        except ValueError:  # not the main thread: leave the defaults alone
            pass
        return old

    # ------------------------------------------------------------------ the loop

    def run(self) -> TrainResult:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ckpt = Checkpointer(self.run_dir, keep=cfg.keep_checkpoints)
        old_handlers = self._install_signals()
        writer = None
        try:
            state, meta = self._initial_state(ckpt)
            start = int(meta["step"]) if meta else 0
            if self.process_index == 0:  # after the restore: a refused resume leaves the old copy
                save_config(cfg, self.run_dir / "config.yaml")
            writer = MetricsWriter(self.run_dir, resume_step=start) if self.process_index == 0 else None
            return self._loop(state, start, meta, ckpt, writer)
        finally:
            ckpt.close()
            if writer is not None:
                writer.close()
            for s, h in old_handlers.items():
                signal.signal(s, h)

    def _loop(self, state: TrainState, start: int, meta: dict | None, ckpt: Checkpointer,
              writer: MetricsWriter | None) -> TrainResult:
        cfg, sched = self.cfg, self.schedule
        total = cfg.steps
        eval_batches = self._eval_batches()
        it = self._train_iterator(start, meta.get("data_state") if meta else None)
        it_batch = sched.batch_size(start)
        first_bad = jax.device_put(jnp.asarray(-1, jnp.int32), self._replicated)
        last_saved = start if meta else -1
        kill_after = int(os.environ.get(KILL_AFTER_SAVE_ENV, "0") or 0)
        last_metrics: dict[str, Any] = {}
        n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(self.st.abstract_state.params))
        self.log(f"training {n_params / 1e6:.2f}M parameters on {self.mesh.devices.size} "
                 f"{self.mesh.devices.flat[0].device_kind} device(s), steps {start}->{total}, "
                 f"batch {sched.batch_size(start)} x {cfg.data.seq_len} tokens, run_dir {self.run_dir}")

        def check_finite(step: int) -> int | None:
            bad = int(jax.device_get(first_bad))
            return bad if bad >= 0 else None

        def save(step: int) -> None:
            nonlocal last_saved
            info = {"tokens": sched.tokens_before(step), "data_state": it.get_state(),
                    "batch_size": sched.batch_size(max(step - 1, 0))}
            ckpt.save(state, info)
            last_saved = step
            if kill_after and step == kill_after:
                ckpt.wait()
                self.log(f"test hook: SIGKILL after the checkpoint of step {step}")
                os.kill(os.getpid(), signal.SIGKILL)

        def stop_nonfinite(bad: int) -> TrainResult:
            good = max(ckpt.all_steps(), default=None)
            where = f"step {good} in {ckpt.directory / str(good)}" if good is not None else "none"
            msg = (f"ERROR: the loss or gradient norm became non-finite (NaN/Inf) at step {bad}; training "
                   f"stopped without saving this state. Last good checkpoint: {where}. Lower "
                   f"optimizer.learning_rate, raise warmup_steps, or check the data, then rerun to resume.")
            print(msg, file=sys.stderr, flush=True)
            ckpt.wait()
            return TrainResult(EXIT_NONFINITE, bad, "nonfinite", last_metrics, self.run_dir)

        step = start
        t_mark, tok_mark = None, 0  # throughput window; opened after the first (compiling) step
        shape_seen: set[tuple[int, int]] = set()
        while step < total:
            bs = sched.batch_size(step)
            if bs != it_batch:  # ramp-up stage boundary: same stream, new batch size
                data_state = it.get_state()
                getattr(it, "close", lambda: None)()
                it = self._train_iterator(step, data_state)
                it_batch = bs
                self.log(f"batch ramp-up: global batch {bs} from step {step + 1} "
                         f"({sched.tokens_before(step):,} tokens consumed)")
            accum = sched.accum_steps(step)
            shape = (accum, sched.micro_batch(step))
            batch = self._device_batch(next(it), accum)
            state, metrics, first_bad = self.train_step(state, batch, first_bad)
            step += 1
            tok_mark += bs * cfg.data.seq_len
            if shape not in shape_seen:  # exclude compilation from the throughput window
                shape_seen.add(shape)
                jax.block_until_ready(metrics["loss"])
                t_mark, tok_mark = time.perf_counter(), 0
            do_log = step % max(cfg.log_every, 1) == 0 or step == total
            do_eval = bool(eval_batches) and (step % max(cfg.eval_every, 1) == 0 or step == total)
            do_save = (cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0) or step == total
            if do_log or do_eval:
                host = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                rec: dict[str, Any] = {"loss": host["loss"], "grad_norm": host["grad_norm"],
                                       "learning_rate": host["learning_rate"], "batch_size": bs,
                                       "tokens": sched.tokens_before(step)}
                if t_mark is not None and tok_mark > 0:
                    rec.update(self.meter(tok_mark, now - t_mark))
                else:
                    rec.update(tokens_per_sec=None, tflops_per_device=None, mfu=None)
                bad = check_finite(step)
                if bad is None and do_eval:
                    rec["val_loss"] = self.evaluate(state.params, eval_batches)
                if writer is not None:
                    writer.write(step, rec)
                last_metrics = {"step": step, **rec}
                self.log(format_progress(step, total, rec))
                if bad is not None:
                    return stop_nonfinite(bad)
                t_mark, tok_mark = time.perf_counter(), 0
            if do_save and last_saved != step:
                bad = check_finite(step)
                if bad is not None:
                    return stop_nonfinite(bad)
                save(step)
                t_mark, tok_mark = time.perf_counter(), 0
            if self._should_stop(step, ckpt):
                bad = check_finite(step)
                if bad is not None:
                    return stop_nonfinite(bad)
                if last_saved != step:
                    save(step)
                ckpt.wait()
                self.log(f"received {self._stop_signal or 'a preemption notice'}: saved checkpoint of step {step} in "
                         f"{ckpt.directory / str(step)}; exiting. Rerun the same command to resume.")
                return TrainResult(EXIT_OK, step, "signal", last_metrics, self.run_dir)
        ckpt.wait()
        bad = check_finite(step)
        if bad is not None:
            return stop_nonfinite(bad)
        self.log(f"done: {step} steps, {sched.tokens_before(step):,} tokens; checkpoints in {ckpt.directory}")
        return TrainResult(EXIT_OK, step, "completed", last_metrics, self.run_dir)


def train(cfg: Config, **kwargs: Any) -> TrainResult:
    """Run `cfg` (see Trainer); returns how it ended."""
    return Trainer(cfg, **kwargs).run()
