"""The training loop: data -> jitted step -> metrics, evaluation, checkpoints, resume.

One `Trainer` runs one config in one run directory:

    <run_dir>/config.yaml         the resolved config (what was actually run)
    <run_dir>/metrics.jsonl       one JSON object per logged step (step, loss, lr, tokens/s, MFU...)
    <run_dir>/tensorboard/        the same scalars as TensorBoard event files
    <run_dir>/checkpoints/<step>/ orbax checkpoints (see nemojax.train.checkpointing)

The step comes from `nemojax.train.build.build_training` (the same function `nemojax compile`
and the throughput benchmark use); the objective, model and batch fields from a `TrainTask`
(pretraining by default), the data from a `batch_factory` (nemojax.data.pretrain's by default).

Multi-host: every process runs this loop. Each asks its batch factory for exactly the rows of
the global batch its devices hold (`Training.rows`, read off the batch sharding: replicas of a
data shard load the same rows), so the global batch is the single-process one for any layout.
The data-stream position is global, saved once with each checkpoint, and restores on every
host, with any process count.

Restarting with the same run_dir resumes from the newest intact checkpoint, bit for bit:
the state, the data stream position and the (step-determined) batch ramp-up are restored, so
the resumed losses equal those of an uninterrupted run. SIGTERM/SIGINT finish the current
step, save, and exit 0; on several hosts a signal to any process stops every process after the
same step, and all of them write the one checkpoint (nemojax.train.preemption). A non-finite
loss or gradient norm stops the run (exit code EXIT_NONFINITE) without saving the bad state.

The hot loop never waits on the device except where it must: metrics are fetched every
`log_every` steps, the non-finite check is a device-side flag read at those points and
before any save, and the step is jitted once per distinct batch shape (one per ramp-up stage)
with the state donated.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nemojax.config import Config, ConfigError, save_config
from nemojax.train.build import PRETRAIN, TrainTask, Training, build_training
from nemojax.train.checkpointing import CheckpointError, Checkpointer, read_data_state
from nemojax.train.metrics import MetricsWriter, ThroughputMeter, format_progress, peak_flops_per_device
from nemojax.train.preemption import StopSignals
from nemojax.train.rampup import BatchSchedule
from nemojax.train.step import TrainState

EXIT_OK = 0
EXIT_NONFINITE = 3

# A batch factory is called like nemojax.data.pretrain.make_batch_iterator:
#   factory(data_cfg, split=, batch_size=, seq_len=, seed=, rows=) -> iterator of dicts of
#   [len(rows), ...] numpy arrays (this process' rows of each global batch, in `rows` order)
# with get_state() / set_state(state) for resume (JSON-ready dicts) and, optionally,
# continue_from(state, mode) for a new stage (data.stage_start).
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


@jax.jit
def _track_nonfinite(first_bad: jax.Array, finite: jax.Array, step: jax.Array) -> jax.Array:
    """The first step whose loss or gradient norm was non-finite (-1: none), kept on device."""
    return jnp.where((first_bad < 0) & ~finite, step, first_bad)


class Trainer:
    """Builds everything for `cfg` and runs `cfg.steps` steps (see the module docstring).

    task: what is trained (model, objective, batch fields, trainable params; default pretraining).
    batch_factory: the data (default: the pretraining pipeline; tests inject synthetic data).
    devices: the devices of the mesh (default: all), e.g. one device for a quick local run.
    log: where console lines go (stdout by default; only process 0 prints).
    validate: a stage's own evaluation, `validate(training, params) -> {metric: value}` (e.g. a
        reward model's per-attribute Pearson); when given it replaces the built-in validation
        loss at every `eval_every` step and its metrics are logged with the step's.
    progress: formats the console line from (step, total, metrics); default `format_progress`.
    """

    def __init__(self, cfg: Config, *, task: TrainTask = PRETRAIN, batch_factory: BatchFactory | None = None,
                 log: Callable[[str], None] | None = None, devices: Sequence[Any] | None = None,
                 validate: Callable[[Training, Any], dict[str, Any]] | None = None,
                 progress: Callable[[int, int, dict[str, Any]], str] = format_progress):
        self.cfg = cfg
        self.validate = validate
        self.progress = progress
        self.task = task
        self.devices = devices
        self.run_dir = Path(cfg.run_dir).absolute()
        self.batch_factory = batch_factory or _default_batch_factory()
        self._print = log or (lambda s: print(s, flush=True))
        self.process_index, self.process_count = jax.process_index(), jax.process_count()
        self.schedule = BatchSchedule(cfg.data)
        self._build()

    # ------------------------------------------------------------------ setup

    def log(self, msg: str) -> None:
        if self.process_index == 0:
            self._print(msg)

    def _build(self) -> None:
        from jax.sharding import NamedSharding, PartitionSpec

        from nemojax.parallel.batching import shard_readers
        from nemojax.parallel.mesh import make_mesh

        cfg = self.cfg
        self.mesh = make_mesh(cfg.mesh, self.devices)
        self.training: Training = build_training(cfg, self.mesh, task=self.task, total_steps=cfg.steps)
        self.train_step = self.training.step
        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        self.meter = ThroughputMeter(cfg.model, cfg.data.seq_len, num_devices=self.mesh.devices.size,
                                     peak_flops=peak_flops_per_device(self.mesh.devices.flat[0], cfg.peak_tflops))
        if self.process_count > 1:
            micro = self.schedule.micro_batch(0)
            readers = shard_readers(self.training.batch_sharding, micro)
            mine = self.training.rows(1, micro)
            print(f"process {self.process_index}/{self.process_count}: loads rows {_ranges(mine)} of each "
                  f"micro batch of {micro} ({len(readers)} data shard(s), each read by "
                  f"{sorted({len(p) for p in readers.values()})} process(es))", file=sys.stderr, flush=True)

    def _abstract_state(self) -> TrainState:
        return self.training.abstract_sharded_state()

    def _initial_state(self, ckpt: Checkpointer) -> tuple[TrainState, dict | None]:
        """Resume (latest intact checkpoint) > init_from (weights only) > fresh init."""
        restored = ckpt.restore_latest(self._abstract_state())
        if restored is not None:
            state, meta = restored
            self.log(f"resumed from {ckpt.directory / str(meta['step'])} (step {meta['step']}, "
                     f"{meta.get('tokens', 0):,} tokens consumed)")
            return state, meta
        if self.cfg.init_from:
            shardings = self.training.state_shardings.params.to_pure_dict()
            try:
                pure = self.task.load_weights(self.cfg.init_from, self.cfg, shardings)
            except CheckpointError:
                raise
            except (FileNotFoundError, ValueError, RuntimeError) as e:
                raise CheckpointError(f"init_from={self.cfg.init_from!r}: {e}") from None
            params = jax.tree.map(lambda x: x, self.training.abstract_state.params)
            params.replace_by_pure_dict(pure)
            opt_state = self.training.fresh_opt_state(params)
            step = jax.device_put(jnp.zeros((), jnp.int32), self.training.state_shardings.step)
            self.log(f"initialised weights from {self.cfg.init_from} (fresh optimizer state, step 0)")
            return TrainState(step, params, opt_state), None
        return self.training.init_state(self.cfg.seed), None

    # ------------------------------------------------------------------ data

    def _train_iterator(self, step: int, data_state: dict | None):
        bs, accum, micro = self.schedule.batch_size(step), self.schedule.accum_steps(step), \
            self.schedule.micro_batch(step)
        it = self.batch_factory(self.cfg.data, split="train", batch_size=bs, seq_len=self.cfg.data.seq_len,
                                seed=self.cfg.data_seed, rows=self.training.rows(accum, micro))
        if data_state is not None:
            it.set_state(data_state)
        elif step == 0 and self.cfg.init_from and hasattr(it, "continue_from"):
            previous = read_data_state(self.cfg.init_from)
            if previous is not None:
                for line in it.continue_from(previous, self.cfg.data.stage_start):
                    self.log(f"data ({self.cfg.data.stage_start}): {line}")
        return it

    def _device_batch(self, host: dict[str, np.ndarray], accum: int, micro: int) -> dict[str, jax.Array]:
        """This process' rows (flat numpy, `Training.rows` order) -> global [accum, micro, ...] arrays."""
        return self.training.global_batch(host, accum, micro)

    def _eval_batches(self) -> list[dict[str, jax.Array]]:
        """The validation set: the first eval_batches batches of the validation stream, kept
        on device so every evaluation sees exactly the same tokens."""
        if self.cfg.eval_batches <= 0 or self.cfg.eval_every <= 0:
            return []
        bs = self.cfg.data.micro_batch_size or self.cfg.data.global_batch_size
        try:
            it = self.batch_factory(self.cfg.data, split="validation", batch_size=bs,
                                    seq_len=self.cfg.data.seq_len, seed=self.cfg.data_seed,
                                    rows=self.training.rows(1, bs))
        except ConfigError as e:
            self.log(f"no validation: {e}")
            return []
        return [self._device_batch(next(it), 1, bs) for _ in range(self.cfg.eval_batches)]

    def evaluate(self, params: Any, batches: list[dict[str, jax.Array]]) -> float | None:
        if not batches:
            return None
        num = den = 0.0
        for b in batches:
            s, c = jax.device_get(self.training.eval_sums(params, b))
            num, den = num + float(s), den + float(c)
        return num / max(den, 1.0)

    # ------------------------------------------------------------------ the loop

    def run(self) -> TrainResult:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ckpt = Checkpointer(self.run_dir, keep=cfg.keep_checkpoints)
        writer = None
        stop = StopSignals(self.process_count)
        stop.warn_if_costly()
        try:
            with stop:  # a signal during restore or compilation stops after the first step
                state, meta = self._initial_state(ckpt)
                start = int(meta["step"]) if meta else 0
                if self.process_index == 0:  # after the restore: a refused resume leaves the old copy
                    save_config(cfg, self.run_dir / "config.yaml")
                writer = MetricsWriter(self.run_dir, resume_step=start) if self.process_index == 0 else None
                return self._loop(state, start, meta, ckpt, writer, stop)
        finally:
            ckpt.close()
            if writer is not None:
                writer.close()

    def _loop(self, state: TrainState, start: int, meta: dict | None, ckpt: Checkpointer,
              writer: MetricsWriter | None, stop: StopSignals) -> TrainResult:
        cfg, sched = self.cfg, self.schedule
        total = cfg.steps
        eval_batches = [] if self.validate else self._eval_batches()
        it = self._train_iterator(start, meta.get("data_state") if meta else None)
        it_batch = sched.batch_size(start)
        first_bad = jax.device_put(jnp.asarray(-1, jnp.int32), self._replicated)
        last_saved = start if meta else -1
        last_metrics: dict[str, Any] = {}
        n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(self.training.abstract_state.params))
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
            accum, micro = sched.accum_steps(step), sched.micro_batch(step)
            shape = (accum, micro)
            batch = self._device_batch(next(it), accum, micro)
            state, metrics = self.train_step(state, batch)
            step += 1
            first_bad = _track_nonfinite(first_bad, metrics["finite"], step)
            tok_mark += bs * cfg.data.seq_len
            if shape not in shape_seen:  # exclude compilation from the throughput window
                shape_seen.add(shape)
                jax.block_until_ready(metrics["loss"])
                t_mark, tok_mark = time.perf_counter(), 0
            do_log = step % max(cfg.log_every, 1) == 0 or step == total
            evaluating = bool(eval_batches) or (self.validate is not None and cfg.eval_every > 0
                                                and cfg.eval_batches > 0)
            do_eval = evaluating and (step % max(cfg.eval_every, 1) == 0 or step == total)
            do_save = (cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0) or step == total
            if do_log or do_eval:
                host = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "finite"}
                now = time.perf_counter()
                rec: dict[str, Any] = {"loss": host.pop("loss"), "grad_norm": host.pop("grad_norm"),
                                       "learning_rate": host.pop("learning_rate"), "batch_size": bs,
                                       "tokens": sched.tokens_before(step)}
                host.pop("loss_denominator", None)
                rec.update(host)  # a task's extra metrics
                if t_mark is not None and tok_mark > 0:
                    rec.update(self.meter(tok_mark, now - t_mark))
                else:
                    rec.update(tokens_per_sec=None, tflops_per_device=None, mfu=None)
                bad = check_finite(step)
                if bad is None and do_eval:
                    if self.validate:
                        rec.update(self.validate(self.training, state.params))
                    else:
                        rec["val_loss"] = self.evaluate(state.params, eval_batches)
                if writer is not None:
                    writer.write(step, rec)
                last_metrics = {"step": step, **rec}
                self.log(self.progress(step, total, rec))
                if bad is not None:
                    return stop_nonfinite(bad)
                t_mark, tok_mark = time.perf_counter(), 0
            if do_save and last_saved != step:
                bad = check_finite(step)
                if bad is not None:
                    return stop_nonfinite(bad)
                save(step)
                t_mark, tok_mark = time.perf_counter(), 0
            if stop.should_stop(step - start):
                bad = check_finite(step)
                if bad is not None:
                    return stop_nonfinite(bad)
                if last_saved != step:
                    save(step)
                ckpt.wait()
                self.log(f"received {stop.describe()}: saved checkpoint of step {step} in "
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


def _ranges(rows: np.ndarray) -> str:
    """[0 1 2 3 6 7] -> "0:4,6:8"."""
    out, start = [], None
    for i, r in enumerate(rows):
        if start is None:
            start = r
        if i + 1 == len(rows) or rows[i + 1] != r + 1:
            out.append(f"{start}:{r + 1}")
            start = None
    return ",".join(out)
