"""Genetic Instruct against scripted instructor / coder / judge models (exact population), the
fitness boundary, decontamination, and the sandboxed test-running fitness (the sandbox itself:
tests/test_sdg_sandbox.py)."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from nemojax.config import ConfigError
from nemojax.sdg import sandbox
from nemojax.sdg.llm import ScriptedLLM
from tests.sdg_helpers import read, run_pipeline


@pytest.fixture
def sandbox_available():
    try:
        asyncio.run(sandbox.ensure_sandbox())
    except sandbox.SandboxUnavailable as e:
        from tests.test_sdg_sandbox import namespaces_available

        if namespaces_available():
            raise
        pytest.skip(f"no namespaces here: {e}")


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
    if "isolated" in problem:  # holds only inside the sandbox (no /proc there)
        return "```python\nimport os\nassert not os.path.exists('/proc/self')\n```"
    if "sneaky" in problem:  # exits 0 before its asserts
        return "```python\nimport sys\nsys.exit(0)\nassert 1 == 2\n```"
    return "```python\ndef f(x):\n    return x\nassert f(2) == 2\n```"


def judge(req, i):
    return "3" if "Combine" in req.messages[-1]["content"] else "8"


def candidates(run):
    """Every bred candidate, as the stage's ledger recorded it."""
    lines = (run / ".work" / "gi" / "candidates.ledger.jsonl").read_text().splitlines()
    return [json.loads(l)["out"][0] for l in lines if '"out"' in l]


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


def test_duplicates_are_removed_and_tests_fitness(tmp_path, sandbox_available):
    """Mutants: `fitness: tests` taking exit status 0 as passed (the sneaky solution exits before
    its asserts and must be dropped as tests_exited_early); the stage's `sandbox` key ignored or
    the code run unconfined (the isolated solution's assert holds only in the sandbox)."""
    stages = {
        "seeds": {"kind": "read", "path": seeds(tmp_path, ["Task broken", "Task fine", "Task sneaky", "Task isolated"])},
        "gi": {"kind": "genetic_instruct", "colonies": 2, "generations": 1, "offspring": 6, "target_size": 50,
               "crossover_rate": 0.0, "fitness": "tests"},
    }
    def instruct(r, i):
        for word in ("broken", "sneaky", "isolated"):
            if word in r.messages[-1]["content"]:
                return f"Task {word} again"
        return "Task fine again"

    same = ScriptedLLM(lambda r, i: coder(r, i) if "Solve" in r.messages[-1]["content"] else instruct(r, i))
    run, summary = run_pipeline(tmp_path, stages, {"gen": same})
    out = read(run, "gi")
    assert sorted(r["instruction"] for r in out) == ["Task fine again", "Task isolated again"]
    assert all(r["genetic"]["tests"] == {"passed": True, "reason": "ok"} for r in out)
    d = summary["gi"]["dropped"]
    assert d.get("tests_failed", 0) >= 1 and d.get("exact_duplicate", 0) >= 1
    sneaky = [c for c in candidates(run) if "sneaky" in c["instruction"]]
    assert sneaky and all(c["reason"] == "tests_exited_early" for c in sneaky)


def test_min_fitness_is_inclusive(tmp_path):
    """Mutant: `min_fitness` compared with `<=` (a rating exactly at the threshold dropped).
    `min_fitness` is the rating / 10 *needed* to join: 6/10 joins at 0.6, 5/10 does not."""
    stages = {
        "seeds": {"kind": "read", "path": seeds(tmp_path, ["Reverse a list.", "Sum a list."])},
        "gi": {"kind": "genetic_instruct", "colonies": 1, "generations": 1, "offspring": 6, "target_size": 50,
               "crossover_rate": 0.0, "min_fitness": 0.6},
    }

    def model(req, i):
        text = req.messages[-1]["content"]
        if "Rate how correct" in text:
            return "6" if "Reverse" in text else "5"
        return coder(req, i) if "Solve" in text else instructor(req, i)

    run, summary = run_pipeline(tmp_path, stages, {"gen": ScriptedLLM(model)})
    out = read(run, "gi")
    ledger = candidates(run)
    at_threshold = [c for c in ledger if c["instruction"].startswith("Reverse")]
    below = [c for c in ledger if c["instruction"].startswith("Sum")]
    assert at_threshold and below  # both sides of the boundary were bred
    assert sorted(r["instruction"] for r in out) == sorted(c["instruction"] for c in at_threshold)
    assert all(r["genetic"]["fitness"] == 0.6 for r in out)
    assert summary["gi"]["dropped"]["low_fitness"] == len(below)


def test_contaminated_candidates_never_join(tmp_path):
    """Mutant: Genetic Instruct without decontamination (a candidate holding a 20-word span of an
    evaluation prompt, 8 of its distinctive 13-grams, joins the population and the output)."""
    leaked = ("Write a function that returns the number of vowels in the string given as its only argument "
              "and treats the letter y as a vowel only at the end of a word")
    evals = tmp_path / "eval.jsonl"
    evals.write_text(json.dumps({"prompt": f"Problem 7. {leaked}, ignoring case. Return 0 for an empty string "
                                           "and raise TypeError when the argument is not a string."}) + "\n")
    stages = {
        "seeds": {"kind": "read", "path": seeds(tmp_path, ["Reverse a list.", leaked])},
        "gi": {"kind": "genetic_instruct", "colonies": 1, "generations": 1, "offspring": 6, "target_size": 50,
               "crossover_rate": 0.0, "min_fitness": 0.1, "eval_file": str(evals)},
    }
    clients = {"gen": ScriptedLLM(instructor), "coder": ScriptedLLM(coder), "judge": ScriptedLLM(judge)}
    stages["gi"].update(coder="coder", judge="judge")
    run, summary = run_pipeline(tmp_path, stages, clients)
    out = read(run, "gi")
    ledger = candidates(run)
    leaking = [c for c in ledger if c.get("accepted") and leaked in c["instruction"]]
    assert leaking and out  # the contaminated candidates were fit; the clean ones joined
    assert not any(leaked in r["instruction"] for r in out)
    assert summary["gi"]["dropped"]["contaminated"] == len(leaking)


def test_sandbox_key_is_checked_and_an_unavailable_sandbox_refuses_the_stage(tmp_path, monkeypatch):
    """Code is never run unconfined by accident: a sandbox that cannot isolate stops the stage
    before any candidate is bred (no candidate recorded as a failed test)."""
    stages = {"seeds": {"kind": "read", "path": seeds(tmp_path, ["Task fine"])},
              "gi": {"kind": "genetic_instruct", "generations": 1, "offspring": 1, "fitness": "tests",
                     "sandbox": "none"}}
    with pytest.raises(ConfigError, match="sandbox='none'.*unsafe-process-group"):
        run_pipeline(tmp_path, stages, {"gen": ScriptedLLM(coder)})
    stages["gi"]["sandbox"] = "auto"
    monkeypatch.setattr(sandbox, "_checked", {})
    monkeypatch.setattr(sandbox.sys, "platform", "darwin")
    with pytest.raises(ConfigError, match="stages.gi.sandbox: cannot isolate generated code"):
        run_pipeline(tmp_path / "b", stages, {"gen": ScriptedLLM(coder)})
    assert not (tmp_path / "b" / "run" / ".work" / "gi" / "candidates.ledger.jsonl").exists()


def test_genetic_judge_reads_scores_with_the_shared_parser():
    """Catches: a local score reader in Genetic Instruct (the old one read "On a scale of 1 to
    10: 7" as 1, the first digit it met)."""
    from nemojax.sdg.stages import genetic

    assert genetic.judge_score("On a scale of 1 to 10: 7") == 7
    assert genetic.judge_score("7 or 8") is None


def test_a_transport_failure_is_retried_not_recorded(tmp_path):
    """Mutants: a candidate whose backend call failed for a transport reason written to the
    candidate ledger as a drop (a rerun would replay the drop instead of asking again), or the
    unfinished generation snapshotted (a rerun would skip the generation)."""
    from nemojax.sdg.llm import LLMError
    from nemojax.sdg.runner import StageIncomplete

    stages = {
        "seeds": {"kind": "read", "path": seeds(tmp_path, ["Reverse a list.", "Sum a list."])},
        "gi": {"kind": "genetic_instruct", "colonies": 1, "generations": 2, "offspring": 3, "target_size": 50,
               "crossover_rate": 0.0, "coder": "coder", "judge": "judge", "min_fitness": 0.1},
    }
    asked: list[str] = []

    def flaky_coder(req, i):
        asked.append(req.messages[-1]["content"])
        if "Reverse" in req.messages[-1]["content"] and len(asked) <= 3:
            raise LLMError("connection refused", "http_error", transport=True)
        return coder(req, i)

    clients = {"gen": ScriptedLLM(instructor), "coder": ScriptedLLM(flaky_coder), "judge": ScriptedLLM(judge)}
    with pytest.raises(StageIncomplete):
        run_pipeline(tmp_path, stages, clients)
    work = tmp_path / "run" / ".work" / "gi"
    assert not (work / "generation_0.jsonl").exists()
    assert all(c["reason"] != "transport" for c in candidates(tmp_path / "run"))
    recorded = len(candidates(tmp_path / "run"))
    assert recorded < 3  # the failed candidates are not in the ledger
    run, summary = run_pipeline(tmp_path, stages, clients)  # the backend is back: only those are asked again
    want, _ = run_pipeline(tmp_path / "clean", stages, {"gen": ScriptedLLM(instructor),
                                                         "coder": ScriptedLLM(coder), "judge": ScriptedLLM(judge)})
    assert read(run, "gi") == read(want, "gi")
    assert "http_error" not in summary["gi"]["dropped"]
