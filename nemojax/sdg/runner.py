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
"""

from __future__ import annotations

import asyncio
import collections
import json
import sys
import time
from pathlib import Path
from typing import Any

from nemojax.sdg.config import PipelineConfig, spec_dict
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


class Runner:
    """`Runner(cfg).run()` runs every stage; pass `clients=` / `reward=` objects to reuse ones
    you built (e.g. an Engine kept alive across pipelines), else they are built from cfg."""

    def __init__(self, cfg: PipelineConfig, *, clients: dict[str, LLM] | None = None, reward: Any = None,
                 progress: bool | None = None, log: Any = None) -> None:
        self.cfg = cfg
        self._clients = clients
        self._reward = reward
        self.progress = cfg.progress if progress is None else progress
        self.log = log or sys.stderr

    def run(self, only: list[str] | None = None) -> dict[str, dict[str, Any]]:
        return asyncio.run(self.arun(only))

    async def arun(self, only: list[str] | None = None) -> dict[str, dict[str, Any]]:
        from nemojax.sdg.clients import build_clients, build_reward

        owned = self._clients is None
        clients = self._clients if self._clients is not None else build_clients(self.cfg)
        reward = self._reward if self._reward is not None else build_reward(self.cfg.reward, self.cfg.seed)
        ctx = Context(self.cfg, clients, reward)
        ctx.run_dir.mkdir(parents=True, exist_ok=True)
        import yaml

        (ctx.run_dir / "pipeline.yaml").write_text(yaml.safe_dump(
            {"seed": self.cfg.seed, "stages": {k: spec_dict(v) for k, v in self.cfg.stages.items()}}, sort_keys=False))
        summaries: dict[str, dict[str, Any]] = {}
        try:
            for name, spec in self.cfg.stages.items():
                if only and name not in only:
                    continue
                summaries[name] = await self._stage(ctx, name, spec)
                print(json.dumps({"stage": name, **summaries[name]}), file=self.log, flush=True)
        finally:
            if owned:
                for c in clients.values():
                    await c.aclose()
            if reward is not None and self._reward is None:
                await reward.aclose()
        write_json_atomic(ctx.run_dir / "summary.json", self._all_summaries(ctx))
        return summaries

    def _all_summaries(self, ctx: Context) -> dict[str, Any]:
        out = {}
        for name in self.cfg.stages:
            p = ctx.work_dir / f"{name}.done.json"
            if p.exists():
                out[name] = json.loads(p.read_text())
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

    async def _stage(self, ctx: Context, name: str, spec: Any) -> dict[str, Any]:
        done_path = ctx.work_dir / f"{name}.done.json"
        if done_path.exists() and (ctx.run_dir / f"{name}.jsonl").exists():
            summary = json.loads(done_path.read_text())
            return {**summary, "skipped": True}
        stage = stage_kinds()[spec.kind](name, spec, ctx)
        items = self._inputs(ctx, stage)
        fingerprint = json.dumps({"spec": spec_dict(spec), "seed": ctx.seed, "templates": ctx.templates},
                                 sort_keys=True)
        stage.fingerprint = fingerprint
        t0 = time.perf_counter()
        ledger = Ledger(ctx.work_dir / f"{name}.ledger.jsonl", fingerprint)
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
        write_json_atomic(done_path, summary)
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

        async def worker() -> None:
            for item in todo:
                work = Work(ctx, stage.name, item["id"], stage.spec)
                try:
                    outs = await stage.process(item, work)
                except LLMError as e:
                    work.drop(e.reason)
                    outs = []
                records = []
                for k, rec in enumerate(outs):
                    rec = dict(rec)
                    rec["id"] = stable_id(stage.name, item["id"], k)
                    records.append(rec)
                entry = {"in": item["id"], "out": records, "dropped": counter_dict(work.dropped),
                         "tokens": work.tokens}
                ledger.append(entry)
                done[item["id"]] = entry
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
        for k, rec in enumerate(outputs):
            rec.setdefault("id", stable_id(stage.name, k))
        write_jsonl_atomic(ctx.run_dir / f"{stage.name}.jsonl", outputs)
        return {"kind": stage.spec.kind, "items_in": len(items), "kept": len(outputs),
                "dropped": counter_dict(work.dropped), "tokens": work.tokens}
