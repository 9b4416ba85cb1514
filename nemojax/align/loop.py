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
    <each step>/step.json         written last, atomically: the step is done (checkpoint, eval, time)
    summary.json                  per iteration: the generator's and every stage's evaluation

Every step runs as its own process (`nemojax train`, `nemojax sdg run`) or in-process
evaluation; a step whose step.json exists is skipped, any other is (re)run, and those commands
resume by themselves from their checkpoints / ledgers. So killing `nemojax align` anywhere and
running it again continues where it stopped, with nothing redone that was finished.
"""

from __future__ import annotations

import json
import os
import re
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
                 python: str = sys.executable) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir).absolute()
        self.log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        self.python = python
        self.world = self.run_dir / "world"
        self.tokenizer = cfg.tokenizer

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
        report = evaluate_model(spec)
        rows = report.pop("rows", {})
        with (step_dir / "eval_rows.jsonl").open("w") as f:
            for suite, items in rows.items():
                for r in items:
                    f.write(json.dumps({"suite": suite, **r}) + "\n")
        return report

    def _train_step(self, label: str, step_dir: Path, config: str, overrides: list[str],
                    init_from: Path | None, evaluate: bool = True, **fill: Any) -> dict[str, Any]:
        done = self._done(step_dir)
        if done is not None:
            self.log(f"[align] {label}: done before (score {done.get('eval', {}).get('score')}), skipped")
            return done
        args = ["train", self._fill(config, **fill), *[self._fill(o, **fill) for o in overrides],
                f"run_dir={step_dir}", f"seed={self.cfg.seed}"]
        if init_from is not None:
            args.append(f"init_from={init_from}")
        if self.tokenizer:
            args.append(f"data.tokenizer={self.tokenizer}")
        self.log(f"[align] {label}: training ({' '.join(args[1:2])}) in {step_dir}")
        seconds = self._run(label, args, step_dir)
        ckpt = final_checkpoint(step_dir)
        record: dict[str, Any] = {"step": label, "checkpoint": str(ckpt), "train_seconds": round(seconds, 1)}
        if evaluate:
            t0 = time.perf_counter()
            record["eval"] = self._evaluate(ckpt, step_dir, **fill)
            record["eval_seconds"] = round(time.perf_counter() - t0, 1)
            self.log(f"[align] {label}: score {record['eval']['score']:.4f} ({record['eval']['headline_suite']}), "
                     f"train {seconds:.0f}s, eval {record['eval_seconds']:.0f}s")
        _write_json(step_dir / "step.json", record)
        return record

    # ------------------------------------------------------------------ phases

    def build_world(self) -> None:
        if not self.cfg.world.enabled:
            return
        from nemojax.align.toy_world import ToyWorldSpec, build_toy_world

        try:
            spec = ToyWorldSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in self.cfg.world.spec.items()})
        except TypeError as e:
            raise ConfigError(f"world.spec: {e}") from None
        t0 = time.perf_counter()
        manifest = build_toy_world(self.world, spec)
        if not self.tokenizer:
            self.tokenizer = manifest["tokenizer"]
        self.log(f"[align] toy world ready in {self.world} ({time.perf_counter() - t0:.1f}s)")

    def base_checkpoint(self, name: str, bases_done: dict[str, dict[str, Any]]) -> Path:
        if name in bases_done:
            return Path(bases_done[name]["checkpoint"])
        b = self.cfg.bases[name]
        if b.checkpoint:
            path = Path(self._fill(b.checkpoint))
            bases_done[name] = self._eval_only(f"base {name}", path, self.run_dir / "bases" / name)
            return path
        init = self.base_checkpoint(b.init_from, bases_done) if b.init_from else None
        inherited = self.architecture(b.init_from) if b.init_from else []
        rec = self._train_step(f"base {name}", self.run_dir / "bases" / name, b.config, [*inherited, *b.overrides],
                               init)
        bases_done[name] = rec
        return Path(rec["checkpoint"])

    def architecture(self, base: str) -> list[str]:
        """The `model.*` overrides of a base (and of the base it continues from): every stage
        trained on top of it gets them, so its model matches the checkpoint it starts from. A base
        given as an existing checkpoint contributes its recorded shape instead."""
        b = self.cfg.bases[base]
        if b.checkpoint:
            return checkpoint_shape(Path(self._fill(b.checkpoint)))
        inherited = self.architecture(b.init_from) if b.init_from else []
        return inherited + [o for o in b.overrides if o.split("=", 1)[0].strip().startswith("model.")]

    def _stages(self, label: str, names: list[str], start: Path, out_dir: Path, arch: list[str],
                **fill: Any) -> list[dict[str, Any]]:
        records, current = [], start
        for name in names:
            st = self.cfg.stages[name]
            rec = self._train_step(f"{label} {name}", out_dir / name, st.config, [*arch, *st.overrides], current,
                                   **fill)
            records.append(rec)
            current = Path(rec["checkpoint"])
        return records

    def _sdg(self, k: int, extra: list[str], **fill: Any) -> dict[str, Any]:
        step_dir = Path(fill["sdg"])
        done = self._done(step_dir)
        if done is not None:
            self.log(f"[align] iteration {k} SDG: done before, skipped")
            return done
        overrides = [self._fill(o, **fill) for o in (*self.cfg.sdg.overrides, *extra)]
        args = ["sdg", "run", self._fill(self.cfg.sdg.config, **fill), *overrides, f"run_dir={step_dir}",
                f"seed={self.cfg.seed * 1000 + k}"]
        self.log(f"[align] iteration {k} SDG with generator {fill['generator']} in {step_dir}")
        seconds = self._run(f"iteration {k} SDG", args, step_dir)
        summary = step_dir / "summary.json"
        rec = {"step": f"iteration {k} sdg", "seconds": round(seconds, 1),
               "summary": json.loads(summary.read_text()) if summary.exists() else None}
        _write_json(step_dir / "step.json", rec)
        return rec

    def run(self) -> dict[str, Any]:
        from nemojax.inference.setup import enable_compile_cache

        enable_compile_cache()  # evaluations reuse compiled engine programs across steps and runs
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _write_json(self.run_dir / "align_config.json", asdict(cfg))
        t_start = time.perf_counter()
        self.build_world()
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
        for k, it in enumerate(cfg.iterations, start=1):
            iter_dir = self.run_dir / f"iter_{k}"
            fill = {"iteration": k, "iter_dir": str(iter_dir), "sdg": str(iter_dir / "sdg"),
                    "generator": gen["checkpoint"]}
            sdg = self._sdg(k, it.sdg_overrides, **fill)
            base = self.base_checkpoint(it.base, bases)
            recs = self._stages(f"iteration {k}", it.stages or cfg.pipeline, base, iter_dir,
                                self.architecture(it.base), **fill)
            summary["iterations"].append({
                "iteration": k, "generator": {"checkpoint": gen["checkpoint"], "eval": gen.get("eval")},
                "sdg": sdg, "base": {"name": it.base, **bases[it.base]}, "stages": recs})
            gen = recs[-1] if recs else bases[it.base]
            summary["bases"] = bases
            summary["seconds"] = round(time.perf_counter() - t_start, 1)
            _write_json(self.run_dir / "summary.json", summary)
        summary["final"] = {"checkpoint": gen["checkpoint"], "eval": gen.get("eval")}
        summary["seconds"] = round(time.perf_counter() - t_start, 1)
        _write_json(self.run_dir / "summary.json", summary)
        return summary

    def _eval_only(self, label: str, checkpoint: Path, step_dir: Path, **fill: Any) -> dict[str, Any]:
        """Evaluate an existing model once; the result is kept in step_dir/step.json."""
        marker = step_dir / "step.json"
        if marker.exists():
            return json.loads(marker.read_text())
        step_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        rec = {"step": label, "checkpoint": str(checkpoint), "eval": self._evaluate(checkpoint, step_dir, **fill),
               "eval_seconds": round(time.perf_counter() - t0, 1)}
        self.log(f"[align] {label}: score {rec['eval']['score']:.4f}")
        _write_json(marker, rec)
        return rec
