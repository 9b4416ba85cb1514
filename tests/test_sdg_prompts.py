"""Prompt generation stages against a scripted deterministic LLM, with exact expected outputs:
macro topics (+ user topics) -> subtopics -> open QA (+ revisions), writing, closed QA, math,
python; list parsing with the hallucination guard (rules and LLM re-emission)."""

from __future__ import annotations

import json

from nemojax.sdg import listparse
from nemojax.sdg.llm import ScriptedLLM
from tests.sdg_helpers import read, run_pipeline, strip_ids


def scripted(**extra_rules):
    rules = [
        ("broad and varied topics", "Sure! Here they are:\n1. Rivers\n2. \"Cooking\"\n3. Rivers\n4.   \n- Space travel"),
        ("subtopics of the topic \"([^\"]+)\"", "1. Floods of \\1\n2. Maps of \\1"),
        ("Copy the items", "- Rivers\n- Volcanoes\n- Cooking\n- Here they are"),
        ("curious about \"([^\"]+)\"", "1. Why do \\1 matter?\n2. How do \\1 change?"),
        ("Rewrite the request below.*Request: (.*)$", "In detail: \\1"),
        ("write a ([a-z ]+) about \"([^\"]+)\"", "1. A \\1 on \\2."),
        ("Document:\n(.*)$", "1. Who wrote \\1?"),
        ("math problems about \"([^\"]+)\" for ([a-z ]+) students", "1. Add two \\1 (\\2)."),
        ("([a-z]+) Python programming problems about \"([^\"]+)\"", "1. Sort \\2 lists (\\1)."),
    ]
    return ScriptedLLM(rules=rules, default="nothing")


def test_topics_subtopics_open_qa_with_revisions(tmp_path):
    llm = scripted()
    run, summary = run_pipeline(tmp_path, {
        "topics": {"kind": "topics", "n": 10, "user_topics": ["Gardening"]},
        "subtopics": {"kind": "subtopics", "n": 1, "limit": 2},
        "qa": {"kind": "open_qa", "n": 2, "revisions": 1, "limit": 1},
    }, {"gen": llm})
    assert strip_ids(read(run, "topics")) == [
        {"topic": "Rivers", "source": "generated"}, {"topic": "Cooking", "source": "generated"},
        {"topic": "Space travel", "source": "generated"}, {"topic": "Gardening", "source": "user"}]
    assert summary["topics"]["dropped"] == {"duplicate_item": 1}  # the empty "4." line is no item
    assert summary["subtopics"]["dropped"] == {"over_limit": 2}
    assert strip_ids(read(run, "subtopics")) == [{"topic": "Floods of Rivers", "macro_topic": "Rivers"},
                                                 {"topic": "Floods of Cooking", "macro_topic": "Cooking"}]
    qa = strip_ids(read(run, "qa"))
    assert qa == [
        {"task": "open_qa", "topic": "Floods of Rivers", "prompt": "Why do Floods of Rivers matter?"},
        {"task": "open_qa", "topic": "Floods of Rivers", "prompt": "In detail: Why do Floods of Rivers matter?",
         "revised_from": "Why do Floods of Rivers matter?"},
        {"task": "open_qa", "topic": "Floods of Rivers", "prompt": "How do Floods of Rivers change?"},
        {"task": "open_qa", "topic": "Floods of Rivers", "prompt": "In detail: How do Floods of Rivers change?",
         "revised_from": "How do Floods of Rivers change?"}]
    assert summary["qa"]["items_in"] == 1 and summary["qa"]["kept"] == 4
    ids = [r["id"] for r in read(run, "qa")]
    assert len(set(ids)) == 4


def test_llm_list_parser_rejects_items_the_model_did_not_say(tmp_path):
    run, summary = run_pipeline(tmp_path, {"topics": {"kind": "topics", "n": 10, "list_parser": "llm"}},
                                {"gen": scripted()})
    # the YAML re-emission invents "Volcanoes"; "Here they are" is verbatim in the answer, so it stays
    assert [r["topic"] for r in read(run, "topics")] == ["Rivers", "Cooking", "Here they are"]
    assert summary["topics"]["dropped"] == {"hallucinated_item": 1}


def test_writing_closed_qa_math_python(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"id": "d1", "text": "Alice wrote the river report."}) + "\n")
    topics = tmp_path / "topics.jsonl"
    topics.write_text(json.dumps({"topic": "rivers"}) + "\n")
    run, summary = run_pipeline(tmp_path, {
        "topics": {"kind": "read", "path": str(topics)},
        "writing": {"kind": "writing", "materials": ["poem", "essay"], "materials_per_topic": 2, "n": 1},
        "math": {"kind": "math", "input": "topics", "levels": ["high school"], "n": 1},
        "python": {"kind": "python", "input": "topics", "levels": ["beginner"], "n": 1},
        "closed": {"kind": "closed_qa", "documents": str(docs), "n": 1},
    }, {"gen": scripted()})
    writing = strip_ids(read(run, "writing"))
    assert sorted(w["prompt"] for w in writing) == ["A essay on rivers.", "A poem on rivers."]
    assert {w["material"] for w in writing} == {"poem", "essay"}
    assert strip_ids(read(run, "math")) == [{"task": "math", "prompt": "Add two rivers (high school).",
                                             "topic": "rivers", "level": "high school"}]
    assert strip_ids(read(run, "python")) == [{"task": "python", "prompt": "Sort rivers lists (beginner).",
                                               "topic": "rivers", "level": "beginner"}]
    closed = strip_ids(read(run, "closed"))
    assert closed == [{"task": "closed_qa", "question": "Who wrote Alice wrote the river report.?",
                       "prompt": "Alice wrote the river report.\n\nWho wrote Alice wrote the river report.?",
                       "document_id": "d1"}]


def test_listparse_units():
    assert listparse.rule_items("1) a\n2. **b**\n* c\n• d\nplain") == ["a", "b", "c", "d"]
    kept, dropped = listparse.guard(["A", "a ", "zzz", ""], "1. a\n2. b")
    assert kept == ["A"] and dropped == {"duplicate_item": 1, "hallucinated_item": 1, "empty_item": 1}
    assert listparse.yaml_items("```yaml\n- x\n- y\n```") == ["x", "y"]
    assert listparse.yaml_items("key: value") is None and listparse.yaml_items("- [1]") is None
    assert listparse.yaml_items("- a\n- 3") is None  # not a list of strings
