"""Program verifiers in SDG: verify_filter keeps exactly the answers the verifier accepts (one per
prompt with max_kept), the verifier judge pairs a correct with an incorrect answer, select picks
records by field, and a bad verifier name is a config error naming it."""

from __future__ import annotations

import json

import pytest

from nemojax.align.tasks import Task
from nemojax.config import ConfigError
from nemojax.sdg.llm import ScriptedLLM
from tests.sdg_helpers import read, run_pipeline, strip_ids

TASKS = [Task("arithmetic", 1, "What is 2 + 3?", "2 + 3 = 5. The answer is 5.", {"kind": "number", "value": 5}),
         Task("strings", 1, 'Repeat the word "abc".', "abc", {"kind": "text", "value": "abc"}),
         Task("arithmetic", 1, "What is 4 - 4?", "4 - 4 = 0. The answer is 0.", {"kind": "number", "value": 0})]


def pool(tmp_path):
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps(t.to_json()) + "\n" for t in TASKS))
    return str(path)


def answers(req, i):
    """Sample 0 right, sample 1 wrong for the sums; "abc" always right; 4 - 4 always wrong."""
    q = req.messages[-1]["content"]
    if "2 + 3" in q:
        return ["The answer is 5.", "The answer is 6."][i]
    if "abc" in q:
        return "abc"
    return "The answer is 1."


def test_verify_filter_judge_and_select(tmp_path):
    run, summary = run_pipeline(tmp_path, {
        "pool": {"kind": "read", "path": pool(tmp_path)},
        "answers": {"kind": "respond", "n": 2},
        "correct": {"kind": "verify_filter", "verifier": "nemojax.align.tasks:verify_record", "max_kept": 1},
        "sft": {"kind": "export_sft"},
        "strings_only": {"kind": "select", "input": "correct", "field": "family", "values": ["strings"]},
        "pairs": {"kind": "preference", "input": "answers", "judge": "verifier",
                  "verifier": "nemojax.align.tasks:verify_record"},
        "dpo": {"kind": "export_preference"},
    }, {"gen": ScriptedLLM(answers)})
    assert [r["messages"] for r in strip_ids(read(run, "sft"))] == [
        [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "The answer is 5."}],
        [{"role": "user", "content": 'Repeat the word "abc".'}, {"role": "assistant", "content": "abc"}]]
    assert summary["correct"]["dropped"] == {"verifier_rejected": 3, "over_max_kept": 1}
    assert [r["prompt"] for r in read(run, "strings_only")] == ['Repeat the word "abc".']
    assert summary["strings_only"]["dropped"] == {"not_selected": 1}
    pairs = strip_ids(read(run, "dpo"))
    assert [(p["prompt"], p["chosen"], p["rejected"], p["chosen_reward"], p["rejected_reward"]) for p in pairs] == [
        ("What is 2 + 3?", "The answer is 5.", "The answer is 6.", 1.0, 0.0)]
    assert pairs[0]["judge"]["passed"] == 1 and pairs[0]["judge"]["total"] == 2
    assert summary["pairs"]["dropped"] == {"duplicate_response": 2, "fewer_than_two_responses": 2}


def test_unknown_verifier_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="nemojax.align.tasks:nope"):
        run_pipeline(tmp_path, {
            "pool": {"kind": "read", "path": pool(tmp_path)},
            "answers": {"kind": "respond"},
            "correct": {"kind": "verify_filter", "verifier": "nemojax.align.tasks:nope"}},
            {"gen": ScriptedLLM(answers)})
