"""Judges and preference data against scripted LLMs / rewards, exact outputs: reward threshold
filter, reward-as-judge pairs, LLM-as-judge asked twice with the order swapped (kept only when
both agree), math ground truth, instruction checkers; instruction prompts and filter; exports in
the post-training schemas."""

from __future__ import annotations

import json

from nemojax.sdg.llm import ScriptedLLM
from nemojax.sdg.reward import ScriptedReward
from nemojax.sdg.stages.judges import final_answer, verdict
from tests.sdg_helpers import read, run_pipeline, strip_ids


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def length_reward(messages):
    return {"helpfulness": len(messages[-1]["content"]) / 10.0}


def test_reward_filter_and_reward_preference(tmp_path):
    src = write(tmp_path / "p.jsonl", [{"prompt": "Say something."}, {"prompt": "Say more."}])
    short = ScriptedLLM(lambda r, i: "ok")
    long = ScriptedLLM(lambda r, i: "a much longer answer" if "more" in r.messages[0]["content"] else "ok")
    run, summary = run_pipeline(tmp_path, {
        "prompts": {"kind": "read", "path": src},
        "answers": {"kind": "respond", "clients": ["short", "long"]},
        "kept": {"kind": "reward_filter", "threshold": 0.5},
        "pairs": {"kind": "preference", "input": "answers", "judge": "reward", "margin": 0.1},
        "dpo": {"kind": "export_preference"},
    }, {"short": short, "long": long}, reward=ScriptedReward(length_reward, weights={"helpfulness": 1.0}))
    kept = strip_ids(read(run, "kept"))
    assert [k["messages"][-1]["content"] for k in kept] == ["a much longer answer"]
    assert kept[0]["reward"] == {"helpfulness": 2.0, "reward": 2.0}
    assert summary["kept"]["dropped"] == {"below_threshold": 3}
    assert summary["pairs"]["dropped"] == {"duplicate_response": 1, "fewer_than_two_responses": 1}
    assert strip_ids(read(run, "dpo")) == [{
        "prompt": "Say more.", "chosen": "a much longer answer", "rejected": "ok",
        "chosen_reward": 2.0, "rejected_reward": 0.2,
        "judge": {"kind": "reward", "chosen_from": "long", "rejected_from": "short",
                  "chosen_scores": {"helpfulness": 2.0, "reward": 2.0},
                  "rejected_scores": {"helpfulness": 0.2, "reward": 0.2}}}]


def test_llm_judge_needs_both_orders_to_agree(tmp_path):
    src = write(tmp_path / "p.jsonl", [{"prompt": "consistent"}, {"prompt": "positional"}])

    def judge(req, i):
        text = req.messages[-1]["content"]
        if "positional" in text:
            return "A"  # always prefers whichever is shown first: inconsistent under swapping
        return "A" if "Response A:\ngood" in text else "The better one is B."

    run, summary = run_pipeline(tmp_path, {
        "prompts": {"kind": "read", "path": src},
        "answers": {"kind": "respond", "clients": ["bad", "good"]},
        "pairs": {"kind": "preference", "judge": "llm", "client": "judge"},
    }, {"bad": ScriptedLLM(lambda r, i: "bad"), "good": ScriptedLLM(lambda r, i: "good"),
        "judge": ScriptedLLM(judge)})
    pairs = strip_ids(read(run, "pairs"))
    assert pairs == [{"prompt": "consistent", "chosen": "good", "rejected": "bad",
                      "judge": {"kind": "llm", "chosen_from": "good", "rejected_from": "bad",
                                "verdicts": ["B", "A"], "order": ["ab", "ba"]}}]
    assert summary["pairs"]["dropped"] == {"judge_disagrees": 1}
    assert verdict("Answer: b") == "B" and verdict("neither") is None


def test_math_ground_truth_judge(tmp_path):
    src = write(tmp_path / "p.jsonl", [{"prompt": "2+2?", "answer": "4"}, {"prompt": "3*3?", "answer": 9}])
    run, summary = run_pipeline(tmp_path, {
        "prompts": {"kind": "read", "path": src},
        "answers": {"kind": "respond", "clients": ["a", "b"]},
        "pairs": {"kind": "preference", "judge": "math"},
    }, {"a": ScriptedLLM(lambda r, i: "So the answer is 4." if "2+2" in r.messages[0]["content"] else "= 9"),
        "b": ScriptedLLM(lambda r, i: "I get \\boxed{5}" if "2+2" in r.messages[0]["content"] else "It is 9.0")})
    assert strip_ids(read(run, "pairs")) == [{
        "prompt": "2+2?", "chosen": "So the answer is 4.", "rejected": "I get \\boxed{5}",
        "chosen_reward": 1.0, "rejected_reward": 0.0,
        "judge": {"kind": "math", "chosen_from": "a", "rejected_from": "b", "reference": "4",
                  "chosen_answer": "4", "rejected_answer": "5"}}]
    assert summary["pairs"]["dropped"] == {"no_incorrect_response": 1}  # 3*3: both right (9 == 9.0)
    assert final_answer("1,000 apples; answer: 3/4") == "0.75" and final_answer("no digits") is None


def test_instruction_prompts_filter_and_instruction_judge(tmp_path):
    src = write(tmp_path / "p.jsonl", [{"prompt": "Describe a river."}])
    run, summary = run_pipeline(tmp_path, {
        "prompts": {"kind": "read", "path": src},
        "ifp": {"kind": "instruction_prompts", "allowed": ["punctuation:no_comma"], "max_instructions": 1},
        "answers": {"kind": "respond", "clients": ["comma", "clean"]},
        "passing": {"kind": "instruction_filter"},
        "sft": {"kind": "export_sft", "system": "Be brief."},
        "pairs": {"kind": "preference", "input": "answers", "judge": "instructions"},
    }, {"comma": ScriptedLLM(lambda r, i: "Wide, long, wet."), "clean": ScriptedLLM(lambda r, i: "Wide and wet.")})
    ifp = strip_ids(read(run, "ifp"))
    prompt = "Describe a river.\n\nDo not use a single comma anywhere in your answer."
    assert ifp == [{"messages": [{"role": "user", "content": prompt}], "instruction_id_list": ["punctuation:no_comma"],
                    "kwargs": [{}], "variant": "single_turn"}]
    assert strip_ids(read(run, "sft")) == [{"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt},
        {"role": "assistant", "content": "Wide and wet."}]}]
    assert summary["passing"]["dropped"] == {"failed_instructions": 1}
    pairs = strip_ids(read(run, "pairs"))
    assert pairs[0]["chosen"] == "Wide and wet." and pairs[0]["rejected"] == "Wide, long, wet."
    assert pairs[0]["judge"]["chosen_follows"] == [True] and pairs[0]["judge"]["rejected_follows"] == [False]


def test_multi_turn_and_revision_variants(tmp_path):
    src = write(tmp_path / "p.jsonl", [{"prompt": "Q one?"}, {"prompt": "Q two?"}])
    run, _ = run_pipeline(tmp_path, {
        "prompts": {"kind": "read", "path": src},
        "multi": {"kind": "instruction_prompts", "variants": ["multi_turn"], "allowed": ["punctuation:no_comma"],
                  "max_instructions": 1},
        "answers": {"kind": "respond"},
        "passing": {"kind": "instruction_filter"},
        "rev": {"kind": "instruction_prompts", "input": "prompts", "variants": ["revision"],
                "allowed": ["punctuation:no_comma"], "max_instructions": 1},
    }, {"gen": ScriptedLLM(lambda r, i: f"Reply {len(r.messages)}")})
    answers = strip_ids(read(run, "answers"))
    conv = answers[0]["responses"][0]["messages"]
    assert [m["role"] for m in conv] == ["user", "assistant", "user", "assistant"]
    assert conv[2]["content"] == "Q two?" and conv[3]["content"] == "Reply 3"
    assert "every question I ask after it" in conv[0]["content"]
    assert len(read(run, "passing")) == 2  # every assistant turn is comma-free
    rev = strip_ids(read(run, "rev"))[0]
    assert [m["content"] for m in rev["messages"]][:2] == ["Q one?", "Reply 1"]
    assert rev["messages"][2]["content"].startswith("Rewrite your previous answer")
