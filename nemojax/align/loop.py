"""`nemojax align`: the weak-to-strong flywheel, one resumable step at a time.

One iteration is: generator -> SDG (prompts, several samples, verifier / reward filtering,
preference pairs) -> code SFT -> general SFT -> DPO -> RPO rounds on that iteration's base ->
evaluation; the aligned model becomes the next iteration's generator. Before the first
iteration the loop builds the toy world (if asked), pretrains the bases that do not exist yet,
and aligns the first generator (e.g. the weak base on the seed conversations).

Run directory (`run_dir`):

    world/                        the toy world (when world.enabled)
    bases/<name>/                 pretraining runs of the bases (+ eval.json)
    generator/<stage>/            the first generator's stages
    iter_<k>/sdg/                 iteration k's generated data (nemojax sdg run)
    iter_<k>/<stage>/             iteration k's training stages, each a run dir
    <each step>/step.json         written last, atomically: the step is done (checkpoint, eval, time,
                                  fingerprints, leak audit of its training files)
    summary.json                  per iteration: the generator's and every stage's evaluation, and
                                  the leak audit of every file trained on
    replaced/<time>/...           finished steps whose configuration changed (--rerun-changed)

Every step runs as its own process (`nemojax train`, `nemojax sdg run`) or in-process
evaluation; a finished step (step.json) is skipped, any other is (re)run, and those commands
resume by themselves from their checkpoints / ledgers. So killing `nemojax align` anywhere and
running it again continues where it stopped, with nothing redone that was finished.

Each finished step records two fingerprints: `train`, a hash of its resolved configuration (the
training / SDG config with every override applied, file contents of `base:` configs included)
chained with the fingerprints of the steps it builds on (the checkpoint it starts from, the SDG
data it trains on, the toy world), and `eval`, of the evaluation settings. Before anything runs,
a dry pass compares them with the current configuration: a step whose `train` fingerprint
changed (another seed, stage setting, world, or any step before it) is named, and the run stops
unless `rerun_changed` (CLI `--rerun-changed`), which moves those steps to `replaced/` and
trains them again; a step whose `eval` fingerprint alone changed is evaluated again.

Leak audit (`leak_audit`: fail | warn | off; nemojax.align.leaks): before a step trains, every
file it trains on (pretraining sources, stage.train / replay / round_train) is checked against
the evaluation suites' items; a hit stops the run (fail) or is counted (warn). The SDG data a
stage trains on is generated text, so after each SDG step its records that hold an evaluation
task (a generator's wrong answer can be another task's right one) are removed from those files,
kept aside in `<sdg>/leak_removed.jsonl` and counted. `summary.json["leak_audit"]` sums it all.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from nemojax.align.config import AlignConfig
from nemojax.config import ConfigError


_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class AlignError(RuntimeError):
    """A step failed; the message names the step, its command and where its log is."""


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def outside_event_loop(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args), on a helper thread when this thread runs an event loop (a notebook kernel's):
    the evaluation starts an event loop of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn(*args)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args).result()


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def training_files(cfg: Any) -> list[Path]:
    """The files a training config trains on: a pretraining run's jsonl sources (files, directories,
    globs; built-in corpora hold no evaluation data), a post-training stage's train, replay and
    per-round files."""
    if cfg.stage.kind == "pretrain":
        out: list[Path] = []
        for src in cfg.data.sources:
            if src.path.startswith("builtin:"):
                continue
            p = Path(src.path)
            out += sorted(p.rglob("*.jsonl")) if p.is_dir() else [Path(x) for x in sorted(glob.glob(src.path))] or [p]
        return out
    return [Path(f) for f in (cfg.stage.train, cfg.stage.replay, *cfg.stage.round_train) if f]


def final_checkpoint(run_dir: Path) -> Path:
    """A finished training run's model: the last RPO round's run dir when it has rounds."""
    rounds = sorted(run_dir.glob("round_*"), key=lambda p: int(p.name.split("_")[1]))
    return rounds[-1] if rounds else run_dir


SHAPE_KEYS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
              "ffn_hidden_size", "max_seq_len")


def checkpoint_shape(path: Path) -> list[str]:
    """`model.<key>=<value>` overrides for the shape recorded with a checkpoint (nemojax or
    Hugging Face), so a stage config's own model section cannot disagree with the weights."""
    from nemojax.checkpoint import read_model_config, resolve_checkpoint

    try:
        kind, _, config_path = resolve_checkpoint(path)
        if kind == "hf":
            from nemojax.convert.hf import hf_config_to_model_config

            model = hf_config_to_model_config(json.loads(Path(config_path).read_text()))
        else:
            model = read_model_config(config_path)
    except (FileNotFoundError, ConfigError) as e:
        raise AlignError(f"base checkpoint {path}: {e}") from None
    return [f"model.{k}={getattr(model, k)}" for k in SHAPE_KEYS]


class AlignLoop:
    """Runs `cfg` (see the module docstring). `log` receives one line per event."""

    def __init__(self, cfg: AlignConfig, *, log: Callable[[str], None] | None = None,
                 python: str = sys.executable, rerun_changed: bool = False) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir).absolute()
        self.log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        self.python = python
        self.world = self.run_dir / "world"
        self.tokenizer = cfg.tokenizer
        self.rerun_changed = rerun_changed
        self.world_fingerprint = ""
        self._dry = False  # the dry pass: fingerprints only, nothing runs
        self._changed: list[tuple[str, Path, str]] = []  # (step, dir, why) found by the dry pass
        self._leak_index: Any = None
        self._audits: dict[str, dict[str, Any]] = {}  # file -> audit entry (this process)

    # ------------------------------------------------------------------ placeholders

    def _fill(self, text: str, **extra: Any) -> str:
        """Replace {name} placeholders (identifiers in braces only, so YAML flow mappings such as
        `[{path: x}]` in an override pass through untouched)."""
        fields = {"run_dir": str(self.run_dir), "world": str(self.world), "seed": self.cfg.seed,
                  "tokenizer": self.tokenizer, **extra}

        def sub(m: re.Match) -> str:
            if m.group(1) not in fields:
                raise ConfigError(f"unknown placeholder {m.group(0)} in {text!r}; available: "
                                  f"{', '.join('{' + k + '}' for k in sorted(fields))}")
            return str(fields[m.group(1)])

        return _PLACEHOLDER.sub(sub, text)

    # ------------------------------------------------------------------ steps

    def _done(self, step_dir: Path) -> dict[str, Any] | None:
        marker = step_dir / "step.json"
        return json.loads(marker.read_text()) if marker.exists() else None

    def _eval_fingerprint(self, **fill: Any) -> str:
        e = self.cfg.eval
        return fingerprint({"suites": {k: self._portable(self._fill(v, **fill)) for k, v in e.suites.items()},
                            "max_tokens": e.max_tokens, "batch_slots": e.batch_slots, "max_len": e.max_len,
                            "limit": e.limit, "world": self.world_fingerprint})

    def _portable(self, text: str) -> str:
        """Paths inside the run directory written relative to it, so a moved run keeps its fingerprints."""
        return text.replace(str(self.run_dir), "{run_dir}")

    def _check(self, label: str, step_dir: Path, train_fp: str, eval_fp: str | None) -> dict[str, Any] | None:
        """The step's record if it is finished with these fingerprints; in the dry pass, note a
        finished step whose training fingerprint changed. None: (re)run it."""
        done = self._done(step_dir)
        started = step_dir / "started.json"
        if done is None:  # an interrupted step resumes from its checkpoints: only with the same configuration
            if self._dry and started.exists() and json.loads(started.read_text()).get("train") != train_fp:
                self._changed.append((label, step_dir, "interrupted, and its configuration changed since"))
            return None
        old = done.get("fingerprint", {})
        if old.get("train") != train_fp:
            why = "recorded without a fingerprint (an older nemojax)" if not old else "its configuration changed"
            if self._dry:
                self._changed.append((label, step_dir, why))
            return None if not self._dry else {**done, "fingerprint": {"train": train_fp, "eval": eval_fp}}
        return done

    def _start(self, step_dir: Path, train_fp: str) -> None:
        """Mark a step started with its fingerprint (an interrupted run's checkpoints carry it)."""
        step_dir.mkdir(parents=True, exist_ok=True)
        _write_json(step_dir / "started.json", {"train": train_fp})

    def _run(self, what: str, args: list[str], step_dir: Path) -> float:
        """One subprocess step, its output appended to step_dir/log.txt; returns seconds."""
        step_dir.mkdir(parents=True, exist_ok=True)
        cmd = [self.python, "-m", "nemojax.cli", *args]
        t0 = time.perf_counter()
        with (step_dir / "log.txt").open("a") as logf:
            logf.write(f"\n$ {' '.join(cmd)}\n")
            logf.flush()
            proc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            tail = (step_dir / "log.txt").read_text()[-3000:]
            raise AlignError(f"{what} failed (exit {proc.returncode}); command: {' '.join(cmd)}\n"
                             f"log: {step_dir / 'log.txt'}\n...{tail}")
        return time.perf_counter() - t0

    def _evaluate(self, checkpoint: Path, step_dir: Path, **fill: Any) -> dict[str, Any]:
        from nemojax.evaluation.runner import EvalSpec, evaluate_model

        e = self.cfg.eval
        spec = EvalSpec(suites={k: self._fill(v, **fill) for k, v in e.suites.items()}, checkpoint=str(checkpoint),
                        tokenizer=self.tokenizer, max_tokens=e.max_tokens, batch_slots=e.batch_slots,
                        max_len=e.max_len, limit=e.limit)
        report = outside_event_loop(evaluate_model, spec)
        if not report["complete"]:  # a failure is never recorded as a result
            raise AlignError(f"evaluation of {checkpoint} is incomplete: {report['failed_requests']} request(s) "
                             f"failed ({report['errors'][:2]})")
        rows = report.pop("rows", {})
        with (step_dir / "eval_rows.jsonl").open("w") as f:
            for suite, items in rows.items():
                for r in items:
                    f.write(json.dumps({"suite": suite, **r}) + "\n")
        return report

    # ------------------------------------------------------------------ leak audit

    def _index(self) -> Any:
        """The leak index of every evaluation suite's items (built once)."""
        if self._leak_index is None:
            from nemojax.align.leaks import LeakIndex, eval_items_from_files

            files = [Path(self._fill(v)) for v in self.cfg.eval.suites.values()]
            try:
                self._leak_index = LeakIndex(eval_items_from_files([f for f in files if f.is_file()]))
            except ValueError as e:
                raise AlignError(f"leak audit: an evaluation file cannot be read: {e}") from None
        return self._leak_index

    def _audit(self, label: str, files: list[Path]) -> dict[str, Any] | None:
        """Audit the files a step trains on (module docstring); None when leak_audit is off."""
        if self.cfg.leak_audit == "off":
            return None
        from nemojax.align.leaks import audit_files

        out: dict[str, Any] = {"hits": 0, "files": {}}
        for f in files:
            if not f.is_file() or f.suffix != ".jsonl":
                out["files"][str(f)] = {"skipped": "missing or not a jsonl file"}
                continue
            st = f.stat()
            key = f"{f}:{st.st_size}:{st.st_mtime_ns}"
            if key not in self._audits:
                rep = audit_files(self._index(), [f])
                self._audits[key] = {**rep["files"][str(f)], "examples": rep["examples"][:3]}
            entry = self._audits[key]
            out["files"][str(f)] = {k: v for k, v in entry.items() if k != "examples"}
            out["hits"] += entry["hits"]
            if entry["hits"]:
                msg = (f"leak audit: {label} trains on {f}, which holds {entry['hits']} evaluation item(s) "
                       f"({entry['by_check']}), e.g. {entry['examples']}")
                if self.cfg.leak_audit == "fail":
                    raise AlignError(msg + "; remove them, or set leak_audit: warn to train anyway")
                self.log(f"[align] WARNING {msg}")
        return out

    def _remove_leaks(self, files: list[Path], sdg_dir: Path) -> dict[str, Any]:
        """Drop the records of generated files that hold an evaluation task (kept aside in
        <sdg>/leak_removed.jsonl); returns {file: {"records", "removed"}}. Idempotent."""
        out: dict[str, Any] = {}
        if self.cfg.leak_audit == "off":
            return out
        index = self._index()
        for f in files:
            if not f.is_file():
                continue
            lines = [x for x in f.read_text().splitlines() if x.strip()]
            keep, removed = [], []
            for line in lines:
                (removed if index.check_record(json.loads(line)) else keep).append(line)
            if removed:
                with (sdg_dir / "leak_removed.jsonl").open("a") as side:
                    side.write("".join(json.dumps({"file": f.name, "record": json.loads(x)}) + "\n" for x in removed))
                tmp = f.with_suffix(".jsonl.tmp")
                tmp.write_text("".join(x + "\n" for x in keep))
                os.replace(tmp, f)
            out[str(f)] = {"records": len(lines), "removed": len(removed)}
        return out

    # ------------------------------------------------------------------ training steps

    def _train_args(self, config: str, overrides: list[str], step_dir: Path, init_from: Path | None,
                    **fill: Any) -> list[str]:
        args = ["train", self._fill(config, **fill), *[self._fill(o, **fill) for o in overrides],
                f"run_dir={step_dir}", f"seed={self.cfg.seed}"]
        if init_from is not None:
            args.append(f"init_from={init_from}")
        if self.tokenizer:
            args.append(f"data.tokenizer={self.tokenizer}")
        return args

    def _train_step(self, label: str, step_dir: Path, config: str, overrides: list[str],
                    init: dict[str, Any] | None, evaluate: bool = True, inputs: tuple[str, ...] = (),
                    **fill: Any) -> dict[str, Any]:
        """Train one step (unless finished with the same fingerprint) and evaluate it. `init`: the
        record of the step it starts from; `inputs`: fingerprints of other steps whose data it reads."""
        from nemojax.config import load_config

        init_from = Path(init["checkpoint"]) if init is not None else None
        args = self._train_args(config, overrides, step_dir, init_from, **fill)
        resolved = load_config(args[1], args[2:])
        own = {k: v for k, v in asdict(resolved).items() if k not in ("run_dir", "init_from")}
        train_fp = fingerprint({"config": self._portable(json.dumps(own, sort_keys=True, default=str)),
                                "init": (init or {}).get("fingerprint", {}).get("train", ""), "inputs": inputs,
                                "world": self.world_fingerprint})
        eval_fp = self._eval_fingerprint(**fill) if evaluate else None
        done = self._check(label, step_dir, train_fp, eval_fp)
        if self._dry:
            return done or {"step": label, "checkpoint": str(final_checkpoint(step_dir)),
                            "fingerprint": {"train": train_fp, "eval": eval_fp}}
        if done is not None:
            if evaluate and done["fingerprint"].get("eval") != eval_fp:
                self.log(f"[align] {label}: evaluation settings changed, evaluated again")
                self._record_eval(done, Path(done["checkpoint"]), step_dir, **fill)
                done["fingerprint"]["eval"] = eval_fp
                _write_json(step_dir / "step.json", done)
            else:
                self.log(f"[align] {label}: done before (score {done.get('eval', {}).get('score')}), skipped")
            return done
        audit = self._audit(label, training_files(resolved))
        train_file = Path(resolved.stage.train) if resolved.stage.kind != "pretrain" and resolved.stage.train else None
        if init is not None and train_file is not None and train_file.is_file() and not train_file.read_text().strip():
            # e.g. a judge that kept no pair: nothing to train on, the model it starts from goes on unchanged
            step_dir.mkdir(parents=True, exist_ok=True)
            record = {"step": label, "checkpoint": init["checkpoint"], "skipped": f"no training records in {train_file}",
                      "fingerprint": {"train": train_fp, "eval": eval_fp}, "leak_audit": audit}
            if evaluate:
                record.update({k: init[k] for k in ("eval", "eval_rows") if k in init})
                if "eval" not in record:
                    self._record_eval(record, Path(init["checkpoint"]), step_dir, **fill)
            self.log(f"[align] {label}: skipped, {record['skipped']}")
            _write_json(step_dir / "step.json", record)
            return record
        self._start(step_dir, train_fp)
        self.log(f"[align] {label}: training ({args[1]}) in {step_dir}")
        seconds = self._run(label, args, step_dir)
        ckpt = final_checkpoint(step_dir)
        record: dict[str, Any] = {"step": label, "checkpoint": str(ckpt), "train_seconds": round(seconds, 1),
                                  "fingerprint": {"train": train_fp, "eval": eval_fp}, "leak_audit": audit}
        if evaluate:
            self._record_eval(record, ckpt, step_dir, **fill)
            self.log(f"[align] {label}: score {record['eval']['score']:.4f} ({record['eval']['headline_suite']}), "
                     f"train {seconds:.0f}s, eval {record['eval_seconds']:.0f}s")
        _write_json(step_dir / "step.json", record)
        return record

    def _record_eval(self, record: dict[str, Any], checkpoint: Path, step_dir: Path, **fill: Any) -> None:
        t0 = time.perf_counter()
        record["eval"] = self._evaluate(checkpoint, step_dir, **fill)
        record["eval_seconds"] = round(time.perf_counter() - t0, 1)
        record["eval_rows"] = str(step_dir / "eval_rows.jsonl")  # per-task results (paired comparisons)

    # ------------------------------------------------------------------ phases

    def _world_spec(self) -> Any:
        from nemojax.align.toy_world import ToyWorldSpec

        try:
            return ToyWorldSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in self.cfg.world.spec.items()})
        except TypeError as e:
            raise ConfigError(f"world.spec: {e}") from None

    def plan_world(self) -> None:
        """The world's fingerprint and tokenizer path, before it is built (the dry pass needs them,
        and must run before a changed spec rewrites the world)."""
        if not self.cfg.world.enabled:
            return
        from nemojax.align.toy_world import EARLY_POOLS, WORLD_VERSION

        spec = self._world_spec()
        # pools after the second are drawn last (toy_world): a world with more of them has every
        # other file of the two-pool world, so adding an iteration's pool reruns nothing
        self.world_fingerprint = fingerprint({"spec": {**asdict(spec), "pools": min(spec.pools, EARLY_POOLS)},
                                              "version": WORLD_VERSION})
        if not self.tokenizer:
            self.tokenizer = str(self.world / "tokenizer/tokenizer.model")

    def build_world(self) -> None:
        if not self.cfg.world.enabled:
            return
        from nemojax.align.toy_world import build_toy_world

        t0 = time.perf_counter()
        manifest = build_toy_world(self.world, self._world_spec())
        if not self.cfg.tokenizer:
            self.tokenizer = manifest["tokenizer"]
        self.log(f"[align] toy world ready in {self.world} ({time.perf_counter() - t0:.1f}s)")

    def base_checkpoint(self, name: str, bases_done: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """The record of base `name` (evaluated, or pretrained here first)."""
        if name in bases_done:
            return bases_done[name]
        b = self.cfg.bases[name]
        if b.checkpoint:
            bases_done[name] = self._eval_only(f"base {name}", Path(self._fill(b.checkpoint)),
                                               self.run_dir / "bases" / name)
            return bases_done[name]
        init = self.base_checkpoint(b.init_from, bases_done) if b.init_from else None
        inherited = self.architecture(b.init_from) if b.init_from else []
        bases_done[name] = self._train_step(f"base {name}", self.run_dir / "bases" / name, b.config,
                                            [*inherited, *b.overrides], init)
        return bases_done[name]

    def architecture(self, base: str) -> list[str]:
        """The `model.*` overrides of a base (and of the base it continues from): every stage
        trained on top of it gets them, so its model matches the checkpoint it starts from. A base
        given as an existing checkpoint contributes its recorded shape instead."""
        b = self.cfg.bases[base]
        if b.checkpoint:
            return checkpoint_shape(Path(self._fill(b.checkpoint)))
        inherited = self.architecture(b.init_from) if b.init_from else []
        return inherited + [o for o in b.overrides if o.split("=", 1)[0].strip().startswith("model.")]

    def generator_architecture(self, k: int) -> list[str]:
        """The `model.*` overrides of iteration k's generator (k = 1: the first generator)."""
        cfg = self.cfg
        if k > 1:
            return self.architecture(cfg.iterations[k - 2].base)
        if cfg.generator.base:
            return self.architecture(cfg.generator.base)
        return checkpoint_shape(Path(self._fill(cfg.generator.checkpoint)))

    def _stages(self, label: str, names: list[str], start: dict[str, Any], out_dir: Path, arch: list[str],
                inputs: tuple[str, ...] = (), **fill: Any) -> list[dict[str, Any]]:
        records, current = [], start
        for name in names:
            st = self.cfg.stages[name]
            rec = self._train_step(f"{label} {name}", out_dir / name, st.config, [*arch, *st.overrides], current,
                                   inputs=inputs, **fill)
            records.append(rec)
            current = rec
        return records

    def _sdg(self, k: int, extra: list[str], gen: dict[str, Any], stage_names: list[str], base_arch: list[str],
             *, label: str = "", judge: dict[str, Any] | None = None, **fill: Any) -> dict[str, Any]:
        """Iteration k's SDG step into fill["sdg"] with generator `gen`; `judge`: the record of a
        reward-model judge (its pipeline is judge.sdg_config, and its filtering is measured)."""
        from nemojax.config import load_config
        from nemojax.sdg.config import load_pipeline

        step_dir = Path(fill["sdg"])
        label = label or f"iteration {k} SDG"
        config = self.cfg.judge.sdg_config if judge is not None else self.cfg.sdg.config
        judge_overrides = self.cfg.judge.sdg_overrides if judge is not None else []
        overrides = [self._fill(o, **fill) for o in (*self.cfg.sdg.overrides, *judge_overrides, *extra)]
        args = ["sdg", "run", self._fill(config, **fill), *overrides, f"run_dir={step_dir}",
                f"seed={self.cfg.seed * 1000 + k}"]
        resolved = asdict(load_pipeline(args[2], args[3:]))
        resolved.pop("run_dir", None)
        made_by = {"generator": gen.get("fingerprint", {}).get("train", "")}
        if judge is not None:  # the data depends on the judge too
            made_by["judge"] = judge.get("fingerprint", {}).get("train", "")
        train_fp = fingerprint({"config": self._portable(json.dumps(resolved, sort_keys=True, default=str)),
                                **made_by, "world": self.world_fingerprint})
        done = self._check(label, step_dir, train_fp, None)
        if self._dry:
            return done or {"step": label, "fingerprint": {"train": train_fp}}
        if done is not None:
            self.log(f"[align] {label}: done before, skipped")
            return done
        read_files = [Path(st.path) for st in load_pipeline(args[2], args[3:]).stages.values()
                      if getattr(st, "kind", "") == "read" and getattr(st, "path", "")]
        audit = self._audit(label, read_files)
        self._start(step_dir, train_fp)
        self.log(f"[align] {label} with generator {fill['generator']} in {step_dir}")
        seconds = self._run(label, args, step_dir)
        # the files this iteration's stages train on that this SDG step wrote
        trained_on = {f for name in stage_names for f in training_files(load_config(
            self._fill(self.cfg.stages[name].config, **fill),
            [self._fill(o, **fill) for o in (*base_arch, *self.cfg.stages[name].overrides)]))}
        generated = sorted(f for f in trained_on if f.parent == step_dir)
        summary = step_dir / "summary.json"
        groups = {p.name[:-len(".by_group.json")]: json.loads(p.read_text()) for p in sorted(step_dir.glob("*.by_group.json"))}
        rec = {"step": label, "seconds": round(seconds, 1),
               "summary": json.loads(summary.read_text()) if summary.exists() else None,
               "decontamination": groups, "leak_audit": audit,
               "leak_removed": self._remove_leaks(generated, step_dir), "fingerprint": {"train": train_fp}}
        if judge is not None:  # how well the learned judge picked: measured with the oracle verifier
            from nemojax.align.judge import judge_audit

            rec["judge_audit"] = judge_audit(step_dir, Path(judge["checkpoint"]), self.tokenizer,
                                             load_pipeline(args[2], args[3:]))
            self.log(f"[align] {label}: judge audit {json.dumps(rec['judge_audit']['summary'])}")
        _write_json(step_dir / "step.json", rec)
        return rec

    def _walk(self) -> dict[str, Any]:
        """Every step in order (the dry pass runs nothing: it only compares fingerprints)."""
        cfg = self.cfg
        bases: dict[str, dict[str, Any]] = {}
        summary: dict[str, Any] = {"run_dir": str(self.run_dir), "iterations": []}
        if cfg.generator.checkpoint:  # an existing aligned model: evaluated once, like everything else
            path = Path(self._fill(cfg.generator.checkpoint))
            gen = self._eval_only("generator", path, self.run_dir / "generator")
            summary["generator"] = {"checkpoint": str(path)}
        else:
            base = self.base_checkpoint(cfg.generator.base, bases)
            recs = self._stages("generator", cfg.generator.stages, base, self.run_dir / "generator",
                                self.architecture(cfg.generator.base))
            gen = recs[-1] if recs else bases[cfg.generator.base]
            summary["generator"] = {"base": cfg.generator.base, "stages": recs}
        from nemojax.align.controls import Controls
        from nemojax.align.judge import train_judge

        controls = Controls(self, bases)
        for k, it in enumerate(cfg.iterations, start=1):
            iter_dir = self.run_dir / f"iter_{k}"
            fill = {"iteration": k, "iter_dir": str(iter_dir), "sdg": str(iter_dir / "sdg"),
                    "generator": gen["checkpoint"]}
            names = it.stages or cfg.pipeline
            arch = self.architecture(it.base)
            judge = train_judge(self, k, it, gen, bases, fill) if cfg.judge.kind == "reward_model" else None
            fill["reward_model"] = judge["checkpoint"] if judge else ""
            sdg = self._sdg(k, it.sdg_overrides, gen, names, arch, judge=judge, **fill)
            base = self.base_checkpoint(it.base, bases)
            recs = self._stages(f"iteration {k}", names, base, iter_dir, arch,
                                inputs=(sdg["fingerprint"]["train"],), **fill)
            entry = {"iteration": k, "generator": {"checkpoint": gen["checkpoint"], "eval": gen.get("eval"),
                                                   "eval_rows": gen.get("eval_rows")},
                     "sdg": sdg, "base": {"name": it.base, **bases[it.base]}, "stages": recs}
            if judge is not None:
                entry["judge"] = judge
            if cfg.controls:
                entry["controls"] = controls.run(k, it, sdg, recs, fill, judge)
            summary["iterations"].append(entry)
            gen = recs[-1] if recs else bases[it.base]
            if not self._dry:
                summary["bases"] = bases
                summary["leak_audit"] = leak_summary(summary)
                _write_json(self.run_dir / "summary.json", summary)
        summary["bases"] = bases
        summary["final"] = {"checkpoint": gen["checkpoint"], "eval": gen.get("eval")}
        return summary

    def _replace_changed(self) -> None:
        """Refuse, naming every finished step whose configuration changed, or (rerun_changed) move
        them to replaced/<time>/ so they are trained again."""
        if not self._changed:
            return
        names = "\n".join(f"  {label} ({d.relative_to(self.run_dir)}): {why}" for label, d, why in self._changed)
        if not self.rerun_changed:
            raise AlignError(f"finished steps in {self.run_dir} were made with another configuration:\n{names}\n"
                             f"their results would not match this config; rerun with --rerun-changed to train them "
                             f"again (they are moved to {self.run_dir / 'replaced'}/), or use a new run_dir")
        dest = self.run_dir / "replaced" / time.strftime("%Y%m%d-%H%M%S")
        for label, d, _ in self._changed:
            target = dest / d.relative_to(self.run_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(d), str(target))
            self.log(f"[align] {label}: configuration changed, moved to {target}; training it again")
        manifest = self.world / "manifest.json"
        if self.cfg.world.enabled and manifest.exists():  # a world of another spec is rebuilt; keep the old one
            from nemojax.align.toy_world import WORLD_VERSION

            old = json.loads(manifest.read_text()).get("spec", {})
            if old.get("world_version") != WORLD_VERSION or fingerprint(
                    {"spec": {k: v for k, v in old.items() if k != "world_version"}, "version": WORLD_VERSION}) != \
                    self.world_fingerprint:
                shutil.move(str(self.world), str(dest / "world"))
        self._changed = []

    def run(self) -> dict[str, Any]:
        from nemojax.inference.setup import enable_compile_cache

        enable_compile_cache()  # evaluations reuse compiled engine programs across steps and runs
        self.run_dir.mkdir(parents=True, exist_ok=True)
        t_start = time.perf_counter()
        self.plan_world()
        self._dry = True
        try:
            self._walk()
        finally:
            self._dry = False
        self._replace_changed()
        _write_json(self.run_dir / "align_config.json", asdict(self.cfg))
        self.build_world()
        summary = self._walk()
        summary["leak_audit"] = leak_summary(summary)
        summary["seconds"] = round(time.perf_counter() - t_start, 1)
        _write_json(self.run_dir / "summary.json", summary)
        return summary

    def _eval_only(self, label: str, checkpoint: Path, step_dir: Path, **fill: Any) -> dict[str, Any]:
        """Evaluate an existing model once; the result is kept in step_dir/step.json."""
        train_fp, eval_fp = fingerprint({"checkpoint": self._portable(str(checkpoint))}), self._eval_fingerprint(**fill)
        done = self._check(label, step_dir, train_fp, eval_fp)
        if self._dry:
            return done or {"step": label, "checkpoint": str(checkpoint), "fingerprint": {"train": train_fp}}
        if done is not None and done["fingerprint"].get("eval") == eval_fp:
            return done
        step_dir.mkdir(parents=True, exist_ok=True)
        rec = {"step": label, "checkpoint": str(checkpoint), "fingerprint": {"train": train_fp, "eval": eval_fp}}
        self._record_eval(rec, checkpoint, step_dir, **fill)
        self.log(f"[align] {label}: score {rec['eval']['score']:.4f}")
        _write_json(step_dir / "step.json", rec)
        return rec


def leak_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The leak audits of every step of a summary: hits per file trained on (each file once) and
    the generated records removed."""
    files: dict[str, Any] = {}
    removed: dict[str, Any] = {}

    def add(rec: dict[str, Any] | None) -> None:
        audit = (rec or {}).get("leak_audit") or {}
        files.update(audit.get("files", {}))
        removed.update((rec or {}).get("leak_removed") or {})

    for rec in summary.get("bases", {}).values():
        add(rec)
    for rec in summary.get("generator", {}).get("stages", []):
        add(rec)
    for it in summary.get("iterations", []):
        add(it["sdg"])
        add(it.get("judge"))
        for rec in it["stages"]:
            add(rec)
        for arm in (it.get("controls") or {}).values():
            for rec in [arm.get("sdg"), arm.get("data"), *arm.get("stages", [])]:
                add(rec)
    return {"hits": sum(f.get("hits", 0) for f in files.values()), "files_audited": len(files), "files": files,
            "generated_records_removed": sum(r["removed"] for r in removed.values()), "removed": removed}
