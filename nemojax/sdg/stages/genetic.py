"""Genetic Instruct (arXiv 2407.21077): grow a population of code problems with solutions.

Each generation, every colony breeds `offspring` candidates from the current population:
mutation (an Evol-Instruct-style rewrite of one member: harder, different, more precise) or
crossover (a Self-Instruct-style new problem with several members as examples); a coder model
writes a solution; the fitness is a judge model's 1-10 rating (and/or, beyond the paper, whether
the solution's own top-level asserts ran and passed in the sandbox, sandbox.py). Fit
candidates from all colonies are merged, deduplicated against the population (exact + MinHash)
and decontaminated, then join it. It stops after `generations` or once `target_size` new pairs
exist. Output: SFT-ready records (`messages` = [problem, solution]) with their fitness evidence.

Resume: each candidate's result goes to a ledger as it finishes; each finished generation's
population is written whole. A rerun restarts at the first unfinished generation and reuses the
candidates already judged in it; every candidate's randomness and seeds derive from its id
(generation, colony, index), so the result is the same as an uninterrupted run.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from typing import Any

from nemojax.config import ConfigError
from nemojax.sdg.dedup import Decontaminator, Deduplicator
from nemojax.sdg.judge_replies import judge_score
from nemojax.sdg.sandbox import ISOLATIONS, SandboxLimits, SandboxUnavailable, ensure_sandbox, run_python
from nemojax.sdg.stages.base import Stage, StageSpec, Work, prompt_text
from nemojax.sdg.store import Ledger, read_jsonl, write_jsonl_atomic
from nemojax.sdg.templates import MUTATIONS

FITNESS = ("judge", "tests", "both")


@dataclass
class GeneticSpec(StageSpec):
    colonies: int = 2
    generations: int = 3
    offspring: int = 8  # candidates per colony per generation
    target_size: int = 100  # stop once this many new (non-seed) pairs exist
    crossover_rate: float = 0.5  # probability a candidate comes from crossover (else mutation)
    parents: int = 3  # examples shown to crossover
    coder: str = ""  # client writing solutions (default: the stage's client)
    judge: str = ""  # client rating them (default: the stage's client)
    fitness: str = "judge"  # judge | tests (run the solution's asserts) | both
    min_fitness: float = 0.6  # judge rating / 10 needed to join the population (rating/10 >= it joins)
    test_timeout_s: float = 5.0  # wall clock for the whole process tree of one solution
    test_memory_mb: int = 512  # memory of that whole tree (cgroup) and of each process
    sandbox: str = "auto"  # auto (namespaces; refuse if absent) | unsafe-process-group (opt-out)
    dedup_threshold: float = 0.8
    eval_file: str = ""  # JSONL evaluation set to decontaminate against
    eval_fields: list[str] = field(default_factory=lambda: ["prompt"])
    max_tokens: int = 512

    def validate(self, key: str, cfg: Any) -> None:
        super().validate(key, cfg)
        if self.fitness not in FITNESS:
            raise ConfigError(f"{key}.fitness={self.fitness!r}: choose one of {', '.join(FITNESS)}")
        if self.sandbox not in ISOLATIONS:
            raise ConfigError(f"{key}.sandbox={self.sandbox!r}: choose one of {', '.join(ISOLATIONS)}")
        if self.test_timeout_s <= 0 or self.test_memory_mb < 64:
            raise ConfigError(f"{key}: test_timeout_s must be > 0 and test_memory_mb >= 64")
        if self.colonies < 1 or self.generations < 1 or self.offspring < 1 or self.target_size < 1:
            raise ConfigError(f"{key}: colonies, generations, offspring and target_size must be >= 1")
        for c in (self.coder, self.judge):
            if c and c not in cfg.clients:
                raise ConfigError(f"{key}: client {c!r} is not declared; clients: {', '.join(cfg.clients)}")


_CODE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)


def extract_code(reply: str) -> str:
    m = _CODE.search(reply)
    return m.group(1).strip() if m else ""


class GeneticInstruct(Stage):
    kind = "genetic_instruct"
    Spec = GeneticSpec
    mode = "global"

    async def _candidate(self, cid: str, colony: int, population: list[dict[str, Any]], parent: Work
                         ) -> dict[str, Any]:
        s = self.spec
        work = Work(parent.ctx, self.name, cid, s)
        rng = work.rng
        if len(population) >= 2 and rng.random() < s.crossover_rate:
            parents = rng.sample(population, min(s.parents, len(population)))
            examples = "\n\n".join(f"Problem {i + 1}:\n{p['instruction']}" for i, p in enumerate(parents))
            op, text = "crossover", work.template("genetic_crossover", examples=examples)
        else:
            parents = [rng.choice(population)]
            op, text = "mutation", work.template("genetic_mutate", problem=parents[0]["instruction"],
                                                 direction=rng.choice(MUTATIONS))
        rec: dict[str, Any] = {"cid": cid, "colony": colony, "operator": op, "parents": [p["instruction"][:200] for p in parents]}

        def done(reason: str) -> dict[str, Any]:
            if work.transport is not None:  # no outcome: the caller records nothing and the run retries it
                parent.failed(work.transport)
                return {**rec, "accepted": False, "reason": "transport", "tokens": work.tokens, "transport": True}
            return {**rec, "accepted": reason == "accepted", "reason": reason, "tokens": work.tokens}

        instruction = await work.ask(text)
        if instruction is None or not instruction.strip():
            return done("empty_instruction")
        rec["instruction"] = instruction.strip()
        reply = await work.ask(work.template("genetic_code", problem=rec["instruction"]), s.coder or None)
        code = extract_code(reply or "")
        if not code:
            return done("no_code")
        rec["solution"] = reply.strip()
        if s.fitness in ("tests", "both"):
            run = await run_python(code, SandboxLimits(timeout_s=s.test_timeout_s, memory_mb=s.test_memory_mb),
                                   isolation=s.sandbox)
            rec["tests"] = {"passed": run.passed, "reason": run.reason}
            if not run.passed:
                return done(f"tests_{run.reason}")
            rec["fitness"] = 1.0
        if s.fitness in ("judge", "both"):
            rating = judge_score(await work.ask(work.template("genetic_judge", problem=rec["instruction"],
                                                              solution=rec["solution"]), s.judge or None,
                                                max_tokens=8))
            if rating is None:
                return done("judge_unparseable")
            rec["judge_rating"] = rating
            rec["fitness"] = rating / 10
            if rec["fitness"] < s.min_fitness:
                return done("low_fitness")
        return done("accepted")

    async def run_global(self, items: list[dict[str, Any]], work: Work) -> list[dict[str, Any]]:
        s = self.spec
        state = work.ctx.work_dir / self.name
        seeds = []
        for it in items:
            text = it.get("instruction") or prompt_text(it)
            if text.strip():
                seeds.append({"instruction": text.strip(), "solution": it.get("solution"), "origin": "seed"})
        if not seeds:
            work.drop("no_seeds")
            return []
        if s.fitness in ("tests", "both"):  # refuse before any model call, not candidate by candidate
            try:
                await ensure_sandbox(s.sandbox)
            except SandboxUnavailable as e:
                raise ConfigError(f"stages.{self.name}.sandbox: {e}") from None
        ledger = Ledger(state / "candidates.ledger.jsonl", self.fingerprint)
        judged = {k: v["out"][0] for k, v in ledger.load().items()}
        population, start = list(seeds), 0
        for g in range(s.generations - 1, -1, -1):
            snapshot = state / f"generation_{g}.jsonl"
            if snapshot.exists():
                population, start = read_jsonl(snapshot), g + 1
                break
        decon = None
        if s.eval_file:
            decon = Decontaminator(["\n".join(str(r.get(f, "")) for f in s.eval_fields)
                                    for r in read_jsonl(s.eval_file)])
        sem = asyncio.Semaphore(max(1, work.ctx.cfg.max_in_flight))

        async def one(cid: str, colony: int) -> dict[str, Any]:
            if cid in judged:
                return judged[cid]
            async with sem:
                result = await self._candidate(cid, colony, population, work)
            if not result.get("transport"):
                ledger.append({"in": cid, "out": [result], "dropped": {}, "tokens": result["tokens"]})
            return result

        try:
            for g in range(start, s.generations):
                if len(population) - len(seeds) >= s.target_size:
                    break
                jobs = [(f"g{g}-c{c}-k{k}", c) for c in range(s.colonies) for k in range(s.offspring)]
                results = await asyncio.gather(*(one(cid, c) for cid, c in jobs))
                if work.transport is not None:  # the generation is unfinished: no snapshot, a rerun completes it
                    break
                dedup = Deduplicator(threshold=s.dedup_threshold, seed=work.ctx.seed + 1)
                for member in population:
                    dedup.check(member["instruction"])
                for r in results:
                    work.tokens += r["tokens"]
                    if not r["accepted"]:
                        work.drop(r["reason"])
                        continue
                    if decon is not None and decon.contaminated(r["instruction"]):
                        work.drop("contaminated")
                        continue
                    reason = dedup.check(r["instruction"])
                    if reason:
                        work.drop(reason)
                        continue
                    population.append({"instruction": r["instruction"], "solution": r["solution"],
                                       "origin": r["operator"], "generation": g, "colony": r["colony"],
                                       "fitness": r.get("fitness"), "judge_rating": r.get("judge_rating"),
                                       "tests": r.get("tests"), "cid": r["cid"]})
                write_jsonl_atomic(state / f"generation_{g}.jsonl", population)
        finally:
            ledger.close()
        grown = [p for p in population if p["origin"] != "seed"][:s.target_size]
        if len(population) - len(seeds) > s.target_size:
            work.drop("over_target", len(population) - len(seeds) - s.target_size)
        return [{"messages": [{"role": "user", "content": p["instruction"]},
                              {"role": "assistant", "content": p["solution"]}],
                 "instruction": p["instruction"],
                 "genetic": {k: p.get(k) for k in ("origin", "generation", "colony", "fitness", "judge_rating", "tests")}}
                for p in grown]

