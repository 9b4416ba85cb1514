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


class FakeScorer:
    """RewardScorer's contract: a malformed conversation fails the whole call with ChatFormatError."""

    def __init__(self, broken: bool = False) -> None:
        self.broken = broken

    def score(self, conversations):
        from nemojax.data.chat_template import ChatFormatError

        if self.broken:
            raise RuntimeError("device lost")
        if any(c[-1]["role"] != "assistant" for c in conversations):
            raise ChatFormatError("conversations[i]: must end with the assistant response")
        return [{"helpfulness": float(len(c[-1]["content"]))} for c in conversations]


def test_in_process_reward_fails_only_the_malformed_conversation_and_a_broken_scorer_as_transport():
    """One malformed conversation in a batch is that item's outcome (`bad_conversation`), the
    others are scored; a scorer that breaks is a transport failure (the items are retried by a
    rerun). Mutants killed: the whole batch failed for one bad conversation; a broken scorer
    recorded as the items' result."""
    import asyncio

    from nemojax.sdg.llm import LLMError
    from nemojax.sdg.reward import InProcessReward

    good = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "abc"}]
    bad = [{"role": "user", "content": "q"}]

    async def go(reward):
        return await asyncio.gather(reward.score(good), reward.score(bad), reward.score(good),
                                    return_exceptions=True)
    ok, err, ok2 = asyncio.run(go(InProcessReward(FakeScorer(), weights={"helpfulness": 1.0})))
    assert ok == ok2 == {"helpfulness": 3.0, "reward": 3.0}
    assert isinstance(err, LLMError) and (err.reason, err.transport) == ("bad_conversation", False)
    errors = asyncio.run(go(InProcessReward(FakeScorer(broken=True))))
    assert all(isinstance(e, LLMError) and (e.reason, e.transport) == ("reward_error", True) for e in errors)
