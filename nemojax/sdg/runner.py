"""Runs a pipeline's stages in order, resumably (see store.py for the crash-safety argument).

Per stage:
- done already (`.work/<stage>.done.json` exists): skipped; its `<stage>.jsonl` feeds the next;
- map stage: input records not yet in the ledger are processed by `max_in_flight` concurrent
  workers, each finished item appended to the ledger at once; when all are in, the outputs are
  written to `<stage>.jsonl` in input order (so the file is the same whatever the completion
  order or the number of interruptions), then the summary, which marks the stage done;
- global stage: runs over all records, writes its output the same way (Genetic Instruct keeps
  its own per-generation checkpoints inside `.work/<stage>/`).
A summary per stage (items in, kept, dropped by reason, tokens, seconds) is printed and
collected in `<run_dir>/summary.json`.

What a rerun may reuse: each stage's fingerprint (fingerprint.py: its spec, the seed, templates,
its clients' model identity and settings, the reward, its data files, the stages it reads) is
written into its ledger and done marker. A finished or partly done stage whose fingerprint
differs now is refused, naming the keys that changed; `redo=[stage]` (`--redo`) sets its
outputs and those of every stage reading it aside and runs them again.

What counts as done: an item whose request failed for a transport reason (LLMError.transport)
has no outcome, so it is not written to the ledger. The stage then stops (after its other items,
or at once after `max(4, max_in_flight)` such failures in a row: the backend is down), is not
marked done, and `StageIncomplete` says how many items failed; a rerun retries exactly the
items missing from the ledger.

Signals: the first SIGTERM or SIGINT cancels the items in flight (whatever finished is already
in the ledger) and `run` raises `Interrupted`, which the CLI reports as "rerun to resume".
"""

from __future__ import annotations

import asyncio
import collections
import json
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from nemojax.sdg.config import PipelineConfig, spec_dict
from nemojax.sdg.fingerprint import describe_change, fingerprints
from nemojax.sdg.llm import LLM, LLMError
from nemojax.sdg.stages import stage_kinds
from nemojax.sdg.stages.base import Work, counter_dict, stable_id
from nemojax.sdg.store import Ledger, StoreError, read_jsonl, write_json_atomic, write_jsonl_atomic


class Context:
    """What stages see of the pipeline: seed, templates, clients, reward, run directory."""

    def __init__(self, cfg: PipelineConfig, clients: dict[str, LLM], reward: Any) -> None:
        self.cfg = cfg
        self.seed = cfg.seed
        self.templates = dict(cfg.templates)
        self.clients = clients
        self.reward = reward
        self.run_dir = Path(cfg.run_dir)
        self.work_dir = self.run_dir / ".work"

    def llm(self, name: str | None) -> LLM:
        if not name:
            if not self.clients:
                raise LLMError("no client declared", "no_client")
            return next(iter(self.clients.values()))
        try:
            return self.clients[name]
        except KeyError:
            raise LLMError(f"client {name!r} is not declared", "no_client") from None


class StageChanged(StoreError):
    """A finished or partly done stage whose configuration (fingerprint) changed since."""


class StageIncomplete(RuntimeError):
    """Items of a stage failed for a transport reason; nothing was recorded for them."""

    def __init__(self, stage: str, message: str, failed: int, not_attempted: int) -> None:
        super().__init__(message)
        self.stage, self.failed, self.not_attempted = stage, failed, not_attempted


class Interrupted(Exception):
    """The run was stopped by a signal; what finished is kept and a rerun resumes."""

    def __init__(self, signame: str, stage: str | None, done: int, total: int) -> None:
        where = (f" in stage {stage!r}" if stage else "") + (f" with {done} of {total} items done" if total else "")
        where += " (what finished is kept on disk)"
        super().__init__(f"received {signame}: stopped{where}; exiting. Rerun the same command to resume.")
        self.signame, self.stage = signame, stage


def _upstream(spec: Any) -> list[str]:
    return [spec.input] + list(getattr(spec, "inputs", []) or [])


class Runner:
    """`Runner(cfg).run()` runs every stage; pass `clients=` / `reward=` objects to reuse ones
    you built (e.g. an Engine kept alive across pipelines), else they are built from cfg."""

    def __init__(self, cfg: PipelineConfig, *, clients: dict[str, LLM] | None = None, reward: Any = None,
                 progress: bool | None = None, log: Any = None, redo: list[str] | None = None) -> None:
        self.cfg = cfg
        self._clients = clients
        self._reward = reward
        self.progress = cfg.progress if progress is None else progress
        self.log = log or sys.stderr
        unknown = [s for s in redo or [] if s not in cfg.stages]
        if unknown:
            raise StoreError(f"redo {unknown}: no such stage; stages: {', '.join(cfg.stages)}")
        self.redo = list(redo or [])
        self._signal: str | None = None
        self._task: asyncio.Future | None = None
        self._progress: tuple[str | None, int, int] = (None, 0, 0)

    def run(self, only: list[str] | None = None) -> dict[str, dict[str, Any]]:
        return asyncio.run(self.arun(only))

    async def arun(self, only: list[str] | None = None) -> dict[str, dict[str, Any]]:
        signals = self._install_signals()
        try:
            return await self._run_stages(only)
        finally:
            for sig, previous in signals.items():
                asyncio.get_running_loop().remove_signal_handler(sig)
                signal.signal(sig, previous)

    async def _run_stages(self, only: list[str] | None) -> dict[str, dict[str, Any]]:
        from nemojax.sdg.clients import build_clients, build_reward

        owned = self._clients is None
        clients = self._clients if self._clients is not None else build_clients(self.cfg)
        reward = self._reward if self._reward is not None else build_reward(self.cfg.reward, self.cfg.seed)
        ctx = Context(self.cfg, clients, reward)
        summaries: dict[str, dict[str, Any]] = {}
        try:
            prints = fingerprints(self.cfg, clients, reward)
            ctx.run_dir.mkdir(parents=True, exist_ok=True)
            if self.redo:
                self._set_aside(ctx)
            import yaml

            (ctx.run_dir / "pipeline.yaml").write_text(yaml.safe_dump(
                {"seed": self.cfg.seed, "stages": {k: spec_dict(v) for k, v in self.cfg.stages.items()}},
                sort_keys=False))
            for name, spec in self.cfg.stages.items():
                if only and name not in only:
                    continue
                if self._signal:
                    raise Interrupted(self._signal, None, 0, 0)  # arrived between stages
                self._task = asyncio.ensure_future(self._stage(ctx, name, spec, prints[name]))
                try:
                    summaries[name] = await self._task
                except asyncio.CancelledError:
                    if self._signal is None:
                        raise
                    stage, done, total = self._progress
                    raise Interrupted(self._signal, stage, done, total) from None
                print(json.dumps({"stage": name, **summaries[name]}), file=self.log, flush=True)
        finally:
            self._task = None
            if owned:
                for c in clients.values():
                    await c.aclose()
            if reward is not None and self._reward is None:
                await reward.aclose()
            if ctx.run_dir.is_dir():
                write_json_atomic(ctx.run_dir / "summary.json", self._all_summaries(ctx))
        return summaries

    def _install_signals(self) -> dict[int, Any]:
        """SIGTERM / SIGINT cancel the running stage (only in the main thread's event loop);
        returns the handlers they replaced, restored when the run ends."""
        loop = asyncio.get_running_loop()
        installed = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(sig)
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
            except (ValueError, RuntimeError, NotImplementedError):  # not the main thread / platform
                continue
            installed[sig] = previous
        return installed

    def _on_signal(self, sig: int) -> None:
        if self._signal is None:
            self._signal = signal.Signals(sig).name
            if self._task is not None and not self._task.done():
                self._task.cancel()

    def _set_aside(self, ctx: Context) -> None:
        """Move the outputs of the stages to redo, and of every stage reading them, to .replaced/."""
        targets = set(self.redo)
        for name, spec in self.cfg.stages.items():
            if any(s in targets for s in _upstream(spec)):
                targets.add(name)
        dest = ctx.run_dir / ".replaced" / time.strftime("%Y%m%d-%H%M%S")
        moved = []
        for name in (n for n in self.cfg.stages if n in targets):
            paths = [ctx.run_dir / f"{name}.jsonl", ctx.work_dir / f"{name}.ledger.jsonl",
                     ctx.work_dir / f"{name}.done.json", ctx.work_dir / name]
            if any(p.exists() for p in paths):
                moved.append(name)
            for p in paths:
                if p.exists():
                    (dest / p.parent.relative_to(ctx.run_dir)).mkdir(parents=True, exist_ok=True)
                    shutil.move(str(p), str(dest / p.relative_to(ctx.run_dir)))
        if moved:
            print(f"redo: set aside the previous outputs of {', '.join(moved)} in {dest}", file=self.log, flush=True)

    def _all_summaries(self, ctx: Context) -> dict[str, Any]:
        out = {}
        for name in self.cfg.stages:
            p = ctx.work_dir / f"{name}.done.json"
            if p.exists():
                out[name] = {k: v for k, v in json.loads(p.read_text()).items() if k != "fingerprint"}
        return out

    def _inputs(self, ctx: Context, stage: Any) -> list[dict[str, Any]]:
        if not type(stage).needs_input:
            items = stage.source_items()
        else:
            src = ctx.run_dir / f"{stage.spec.input}.jsonl"
            if not (ctx.work_dir / f"{stage.spec.input}.done.json").exists():
                raise StoreError(f"stage {stage.name!r} reads {stage.spec.input!r}, which has not finished")
            items = read_jsonl(src)
        if stage.spec.limit:
            items = items[:stage.spec.limit]
        seen = set()
        for n, it in enumerate(items):
            it.setdefault("id", str(n))
            it["id"] = str(it["id"])
            if it["id"] in seen:
                raise StoreError(f"stage {stage.name!r}: duplicate input id {it['id']!r}")
            seen.add(it["id"])
        return items

    async def _stage(self, ctx: Context, name: str, spec: Any, fingerprint: dict[str, Any]) -> dict[str, Any]:
        done_path = ctx.work_dir / f"{name}.done.json"
        self._progress = (name, 0, 0)
        if done_path.exists() and (ctx.run_dir / f"{name}.jsonl").exists():
            summary = json.loads(done_path.read_text())
            recorded = summary.pop("fingerprint", None)
            if recorded != fingerprint:
                raise StageChanged(f"stage {name!r} was run with a different configuration: "
                                   f"{describe_change(name, recorded, fingerprint)}. Its records would be stale: "
                                   f"rerun with --redo {name} to redo it and the stages reading it, or use a new "
                                   f"run_dir")
            return {**summary, "skipped": True}
        stage = stage_kinds()[spec.kind](name, spec, ctx)
        items = self._inputs(ctx, stage)
        stage.fingerprint = fingerprint
        t0 = time.perf_counter()
        ledger = Ledger(ctx.work_dir / f"{name}.ledger.jsonl", fingerprint)
        recorded = ledger.recorded_fingerprint()
        if recorded is not None and recorded != fingerprint:
            raise StageChanged(f"stage {name!r} was started with a different configuration: "
                               f"{describe_change(name, recorded, fingerprint)}. Rerun with --redo {name} to start "
                               f"it again (its finished items are set aside), or use a new run_dir")
        try:
            if type(stage).mode == "global":
                summary = await self._global(ctx, stage, items, ledger)
            else:
                summary = await self._map(ctx, stage, items, ledger)
        finally:
            ledger.close()
        summary["seconds"] = round(summary.pop("_previous_seconds", 0.0) + time.perf_counter() - t0, 3)
        compiles = {n: c.engine.compile_counts() for n, c in ctx.clients.items() if hasattr(c, "engine")}
        if compiles:
            summary["engine_compiles"] = compiles
        write_json_atomic(done_path, {**summary, "fingerprint": fingerprint})
        return summary

    def _bar(self, name: str, total: int, initial: int) -> Any:
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=name, unit="item", disable=not self.progress,
                    dynamic_ncols=True, file=sys.stderr)

    async def _map(self, ctx: Context, stage: Any, items: list[dict[str, Any]], ledger: Ledger) -> dict[str, Any]:
        if hasattr(stage, "prepare"):
            stage.prepare(items)
        done = ledger.load()
        wanted = {it["id"] for it in items}
        done = {k: v for k, v in done.items() if k in wanted}
        todo = iter([it for it in items if it["id"] not in done])
        bar = self._bar(stage.name, len(items), len(done))
        resumed = len(done)
        self._progress = (stage.name, len(done), len(items))
        failed: dict[str, LLMError] = {}
        run = {"failures_in_a_row": 0, "give_up": False}
        give_up_after = max(4, self.cfg.max_in_flight)

        async def worker() -> None:
            for item in todo:
                if run["give_up"]:
                    return
                work = Work(ctx, stage.name, item["id"], stage.spec)
                try:
                    outs = await stage.process(item, work)
                except LLMError as e:
                    work.failed(e)
                    work.drop(e.reason)
                    outs = []
                if work.transport is not None:  # no outcome: not recorded, retried by a rerun
                    failed[item["id"]] = work.transport
                    run["failures_in_a_row"] += 1
                    run["give_up"] = run["failures_in_a_row"] >= give_up_after
                    continue
                run["failures_in_a_row"] = 0
                records = []
                for k, rec in enumerate(outs):
                    rec = dict(rec)
                    rec["id"] = stable_id(stage.name, item["id"], k)
                    records.append(rec)
                entry = {"in": item["id"], "out": records, "dropped": counter_dict(work.dropped),
                         "tokens": work.tokens}
                ledger.append(entry)
                done[item["id"]] = entry
                self._progress = (stage.name, len(done), len(items))
                bar.update(1)

        workers = [asyncio.ensure_future(worker()) for _ in range(max(1, self.cfg.max_in_flight))]
        try:
            await asyncio.gather(*workers)
        except BaseException:
            for w in workers:
                w.cancel()
            raise
        finally:
            bar.close()
        if len(done) < len(items):
            self._incomplete(stage.name, len(items), len(done), failed, give_up_after if run["give_up"] else 0)
        outputs, dropped, tokens = [], collections.Counter(), 0
        for it in items:
            entry = done[it["id"]]
            outputs.extend(entry["out"])
            dropped.update(entry["dropped"])
            tokens += entry["tokens"]
        write_jsonl_atomic(ctx.run_dir / f"{stage.name}.jsonl", outputs)
        return {"kind": stage.spec.kind, "items_in": len(items), "kept": len(outputs),
                "dropped": counter_dict(dropped), "tokens": tokens, "resumed_items": resumed}

    async def _global(self, ctx: Context, stage: Any, items: list[dict[str, Any]], ledger: Ledger) -> dict[str, Any]:
        ledger.load()  # refuses a changed configuration
        ledger.append({"in": "__start__", "out": [], "dropped": {}, "tokens": 0})
        work = Work(ctx, stage.name, "__global__", stage.spec)
        outputs = await stage.run_global(items, work)
        if work.transport is not None:
            raise StageIncomplete(stage.name, f"stage {stage.name!r} is incomplete: a request failed for a transport "
                                  f"reason ({work.transport}); what finished is kept: fix the backend and rerun "
                                  f"the same command to resume", 1, 0)
        for k, rec in enumerate(outputs):
            rec.setdefault("id", stable_id(stage.name, k))
        write_jsonl_atomic(ctx.run_dir / f"{stage.name}.jsonl", outputs)
        return {"kind": stage.spec.kind, "items_in": len(items), "kept": len(outputs),
                "dropped": counter_dict(work.dropped), "tokens": work.tokens}

    def _incomplete(self, name: str, total: int, done: int, failed: dict[str, LLMError], gave_up_after: int) -> None:
        """Report a map stage with items left (transport failures) and raise StageIncomplete."""
        reasons = collections.Counter(e.reason for e in failed.values())
        left = total - done - len(failed)
        print(json.dumps({"stage": name, "incomplete": True, "items_in": total, "done": done,
                          "failed": len(failed), "not_attempted": left, "failed_by_reason": counter_dict(reasons)}),
              file=self.log, flush=True)
        example = next(iter(failed.values()), None)
        stopped = (f"; it stopped after {gave_up_after} failures in a row, so {left} items were not attempted"
                   if left else "")
        raise StageIncomplete(name, (
            f"stage {name!r} is incomplete: {len(failed)} of {total} items failed for a transport reason "
            f"({', '.join(f'{k}: {v}' for k, v in sorted(reasons.items()))}; e.g. {example}){stopped}. "
            f"The {done} finished items are kept; fix the backend and rerun the same command to retry the "
            f"{total - done} items left."), len(failed), left)
