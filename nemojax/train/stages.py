"""Run a post-training stage from its config: `python train.py configs/dpo.yaml` lands here.

    from nemojax.config import load_config
    from nemojax.train.stages import run_stage, final_run_dir

    cfg = load_config("configs/dpo.yaml", ["init_from=runs/sft_general", "run_dir=runs/dpo",
                                          "stage.train=pairs.jsonl"])
    result = run_stage(cfg)                   # TrainResult(exit_code, step, reason, metrics, run_dir)
    final_run_dir(cfg)                        # the run dir holding the result: runs/dpo

One stage = one Trainer run (same mesh, sharding, precision, accumulation, checkpoints, resume
and metrics as pretraining) with the stage's TrainTask (nemojax.train.tasks), its rows
(nemojax.data.stage_data) and its held-out metrics (nemojax.train.validation). Before the
trainer starts:

* records are read and tokenized (counts of bad, truncated and dropped examples are logged);
  `stage.epochs` turns into a step count;
* rpo_* with `stage.reward_model`: both responses of every pair are scored by the reward
  checkpoint (`<run_dir>/rewards/<split>.jsonl`, resumable, reused while the inputs and the
  checkpoint are unchanged), and those rewards are the pairs' `chosen_reward` / `rejected_reward`;
* preference kinds: the reference log-probs of every pair are computed once with the
  reference weights and cached (nemojax.train.reference).

RPO rounds (`stage.rounds: N > 1`): round r is a complete run in `<run_dir>/round_<r>`,
initialised from and referenced to round r-1's final weights (round 1: `init_from`), training on
`stage.round_train[r-1]` (or `stage.train`). A finished round leaves `round_<r>/COMPLETED`, so
rerunning the command resumes the unfinished round and skips the finished ones. The final
weights are those of `<run_dir>/round_<N>` (`final_run_dir`), loadable with `nemojax.load`
and usable as the next stage's `init_from`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax

from nemojax.config import Config, ConfigError
from nemojax.data.stage_data import StageData, load_stage_data
from nemojax.train.loop import EXIT_OK, TrainResult, Trainer, train
from nemojax.train.reference import attach_reference_log_probs
from nemojax.train.tasks import stage_task
from nemojax.train.validation import StageValidator, progress_formatter

COMPLETED = "COMPLETED"


def _printer(log: Callable[[str], None] | None) -> Callable[[str], None]:
    def out(msg: str) -> None:
        if jax.process_index() == 0:
            (log or (lambda s: print(s, flush=True)))(msg)
    return out


def round_dir(cfg: Config, r: int) -> Path:
    return Path(cfg.run_dir) / f"round_{r}"


def final_run_dir(cfg: Config) -> Path:
    """The run directory whose latest checkpoint is the stage's result."""
    return round_dir(cfg, cfg.stage.rounds) if cfg.stage.rounds > 1 else Path(cfg.run_dir)


def round_config(cfg: Config, r: int) -> Config:
    """Round r (1-based) of a multi-round stage as a single-round config (see the module docstring)."""
    st = cfg.stage
    prev = cfg.init_from if r == 1 else str(round_dir(cfg, r - 1))
    stage = dataclasses.replace(
        st, rounds=1, round_train=[], train=st.round_train[r - 1] if st.round_train else st.train,
        reference=st.reference if r == 1 else "",
        reference_cache=str(Path(st.reference_cache) / f"round_{r}") if st.reference_cache else "")
    return dataclasses.replace(cfg, stage=stage, run_dir=str(round_dir(cfg, r)), init_from=prev)


def run_stage(cfg: Config, *, log: Callable[[str], None] | None = None,
              devices: Sequence[Any] | None = None) -> TrainResult:
    """Run `cfg`'s stage (every RPO round of it); pretraining configs go to the plain trainer."""
    if cfg.stage.kind == "pretrain":
        return train(cfg, log=log, devices=devices)
    if cfg.stage.rounds == 1:
        return run_single(cfg, log=log, devices=devices)
    say = _printer(log)
    result = None
    for r in range(1, cfg.stage.rounds + 1):
        rc = round_config(cfg, r)
        marker = Path(rc.run_dir) / COMPLETED
        if marker.is_file():
            say(f"round {r}/{cfg.stage.rounds}: already completed ({rc.run_dir}), skipped")
            continue
        say(f"round {r}/{cfg.stage.rounds}: run_dir {rc.run_dir}, initialised from and referenced to "
            f"{rc.init_from or 'a fresh init'}")
        result = run_single(rc, log=log, devices=devices)
        if result.exit_code != EXIT_OK or result.reason != "completed":
            return result
        if jax.process_index() == 0:
            marker.write_text(json.dumps({"round": r, "step": result.step}) + "\n")
    if result is None:
        say(f"all {cfg.stage.rounds} rounds already completed; the result is {final_run_dir(cfg)}")
        return TrainResult(EXIT_OK, 0, "completed", {}, final_run_dir(cfg).absolute())
    return result


def prepare_stage(cfg: Config, *, log: Callable[[str], None] | None = None) -> tuple[Config, StageData]:
    """(cfg with `steps` resolved from `stage.epochs`, the stage's data), rewards scored if asked."""
    from nemojax.data.tokenizer import load_tokenizer

    say = _printer(log)
    st = cfg.stage
    tok = load_tokenizer(cfg.data.tokenizer)
    if st.needs_rewards and st.reward_model:
        scored = {}
        for split, path in (("train", st.train), ("validation", st.validation)):
            if path:
                scored[split] = str(score_pairs(st.reward_model, path, Path(cfg.run_dir) / "rewards" / f"{split}.jsonl",
                                                cfg, say))
        cfg = dataclasses.replace(cfg, stage=dataclasses.replace(st, train=scored["train"],
                                                                 validation=scored.get("validation", "")))
    t0 = time.perf_counter()
    data = load_stage_data(cfg, tok)
    say(f"stage {cfg.stage.kind}: data read and tokenized in {time.perf_counter() - t0:.1f} s")
    for line in data.summary():
        say(f"  {line}")
    if cfg.stage.epochs:
        steps = data.steps_for_epochs(cfg.stage.epochs, cfg.data.global_batch_size)
        say(f"  {cfg.stage.epochs:g} epoch(s) of {data.rows_per_epoch} rows at batch {cfg.data.global_batch_size}"
            f" = {steps} steps")
        cfg = dataclasses.replace(cfg, steps=steps)
    return cfg, data


def run_single(cfg: Config, *, log: Callable[[str], None] | None = None,
               devices: Sequence[Any] | None = None) -> TrainResult:
    """One stage run in cfg.run_dir (see the module docstring)."""
    cfg, data = prepare_stage(cfg, log=log)
    task = stage_task(cfg)
    trainer = Trainer(cfg, task=task, batch_factory=data.batch_factory(list(task.batch_fields(cfg))), log=log,
                      devices=devices, validate=StageValidator(cfg, data), progress=progress_formatter(data.kind))
    if data.kind == "preference":
        sets = {"train": data.train, **({"validation": data.validation} if data.validation is not None else {})}
        t0 = time.perf_counter()
        status = attach_reference_log_probs(cfg, trainer.training, sets, task.load_weights, trainer.log)
        trainer.log("reference log-probs: " + ", ".join(f"{k} {v}" for k, v in status.items())
                    + f" ({time.perf_counter() - t0:.1f} s)")
    return trainer.run()


def evaluate_checkpoint(cfg: Config, checkpoint: str, *, log: Callable[[str], None] | None = None,
                        devices: Sequence[Any] | None = None) -> dict[str, float]:
    """`cfg`'s stage held-out metrics (nemojax.train.validation) of a checkpoint's weights, without
    training: e.g. an SFT-kind config with `stage.validation` and `stage.preference_validation`
    gives any language model's assistant-token loss and preference accuracy on the same data.

    Preference kinds need a reference other than the checkpoint itself (`stage.reference`).
    """
    from nemojax.parallel.mesh import make_mesh
    from nemojax.train.build import build_training
    from nemojax.train.reference import reference_params

    cfg = dataclasses.replace(cfg, init_from=str(checkpoint))
    cfg, data = prepare_stage(cfg, log=log or (lambda s: None))
    task = stage_task(cfg)
    training = build_training(cfg, make_mesh(cfg.mesh, devices), task=task)
    if data.kind == "preference":
        sets = {"train": data.train, **({"validation": data.validation} if data.validation is not None else {})}
        attach_reference_log_probs(cfg, training, sets, task.load_weights, log or (lambda s: None))
    params = reference_params(dataclasses.replace(cfg, stage=dataclasses.replace(cfg.stage, reference="")), training,
                              task.load_weights)
    return StageValidator(cfg, data)(training, params)


# --------------------------------------------------------------------------- reward scoring


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def score_pairs(checkpoint: str, records: str, out: Path, cfg: Config, log: Callable[[str], None] = print) -> Path:
    """Write `records` (preference pairs, any accepted form) to `out` with both responses scored by
    the reward checkpoint: chosen_reward / rejected_reward (the weighted aggregate) and the
    per-attribute chosen_scores / rejected_scores.

    Resumable: output is appended in chunks; a rerun continues after the last complete line,
    and starts over if the inputs or the checkpoint changed (`<out>.json` holds their identity).
    Process 0 scores; the others wait for it (the file must be on a shared filesystem).
    """
    from jax.experimental import multihost_utils

    from nemojax.checkpoint import resolve_checkpoint
    from nemojax.data.chat_records import load_examples
    from nemojax.data.sources import expand_paths

    files = expand_paths(records, "stage.train / stage.validation")
    try:
        ckpt = str(resolve_checkpoint(checkpoint)[1])
    except FileNotFoundError as e:
        raise ConfigError(f"stage.reward_model={checkpoint!r}: {e}") from None
    key = {"records": [[str(f), _sha256(f)] for f in files], "checkpoint": ckpt}
    meta = out.with_name(out.name + ".json")
    if jax.process_index() == 0:
        examples, _ = load_examples(records, "preference", on_bad=cfg.stage.on_bad)
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            saved = json.loads(meta.read_text())
        except (OSError, ValueError):
            saved = {}
        done = 0
        if out.is_file() and all(saved.get(k) == v for k, v in key.items()):
            complete = out.read_text(encoding="utf-8").split("\n")[:-1]  # a torn last line is dropped
            out.write_text("".join(line + "\n" for line in complete), encoding="utf-8")
            done = len(complete)
            if done:
                log(f"reward scoring {out.name}: {done} of {len(examples)} pairs already scored")
        else:
            out.write_text("")
            meta.write_text(json.dumps({**key, "complete": False}))
        if done < len(examples):
            _score_into(checkpoint, examples, done, out, cfg, log)
        meta.write_text(json.dumps({**key, "complete": True}))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"nemojax reward scoring {out}")
    return out


def _score_into(checkpoint: str, examples: list, start: int, out: Path, cfg: Config,
                log: Callable[[str], None]) -> None:
    from nemojax.data.tokenizer import load_tokenizer
    from nemojax.inference.reward import RewardScorer

    t0 = time.perf_counter()
    scorer = RewardScorer.from_checkpoint(checkpoint, tokenizer=load_tokenizer(cfg.data.tokenizer),
                                          batch_size=cfg.stage.reward_batch_size, max_len=cfg.data.seq_len)
    chunk = 64 * cfg.stage.reward_batch_size
    with out.open("a", encoding="utf-8") as f:
        for s in range(start, len(examples), chunk):
            part = examples[s:s + chunk]
            convs = [[*ex.prompt, {"role": "assistant", "content": resp}] for ex in part
                     for resp in (ex.chosen, ex.rejected)]
            res = scorer.score(convs)
            for i, ex in enumerate(part):
                c, r = res[2 * i], res[2 * i + 1]
                f.write(json.dumps({"prompt": ex.prompt, "chosen": ex.chosen, "rejected": ex.rejected,
                                    "chosen_reward": c["reward"], "rejected_reward": r["reward"],
                                    "chosen_scores": {k: v for k, v in c.items() if k != "reward"},
                                    "rejected_scores": {k: v for k, v in r.items() if k != "reward"}},
                                   ensure_ascii=False) + "\n")
            f.flush()
            log(f"reward scoring {out.name}: {min(s + chunk, len(examples))}/{len(examples)} pairs "
                f"({time.perf_counter() - t0:.0f} s)")


__all__ = ["COMPLETED", "evaluate_checkpoint", "final_run_dir", "prepare_stage", "round_config", "round_dir",
           "run_single", "run_stage", "score_pairs"]
