"""Dialogue (3 turns, persona, politeness stripped, greedy) and two-turn prompts against a
scripted LLM, with exact expected conversations."""

from __future__ import annotations

import json

from nemojax.sdg.llm import ScriptedLLM
from nemojax.sdg.stages.dialogue import strip_politeness
from tests.sdg_helpers import read, run_pipeline, strip_ids


def llm():
    def reply(req, i):
        if req.messages[-1]["content"].startswith("You are playing the part"):
            n = req.messages[-1]["content"].count("\n\nAssistant:")
            return f"Thank you so much! That was helpful. Great. Follow-up {n}?"
        return f"Answer {len(req.messages)}."
    return ScriptedLLM(reply)


def test_three_turn_dialogue_exact(tmp_path):
    src = tmp_path / "p.jsonl"
    src.write_text(json.dumps({"prompt": "How do rivers form?", "topic": "rivers"}) + "\n")
    gen = llm()
    run, summary = run_pipeline(tmp_path, {
        "prompts": {"kind": "read", "path": str(src)},
        "dialogues": {"kind": "dialogue", "turns": 3, "personas": ["a geologist"]},
    }, {"gen": gen})
    assert strip_ids(read(run, "dialogues")) == [{"messages": [
        {"role": "user", "content": "How do rivers form?"},
        {"role": "assistant", "content": "Answer 1."},
        {"role": "user", "content": "Follow-up 1?"},
        {"role": "assistant", "content": "Answer 3."},
        {"role": "user", "content": "Follow-up 2?"},
        {"role": "assistant", "content": "Answer 5."}], "persona": "a geologist", "topic": "rivers"}]
    assert all(r.temperature == 0.0 for r in gen.requests)  # greedy by default
    persona_prompts = [r.messages[-1]["content"] for r in gen.requests if "playing the part" in r.messages[-1]["content"]]
    assert "About you: a geologist" in persona_prompts[0] and "Assistant: Answer 1." in persona_prompts[0]
    assert summary["dialogues"]["kept"] == 1


def test_two_turn_and_empty_user_turn_dropped(tmp_path):
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Q1", "Q2"]))

    def reply(req, i):
        if "playing the part" in req.messages[-1]["content"]:
            return "Thanks!" if "Q2" in req.messages[-1]["content"] else "And then?"
        return "A."
    run, summary = run_pipeline(tmp_path, {
        "prompts": {"kind": "read", "path": str(src)},
        "two": {"kind": "two_turn", "personas": ["p"]},
    }, {"gen": ScriptedLLM(reply)})
    assert strip_ids(read(run, "two")) == [{"messages": [
        {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A."},
        {"role": "user", "content": "And then?"}], "persona": "p"}]
    assert summary["two"]["dropped"] == {"empty_user_turn": 1}


def test_strip_politeness():
    assert strip_politeness("Thank you! Can you explain more?") == "Can you explain more?"
    assert strip_politeness("Great question. Sure, I'd be happy to help. What about X?") == "What about X?"
    assert strip_politeness("Thanks so much for that, it helped.\nWhy is it so?") == "Why is it so?"
    assert strip_politeness('"I appreciate it. Why?"') == "Why?"
    assert strip_politeness("Why do thanks matter?") == "Why do thanks matter?"  # only at a sentence start
