"""Genetic Instruct against scripted instructor / coder / judge models (exact population), the
sandboxed test-running fitness, and the sandbox's limits."""

from __future__ import annotations

import asyncio
import json
import re

from nemojax.sdg.llm import ScriptedLLM
from nemojax.sdg.sandbox import run_python
from tests.sdg_helpers import read, run_pipeline


def instructor(req, i):
    text = req.messages[-1]["content"]
    m = re.search(r"Here is a programming problem:\n\n(.*?)\n\nWrite a new problem", text, re.DOTALL)
    if m:
        return f"{m.group(1)} (v{req.seed % 97})"
    return f"Combine: {text.count('Problem ')} parents (v{req.seed % 89})"


def coder(req, i):
    problem = req.messages[-1]["content"]
    if "broken" in problem:
        return "```python\nassert 1 == 2\n```"
    return "```python\ndef f(x):\n    return x\nassert f(2) == 2\n```"


def judge(req, i):
    return "3" if "Combine" in req.messages[-1]["content"] else "8"


def seeds(tmp_path, rows):
    p = tmp_path / "seeds.jsonl"
    p.write_text("".join(json.dumps({"instruction": r}) + "\n" for r in rows))
    return str(p)


def test_population_grows_merges_colonies_and_stops_at_target(tmp_path):
    stages = {
        "seeds": {"kind": "read", "path": seeds(tmp_path, ["Reverse a list.", "Sum a list."])},
        "gi": {"kind": "genetic_instruct", "colonies": 2, "generations": 3, "offspring": 3, "target_size": 5,
               "crossover_rate": 0.5, "coder": "coder", "judge": "judge", "min_fitness": 0.6},
    }
    clients = {"gen": ScriptedLLM(instructor), "coder": ScriptedLLM(coder), "judge": ScriptedLLM(judge)}
    run, summary = run_pipeline(tmp_path, stages, clients)
    out = read(run, "gi")
    assert len(out) == 5  # target reached (and cut to it)
    for rec in out:
        assert rec["messages"][0] == {"role": "user", "content": rec["instruction"]}
        assert rec["messages"][1]["content"].startswith("```python")
        assert rec["genetic"]["origin"] == "mutation" and rec["genetic"]["judge_rating"] == 8
        assert rec["genetic"]["colony"] in (0, 1)
    assert {r["genetic"]["colony"] for r in out} == {0, 1}  # both colonies contribute
    dropped = summary["gi"]["dropped"]
    assert dropped.get("low_fitness", 0) > 0  # crossover children are rated 3
    # a second identical run gives the identical population (deterministic)
    run2, _ = run_pipeline(tmp_path / "again", stages, {"gen": ScriptedLLM(instructor), "coder": ScriptedLLM(coder),
                                                        "judge": ScriptedLLM(judge)})
    assert [r["instruction"] for r in read(run2, "gi")] == [r["instruction"] for r in out]


def test_duplicates_are_removed_and_tests_fitness(tmp_path):
    stages = {
        "seeds": {"kind": "read", "path": seeds(tmp_path, ["Task broken", "Task fine"])},
        "gi": {"kind": "genetic_instruct", "colonies": 2, "generations": 1, "offspring": 2, "target_size": 50,
               "crossover_rate": 0.0, "fitness": "tests"},
    }
    same = ScriptedLLM(lambda r, i: coder(r, i) if "Solve" in r.messages[-1]["content"] else
                       ("Task broken again" if "broken" in r.messages[-1]["content"] else "Task fine again"))
    run, summary = run_pipeline(tmp_path, stages, {"gen": same})
    out = read(run, "gi")
    assert [r["instruction"] for r in out] == ["Task fine again"]
    assert out[0]["genetic"]["tests"] == {"passed": True, "reason": "ok"}
    d = summary["gi"]["dropped"]
    assert d.get("tests_failed", 0) >= 1 and d.get("exact_duplicate", 0) >= 1


def test_sandbox_limits():
    ok = asyncio.run(run_python("assert sum([1, 2]) == 3"))
    assert ok.passed and ok.reason == "ok"
    bad = asyncio.run(run_python("assert 1 == 2"))
    assert not bad.passed and bad.reason == "failed" and "AssertionError" in bad.stderr
    loop = asyncio.run(run_python("while True:\n    pass", timeout_s=1.0))
    assert not loop.passed and loop.reason == "timeout"
    mem = asyncio.run(run_python("x = bytearray(2 * 1024 ** 3)", memory_mb=256))
    assert not mem.passed and mem.reason == "memory"
    escape = asyncio.run(run_python("import os; assert os.environ.get('HOME') is None and os.getcwd().startswith('/tmp')"))
    assert escape.passed  # empty environment, scratch working directory
