"""reward_filter keeps a conversation whose reward is at or above `threshold`, boundary included."""

from __future__ import annotations

import json
import math

from nemojax.sdg.llm import ScriptedLLM
from nemojax.sdg.reward import ScriptedReward
from tests.sdg_helpers import read, run_pipeline

REWARDS = {"at": 0.5, "just below": math.nextafter(0.5, 0.0), "above": 0.75, "just above": math.nextafter(0.5, 1.0)}


def test_reward_filter_keeps_a_reward_exactly_at_the_threshold(tmp_path):
    """Mutants killed: reward_filter comparing with `>` instead of `>=` (issue 22), which drops the
    response scored exactly 0.5; a comparison with a tolerance, which keeps the one scored one
    ulp below."""
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps({"prompt": name}) + "\n" for name in REWARDS))
    run, summary = run_pipeline(tmp_path, {
        "prompts": {"kind": "read", "path": str(src)},
        "answers": {"kind": "respond"},
        "kept": {"kind": "reward_filter", "threshold": 0.5},
    }, {"gen": ScriptedLLM(lambda request, i: request.messages[0]["content"])},
        reward=ScriptedReward(lambda messages: {"reward": REWARDS[messages[-1]["content"]]}))
    kept = {r["messages"][-1]["content"]: r["reward"]["reward"] for r in read(run, "kept")}
    assert kept == {"at": 0.5, "above": 0.75, "just above": REWARDS["just above"]}
    assert summary["kept"]["dropped"] == {"below_threshold": 1}
