"""Judges and preference data against scripted LLMs / rewards, exact outputs: reward threshold
filter, reward-as-judge pairs, LLM-as-judge asked twice with the order swapped (kept only when
both agree), math ground truth, instruction checkers (every turn of a multi-turn conversation);
instruction prompts and filter; exports in the post-training schemas. The judge-reply readers
(verdicts, 1-10 scores) against hand-labelled phrasings."""

from __future__ import annotations

import json

from nemojax.sdg.llm import ScriptedLLM
from nemojax.sdg.reward import ScriptedReward
from nemojax.sdg.judge_replies import judge_score, parse_verdict, verdict
from nemojax.sdg.stages.judges import final_answer
from tests.sdg_helpers import read, run_pipeline, strip_ids


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# (judge reply, verdict written by hand): "A" / "B" / "tie" / None (no verdict stated)
VERDICTS = [
    # one letter, any case or dress
    ("A", "A"), ("B", "B"), ("b", "B"), ("a", "A"), ("B.", "B"), ("**B**", "B"), ("Definitely B!", "B"),
    ("response a", "A"), ("Output (a)", "A"), ("Option (B)", "B"), ("I'd pick (A).", "A"), ("the former", "A"),
    # labels
    ("Response B", "B"), ("Assistant A", "A"), ("The first response is better.", "A"), ("The second one.", "B"),
    ("Assistant B's answer is more helpful.", "B"), ("assistant b is better", "B"),
    # final-verdict markers and declarations
    ("[[A]]", "A"), ("[[B]]", "B"), ("[[C]]", "tie"), ("[[tie]]", "tie"), ("**Final verdict:** [[A]]", "A"), ("Answer: b", "B"),
    ("Verdict: A", "A"), ("My choice is B.", "B"), ("The better response is B.", "B"),
    ("After careful thought, the winner is Response A", "A"), ("The answer is a", "A"),
    ("Response A is accurate but verbose. Response B is concise. Overall, B.", "B"),
    ("Response A is more detailed, but B is more accurate; overall, A.", "A"),
    ("I prefer a shorter answer, so B.", "B"), ("U.S.A. aside: B.", "B"),
    # comparisons, either direction
    ("B is better than A.", "B"), ("A is better than B.", "A"), ("A is worse than B.", "B"),
    ("A is slightly worse.", "B"), ("B is worse than A.", "A"), ("Response B is weaker.", "A"),
    ("b is better", "B"), ("B is the clear winner.", "B"), ("B wins over A", "B"), ("B is not as good as A.", "A"),
    ("Both are good, but A is a bit better.", "A"), ("A > B", "A"), ("A < B", "B"), ("I prefer B.", "B"),
    ("I'd go with Assistant B.", "B"), ("I choose response B over response A.", "B"),
    # the last statement is the conclusion
    ("A is more concise, but B is better overall.", "B"), ("At first I thought A was better, but B is better.", "B"),
    ("Verdict: B. On reflection, final verdict: A", "A"), ("[[B]] ... no, [[A]]", "A"),
    # hedges and articles: "a" is an article, not a vote
    ("It is a close call, but B is better.", "B"), ("A close call, but I think A.", "A"),
    ("Verdict: A close call, but B wins.", "B"), ("B, because it is more accurate.", "B"),
    ("A has an error. B.", "B"), ("A. Accuracy is fine.\nB. Clarity is poor.", "A"),
    # ties
    ("Both are equally good.", "tie"), ("It's a tie.", "tie"), ("neither", "tie"), ("Equal.", "tie"),
    ("Neither response is correct.", "tie"), ("There is no clear winner.", "tie"), ("A = B", "tie"),
    ("They are about the same.", "tie"), ("Neither A nor B answers the question.", "tie"),
    # no verdict: refusals, descriptions, negations, mentions
    ("", None), ("None", None), ("I cannot decide which is better.", None), ("Sorry, I can't help with that.", None),
    ("Which one? A or B? Hard to say.", None), ("A good answer would cite sources.", None),
    ("The answer is a bit long, but it is correct.", None), ("A is not better than B.", None),
    ("I would not choose A.", None), ("Not A.", None), ("Both responses have issues.", None),
    ("Response A: accurate.\nResponse B: clear.", None), ("The U.S.A. team wrote B.", None),
    ("I cannot compare Response A and Response B without more context.", None),
]

# (judge reply, 1-10 score written by hand; None: no score, a hedge, or off the scale)
SCORES = [
    ("7", 7), ("**8**", 8), ("10", 10), ("1", 1), ("7/10", 7), ("8.5/10", 8.5), ("10/10 would run again", 10),
    ("Rate: 10/10!", 10), ("7 out of 10", 7), ("Score: 7 out of 10", 7), ("Rating: 8/10 (very good)", 8),
    ("I rate this solution 6 out of 10 because 3 of the tests fail.", 6), ("Score: 7", 7), ("Score = 8", 8),
    ("**Score:** 6", 6), ("Final score: 3", 3), ("Rating: 7.5", 7.5), ("Score: 7.25", 7.25), ("Score: 7.0", 7),
    ("[[7]]", 7), ("Rating: [[9]]", 9), ("On a scale of 1 to 10: 7", 7), ("Rating on a scale of 1 to 10: 7", 7),
    ("Score: 7. (On a scale of 1-10)", 7), ("I would rate it 7.", 7), ("I'd give it an 8.", 8),
    ("3/4 of the tests pass. Score: 6", 6), ("The code runs in O(n^2). Rating: 5", 5),
    ("The solution handles 3 cases. 8", 8), ("8\n\nThe solution is correct but lacks edge cases.", 8),
    ("Score: 6\nAfter review: 8", 6), ("Initial score: 5. Revised score: 8", 8),
    ("7/10 at first, but after running the tests, 9/10", 9),
    ("Rating: 8/10.", 8), ("8 out of 10.", 8), ("Solid work: 9/10. Minor nits only.", 9),  # a sentence's full stop
    # a skipped candidate (a fraction of something else, another scale, a hedge) before the score
    ("3/4 of the tests pass; I give it 8/10.", 8), ("Score: 4/5 for style, but my score is 7 overall.", 7),
    ("Score: 7 or 8 at first, then score: 8 after the fix.", 8),
    # no score
    ("0", None), ("11", None), ("Score: 15", None), ("11/10", None), ("Score: 10.5", None), ("Score: -3", None),
    ("7/10.5", None), ("Score: 3-4-5", None), ("Rating on a scale of 1 to 10-7", None),
    ("7-8", None), ("7 or 8", None), ("Score: 7 or 8", None), ("I'd rate it 6 or 7.", None), ("Score: 6 to 8", None),
    ("Score: 4/5", None), ("Score: 70%", None), ("From 1 to 10, I'd say 9.", None),
    ("N/A", None), ("I cannot rate this.", None), ("", None), ("seven", None), ("Grade: B", None),
]


def test_verdicts_of_hand_labelled_replies():
    """Kills: reading the first letter-like token (the article "a" as a vote for A), taking the
    first statement instead of the last, dropping ties into A/B, guessing when no verdict is stated;
    "B is worse" read as B or as no side (`_other` returning "B" always, "a" or "XXAXX"); the marker
    "[[tie]]" read as "TIE" (`("C", "TIE")` -> `("C", "tie")` / `"XXTIEXX"`)."""
    assert len(VERDICTS) >= 30
    wrong = [(reply, want, parse_verdict(reply)) for reply, want in VERDICTS if parse_verdict(reply) != want]
    assert not wrong, f"{len(wrong)} misread (reply, want, got): {wrong}"
    assert verdict("Both are equally good.") is None and verdict("It is a close call, but B is better.") == "B"
    assert parse_verdict(None) is None


def test_scores_of_hand_labelled_replies():
    """Kills: taking the first number (the 1 of "on a scale of 1 to 10"), clipping out-of-range
    scores into the scale, reading a hedge ("7 or 8") as a score, fractions of other things as scores;
    `continue` -> `break` after a skipped candidate (a fraction of something else, a score on another
    scale, a hedge), which loses the real score after it. A fraction closing a sentence ("Rating:
    8/10.") was read as no score until these were written (the denominator refused any "." after it).
    Numbers glued to a range or a scale by a dash ("3-4-5", "1 to 10-7") are no score: kills the
    placeholders `" range "` / `" scale "` -> `"XX range XX"` / `"XX scale XX"` (a word character
    before the "-" then hides the minus sign and a 5 or 7 is read)."""
    assert len(SCORES) >= 30
    wrong = [(reply, want, judge_score(reply)) for reply, want in SCORES
             if judge_score(reply) != want or type(judge_score(reply)) is not type(want)]
    assert not wrong, f"{len(wrong)} misread (reply, want, got): {wrong}"
    assert judge_score(None) is None and judge_score("4/5", high=5) == 4 and judge_score("Score: 0", low=0) == 0


def length_reward(messages):
    return {"helpfulness": len(messages[-1]["content"]) / 10.0}


def test_reward_filter_and_reward_preference(tmp_path):
    """Kills: reward_filter comparing with `>` instead of `>=` (a reward equal to the threshold,
    0.5 here, is kept)."""
    src = write(tmp_path / "p.jsonl", [{"prompt": "Say something."}, {"prompt": "Say more."}])
    short = ScriptedLLM(lambda r, i: "hello" if "more" in r.messages[0]["content"] else "ok")  # reward 0.5 / 0.2
    long = ScriptedLLM(lambda r, i: "a much longer answer" if "more" in r.messages[0]["content"] else "ok")
    run, summary = run_pipeline(tmp_path, {
        "prompts": {"kind": "read", "path": src},
        "answers": {"kind": "respond", "clients": ["short", "long"]},
        "kept": {"kind": "reward_filter", "threshold": 0.5},
        "pairs": {"kind": "preference", "input": "answers", "judge": "reward", "margin": 0.1},
        "dpo": {"kind": "export_preference"},
    }, {"short": short, "long": long}, reward=ScriptedReward(length_reward, weights={"helpfulness": 1.0}))
    kept = strip_ids(read(run, "kept"))
    assert [k["messages"][-1]["content"] for k in kept] == ["hello", "a much longer answer"]  # 0.5 >= 0.5 kept
    assert kept[1]["reward"] == {"helpfulness": 2.0, "reward": 2.0}
    assert summary["kept"]["dropped"] == {"below_threshold": 2}
    assert summary["pairs"]["dropped"] == {"duplicate_response": 1, "fewer_than_two_responses": 1}
    assert strip_ids(read(run, "dpo")) == [{
        "prompt": "Say more.", "chosen": "a much longer answer", "rejected": "hello",
        "chosen_reward": 2.0, "rejected_reward": 0.5,
        "judge": {"kind": "reward", "chosen_from": "long", "rejected_from": "short",
                  "chosen_scores": {"helpfulness": 2.0, "reward": 2.0},
                  "rejected_scores": {"helpfulness": 0.5, "reward": 0.5}}}]


def test_llm_judge_reads_prose_verdicts_and_needs_both_orders_to_agree(tmp_path):
    """The LLM judge is asked A/B then B/A; a pair is kept only when both verdicts pick the same
    response. Kills: a reader that takes the first letter-like token (the hedge "It is a close
    call, but B is better." read as A: the pair is then dropped as a disagreement), and a tie or a
    reply with no verdict being counted as a preference instead of dropped."""
    prompts = ["consistent", "hedged", "positional", "tie", "refusal"]
    src = write(tmp_path / "p.jsonl", [{"prompt": p} for p in prompts])

    def judge(req, i):
        text = req.messages[-1]["content"]
        good_first = "Response A:\ngood" in text
        if "positional" in text:
            return "A"  # always prefers whichever is shown first: inconsistent under swapping
        if "hedged" in text:
            return "A, clearly." if good_first else "It is a close call, but B is better."
        if "tie" in text:
            return "A" if good_first else "Both are equally good."
        if "refusal" in text:
            return "I cannot compare these." if good_first else "B"
        return "A" if good_first else "The better one is B."

    run, summary = run_pipeline(tmp_path, {
        "prompts": {"kind": "read", "path": src},
        "answers": {"kind": "respond", "clients": ["bad", "good"]},
        "pairs": {"kind": "preference", "judge": "llm", "client": "judge"},
    }, {"bad": ScriptedLLM(lambda r, i: "bad"), "good": ScriptedLLM(lambda r, i: "good"),
        "judge": ScriptedLLM(judge)})
    pairs = strip_ids(read(run, "pairs"))
    assert pairs == [{"prompt": p, "chosen": "good", "rejected": "bad",
                      "judge": {"kind": "llm", "chosen_from": "good", "rejected_from": "bad",
                                "verdicts": ["B", "A"], "order": ["ab", "ba"]}} for p in ("consistent", "hedged")]
    assert summary["pairs"]["dropped"] == {"judge_disagrees": 1, "judge_tie": 1, "judge_unparseable": 1}


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


def test_multi_turn_instructions_judge_every_turn(tmp_path):
    """A multi-turn instruction prompt states its rules once for every later turn, so every
    assistant turn is checked. Kills: multi-turn judging only the last turn (`judged_turns`
    returning the final answer alone): the response whose first turn breaks the rule would pass
    the instruction filter, and the instruction judge would find no failing response to reject."""
    src = write(tmp_path / "p.jsonl", [{"prompt": "Q one?"}, {"prompt": "Q two?"}])
    early_comma = ScriptedLLM(lambda r, i: "First, a comma." if len(r.messages) == 1 else "Clean reply.")
    run, summary = run_pipeline(tmp_path, {
        "prompts": {"kind": "read", "path": src},
        "multi": {"kind": "instruction_prompts", "variants": ["multi_turn"], "allowed": ["punctuation:no_comma"],
                  "max_instructions": 1},
        "answers": {"kind": "respond", "clients": ["early_comma", "clean"]},
        "passing": {"kind": "instruction_filter"},
        "pairs": {"kind": "preference", "input": "answers", "judge": "instructions"},
    }, {"early_comma": early_comma, "clean": ScriptedLLM(lambda r, i: "Plain reply.")})
    passing = strip_ids(read(run, "passing"))
    assert [[r["client"] for r in p["responses"]] for p in passing] == [["clean"], ["clean"]]
    assert summary["passing"]["dropped"] == {"failed_instructions": 2}
    # the pair is taken at the rejected response's first failing turn: its own first answer
    rules = "For this question and every question I ask after it, follow these rules: Do not use a single comma " \
            "anywhere in your answer.\n\n"
    assert strip_ids(read(run, "pairs")) == [{
        "prompt": rules + q, "chosen": "Plain reply.", "rejected": "First, a comma.",
        "chosen_reward": 1.0, "rejected_reward": 0.0,
        "judge": {"kind": "instructions", "chosen_from": "clean", "rejected_from": "early_comma",
                  "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}], "chosen_follows": [True],
                  "rejected_follows": [False], "turn": 1}} for q in ("Q one?", "Q two?")]


# --------------------------------------------------------------------------- mutants found alive
# Written for the mutants `python scripts/mutation.py judges` found alive (docs/TESTING.md); each
# test names those it kills.

# (response text, the answer `final_answer` reads from it, worked out by hand)
FINAL_ANSWERS = [
    ("so \\boxed{1,234}.", "1234"), ("first \\boxed{2}, finally \\boxed{3/4}", "0.75"),  # the last box
    ("The Answer IS $12.50, not 13", "12.5"),  # "answer is", any case; $ and the trailing zero dropped
    ("\\boxed{7} (checked on 3 cases)", "7"),  # the box, not the last number
    ("answer: 7 apples, then 9 more", "7"),  # the number after "answer:", not the last number
    ("x = 3, so 5.", "5"), ("\\boxed{ABC}", "abc"), ("\\boxed{x + 1}", "x+1"),  # not a number: lower, no spaces
    ("\\boxed{1/3}", "0.333333"), ("\\boxed{1/0}", "1/0"), ("\\boxed{.5}", "0.5"), ("\\boxed{3.}", "3"),
    ("\\boxed{1 000}", "1000"), ("\\boxed{$5$}", "5"), ("\\boxed{-2.50}", "-2.5"),
    ("\\boxed{X.}", "x"),  # a trailing full stop dropped from a non-number too
]


def test_final_answer_of_hand_written_responses():
    """Kills: `re.IGNORECASE` dropped and the "answer is" / "\\boxed" patterns broken (the fallback to
    the last number answers otherwise), `rstrip(".")` -> `lstrip` / `rstrip(None)` / `rstrip("XX.XX")`, the `,` / `$` / ` ` removals
    broken, `round(value, 6)` -> `7`, `a.lower()` -> `a.upper()`."""
    wrong = [(text, want, final_answer(text)) for text, want in FINAL_ANSWERS if final_answer(text) != want]
    assert not wrong


def test_llm_judge_keeps_every_agreed_pair_after_a_dropped_one(tmp_path):
    """Three responses per prompt, so three pairs (max_pairs=3), judged in `combinations` order:
    (good, bad) is dropped (a tie, no verdict, or a positional judge), then (good, meh) and
    (bad, meh) are kept, the first with the better response shown as A first. Kills: `continue` ->
    `break` after a dropped pair (the later pairs lost), chosen/rejected read the wrong way round
    when the first verdict is A (`first == "A"` broken), and the prompt shown to the judge from
    multi-message prompts (`m['content']`)."""
    reasons = {"tie": "Both are equally good.", "unparseable": "I cannot say.", "positional": "A"}
    src = write(tmp_path / "p.jsonl", [{"prompt": [{"role": "system", "content": "Be brief."},
                                                   {"role": "user", "content": p}]} for p in reasons])
    rank = {"good": 2, "meh": 1, "bad": 0}

    def judge(req, i):
        text = req.messages[-1]["content"]
        assert "system: Be brief.\nuser: " in text  # a multi-message prompt is shown role by role
        a = text.split("Response A:\n")[1].split("\n")[0]
        b = text.split("Response B:\n")[1].split("\n")[0]
        if {a, b} == {"good", "bad"}:
            return next(r for p, r in reasons.items() if f"user: {p}" in text)
        return "A" if rank[a] > rank[b] else "B"

    run, summary = run_pipeline(tmp_path, {
        "prompts": {"kind": "read", "path": src},
        "answers": {"kind": "respond", "clients": ["good", "bad", "meh"]},
        "pairs": {"kind": "preference", "judge": "llm", "client": "judge", "max_pairs": 3},
    }, {name: ScriptedLLM(lambda r, i, name=name: name) for name in rank} | {"judge": ScriptedLLM(judge)})
    pairs = strip_ids(read(run, "pairs"))
    got = sorted((p["prompt"][-1]["content"], p["chosen"], p["rejected"], tuple(p["judge"]["verdicts"]))
                 for p in pairs)
    assert got == sorted([(p, "good", "meh", ("A", "B")) for p in reasons] +
                         [(p, "meh", "bad", ("B", "A")) for p in reasons])
    assert summary["pairs"]["dropped"] == {"judge_tie": 1, "judge_unparseable": 1, "judge_disagrees": 1}


def test_math_judge_drops_by_reason_and_reads_the_last_message(tmp_path):
    """Prompts with a system message (so a response's conversation has three messages), one
    without a reference answer, one no response gets right. Kills: the drop reasons
    `no_reference_answer` / `no_correct_response` renamed or lost, and the answer read from
    `messages[+1]` (the user's prompt, which holds the reference number) instead of `messages[-1]`."""
    rows = [{"prompt": [{"role": "system", "content": "Think."}, {"role": "user", "content": q}], **extra}
            for q, extra in (("What is 6 * 7? (42 is a guess)", {"answer": 42}), ("Pick a number", {}),
                             ("What is 2 + 3?", {"answer": 5}))]
    src = write(tmp_path / "p.jsonl", rows)
    run, summary = run_pipeline(tmp_path, {
        "prompts": {"kind": "read", "path": src},
        "answers": {"kind": "respond", "clients": ["a", "b"]},
        "pairs": {"kind": "preference", "judge": "math"},
    }, {"a": ScriptedLLM(lambda r, i: "The answer is 42." if "6 * 7" in r.messages[-1]["content"] else "7"),
        "b": ScriptedLLM(lambda r, i: "I get \\boxed{41}" if "6 * 7" in r.messages[-1]["content"] else "6")})
    pairs = strip_ids(read(run, "pairs"))
    assert [(p["chosen"], p["rejected"], p["judge"]["reference"]) for p in pairs] == [
        ("The answer is 42.", "I get \\boxed{41}", "42")]
    assert summary["pairs"]["dropped"] == {"no_reference_answer": 1, "no_correct_response": 1}


def test_reward_filter_drops_records_without_a_conversation_and_skips_unscored_ones(tmp_path):
    """A record with no assistant message is dropped as `no_conversation`; a conversation the
    reward backend cannot score is skipped (its reason counted) and the record's next
    conversation is still judged; a kept conversation carries the record's other fields, not its
    `responses`. Kills: the `no_conversation` reason renamed or lost, `continue` -> `break` after
    an unscored conversation (the rest of the record lost), and the fields copied the wrong way
    (`k not in (...)` -> `k in (...)`, "responses" renamed in that tuple)."""
    from nemojax.sdg.llm import LLMError

    def reward(messages):
        if messages[-1]["content"] == "unscorable":
            raise LLMError("too long for the reward model", "reward_too_long")
        return {"helpfulness": 1.0}

    user = {"role": "user", "content": "Q?"}
    rows = [{"messages": [user]},  # no answer yet
            {"topic": "t", "responses": [{"messages": [user, {"role": "assistant", "content": text}]}
                                         for text in ("unscorable", "fine")]}]
    run, summary = run_pipeline(tmp_path, {
        "records": {"kind": "read", "path": write(tmp_path / "r.jsonl", rows)},
        "kept": {"kind": "reward_filter", "threshold": 0.5},
    }, {}, reward=ScriptedReward(reward, weights={"helpfulness": 1.0}))
    assert strip_ids(read(run, "kept")) == [{"topic": "t", "source_id": "2",
                                             "messages": [user, {"role": "assistant", "content": "fine"}],
                                             "reward": {"helpfulness": 1.0, "reward": 1.0}}]
    assert summary["kept"]["dropped"] == {"no_conversation": 1, "reward_too_long": 1}


def test_instruction_judge_takes_a_later_failing_turn_of_three(tmp_path):
    """Three judged turns; the rejected response breaks the rule first in its second answer, so
    the pair is its conversation up to that answer (turn 2) against the chosen one's up to the
    same turn. Kills `assistant[len(assistant) - judged + turn]` -> `- turn` in `_up_to_turn`
    (turn 0, the only one the two-turn test reaches, reads the same both ways)."""
    item = {"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}], "variant": "multi_turn"}
    questions = ["Q one?", "Q two?", "Q three?"]

    def conv(answers):
        msgs = []
        for q, a in zip(questions, answers):
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return msgs

    rows = [{**item, "responses": [{"client": "clean", "messages": conv(["One.", "Two.", "Three."])},
                                   {"client": "late", "messages": conv(["Uno.", "Dos, tres.", "Cuatro."])}]}]
    run, _ = run_pipeline(tmp_path, {
        "records": {"kind": "read", "path": write(tmp_path / "r.jsonl", rows)},
        "pairs": {"kind": "preference", "judge": "instructions"},
    }, {})
    (pair,) = strip_ids(read(run, "pairs"))
    assert (pair["chosen"], pair["rejected"], pair["judge"]["turn"]) == ("Two.", "Dos, tres.", 2)
    assert pair["prompt"][-1] == {"role": "user", "content": "Q two?"}


def test_llm_judge_judges_max_pairs_and_goes_on_after_a_failed_request(tmp_path):
    """Three responses, `max_pairs: 2`: only the first two pairs in `combinations` order are
    judged, (good, bad) then (good, meh). The judge's backend refuses the first (a non-transport
    LLMError: its reason is counted as a drop) and the second is still judged and kept. Kills:
    `islice(..., max_pairs)` -> `None` (the third pair judged too), and after the failed request
    `break` -> `return` (the record's pairs lost) and `continue` -> `break` (the next pair lost)."""
    from nemojax.sdg.llm import LLMError

    def judge(req, i):
        text = req.messages[-1]["content"]
        a = text.split("Response A:\n")[1].split("\n")[0]
        b = text.split("Response B:\n")[1].split("\n")[0]
        if {a, b} == {"good", "bad"}:
            raise LLMError("prompt too long for the judge", "judge_prompt_too_long")
        return "A" if (a, b) in (("good", "meh"), ("meh", "bad"), ("good", "bad")) else "B"

    run, summary = run_pipeline(tmp_path, {
        "prompts": {"kind": "read", "path": write(tmp_path / "p.jsonl", [{"prompt": "Q?"}])},
        "answers": {"kind": "respond", "clients": ["good", "bad", "meh"]},
        "pairs": {"kind": "preference", "judge": "llm", "client": "judge", "max_pairs": 2},
    }, {name: ScriptedLLM(lambda r, i, name=name: name) for name in ("good", "bad", "meh")}
       | {"judge": ScriptedLLM(judge)})
    assert [(p["chosen"], p["rejected"]) for p in read(run, "pairs")] == [("good", "meh")]
    assert summary["pairs"]["dropped"] == {"judge_prompt_too_long": 1}


def _responses(*texts, system=None):
    head = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "Q?"}]
    return [{"client": f"c{i}", "messages": head + [{"role": "assistant", "content": t}]} for i, t in enumerate(texts)]


def test_reward_judge_pairs_best_with_worst_and_drops_by_reason(tmp_path):
    """Reward as judge, margin 1: three scored responses pair the best with the worst (not the
    middle one); a gap of exactly the margin is dropped (`below_margin`); one scorable response of
    two is no pair (`fewer_than_two_scored`, and the backend's reason counted); a duplicate
    response is dropped and the next one still judged; a record without responses is no pair.
    Kills, in `_judge_reward`: `scored[-1]` -> `scored[+1]`, `hi - lo <= margin` -> `hi + lo` /
    `<`, and the two drop reasons renamed or lost; in `Preference.process`: `continue` -> `break`
    after a duplicate, and `item.get("responses", [])` -> `None` (a TypeError)."""
    from nemojax.sdg.llm import LLMError

    value = {"good": 3.0, "meh": 2.0, "bad": 1.0}

    def reward(messages):
        text = messages[-1]["content"]
        if text not in value:
            raise LLMError("too long for the reward model", "reward_too_long")
        return {"helpfulness": value[text]}

    rows = [{"responses": _responses("meh", "good", "bad")}, {"responses": _responses("meh", "bad")},
            {"responses": _responses("good", "unscorable")}, {"responses": _responses("good", "good", "bad")},
            {"prompt": "Q?"}]
    run, summary = run_pipeline(tmp_path, {
        "records": {"kind": "read", "path": write(tmp_path / "r.jsonl", rows)},
        "pairs": {"kind": "preference", "judge": "reward", "margin": 1.0},
    }, {}, reward=ScriptedReward(reward, weights={"helpfulness": 1.0}))
    assert [(p["chosen"], p["rejected"], p["chosen_reward"], p["rejected_reward"]) for p in read(run, "pairs")] == [
        ("good", "bad", 3.0, 1.0)] * 2
    assert summary["pairs"]["dropped"] == {"below_margin": 1, "fewer_than_two_scored": 1, "reward_too_long": 1,
                                           "duplicate_response": 1, "fewer_than_two_responses": 1}


def test_verifier_judge_reads_the_final_answer_and_drops_by_reason(tmp_path):
    """Verifier as judge on conversations with a system message (three messages, so the answer is
    `messages[-1]`, not `messages[1]`): a right and a wrong answer make a pair with the verifier's
    evidence; all wrong or all right is no pair, each counted under its reason. Kills, in
    `_judge_verifier`: `messages[-1]` -> `messages[+1]`, the `no_correct_response` /
    `no_incorrect_response` reasons renamed or lost, and the evidence key `verifier` renamed."""
    name = "tests.sdg_helpers:verify_says_yes"
    rows = [{"responses": _responses("no", "yes", system="Answer yes or no.")},
            {"responses": _responses("no", "nope", system="Answer yes or no.")},
            {"responses": _responses("yes", "YES", system="Answer yes or no.")}]
    run, summary = run_pipeline(tmp_path, {
        "records": {"kind": "read", "path": write(tmp_path / "r.jsonl", rows)},
        "pairs": {"kind": "preference", "judge": "verifier", "verifier": name},
    }, {})
    assert strip_ids(read(run, "pairs")) == [{
        "prompt": [{"role": "system", "content": "Answer yes or no."}, {"role": "user", "content": "Q?"}],
        "chosen": "yes", "rejected": "no", "chosen_reward": 1.0, "rejected_reward": 0.0,
        "judge": {"kind": "verifier", "chosen_from": "c1", "rejected_from": "c0", "verifier": name,
                  "passed": 1, "total": 2}}]
    assert summary["pairs"]["dropped"] == {"no_correct_response": 1, "no_incorrect_response": 1}


def test_instruction_judge_rejects_the_fewest_followed_and_drops_by_reason(tmp_path):
    """Two instructions (no comma, wrapped in double quotes), single-turn records read as they are: the
    rejected response is the failing one that follows the fewest (not the first failing one); of
    two failing ones following as many, the first (whatever it follows); a single-turn pair has
    no `turn`. Dropped, each under its reason: a record without instructions, none passing, one
    whose only "passing" response has no answer at all, none failing, and a multi-turn pair whose
    conversations have different numbers of judged turns. Kills, in `_judge_instructions`: the
    sort key `x[0]` -> `None` / `lambda x: None` / `x[1]`, a response without an assistant turn
    counted as passing (`if per` -> `if per or True`), passing responses counted as failing too
    (`x[1]` -> `x[2]`), the multi-turn branch taken for one turn (`w_turns > 1` -> `>= 1`, `and`
    -> `or`), and the drop reasons `no_instructions`, `no_passing_response`,
    `no_failing_response`, `turn_count_differs` renamed or lost."""
    rules = {"instruction_id_list": ["punctuation:no_comma", "startend:quotation"], "kwargs": [{}, {}]}

    def multi(*answers):
        msgs = []
        for i, a in enumerate(answers):
            msgs += [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": a}]
        return msgs

    rows = [{**rules, "responses": _responses('"all good."', '"one, two."', "Bad, case.")},
            {**rules, "responses": _responses('"fine."', "plain.", '"a, b."')},
            {"responses": _responses("x.", "y.")},  # no instructions
            {**rules, "responses": _responses("A, B.", "C, D.")},  # none passes
            {**rules, "responses": [{"client": "c0", "messages": [{"role": "user", "content": "Q?"}]}]
             + _responses("Bad, case.")[:1]},  # the other has no answer: no passing response either
            {**rules, "responses": _responses('"x."', '"y."')},  # none fails
            {**rules, "variant": "multi_turn",
             "responses": [{"client": "two", "messages": multi('"a."', '"b."')},
                           {"client": "three", "messages": multi('"c."', "D, e.", '"f."')}]}]
    run, summary = run_pipeline(tmp_path, {
        "records": {"kind": "read", "path": write(tmp_path / "r.jsonl", rows)},
        "pairs": {"kind": "preference", "judge": "instructions"},
    }, {})
    pairs = strip_ids(read(run, "pairs"))
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [('"all good."', "Bad, case."), ('"fine."', "plain.")]
    assert pairs[0]["judge"] == {"kind": "instructions", "chosen_from": "c0", "rejected_from": "c2", **rules,
                                 "chosen_follows": [True, True], "rejected_follows": [False, False]}
    assert summary["pairs"]["dropped"] == {"no_instructions": 1, "no_passing_response": 2, "no_failing_response": 1,
                                           "turn_count_differs": 1}


def test_preference_config_errors_name_the_key_and_the_fix(tmp_path):
    """Kills, in `PreferenceSpec`: `needs_client` never true (`judge == "LLM"` / "XXllmXX": an LLM
    judge without a client passes validation), the stage key dropped from the base checks
    (`super().validate(None, cfg)`), the judge list in the error broken (`None`, `'XX, XX'.join`),
    and the verifier check skipped (`judge == "VERIFIER"`) or its message lost."""
    import pytest

    from nemojax.config import ConfigError
    from nemojax.sdg.config import build_pipeline

    def build(pairs, clients=None):
        build_pipeline({"run_dir": str(tmp_path / "run"), "seed": 0, "progress": False, "clients": clients or {},
                        "stages": {"records": {"kind": "read", "path": str(tmp_path / "r.jsonl")},
                                   "pairs": {"kind": "preference", **pairs}}})

    with pytest.raises(ConfigError, match=r"^stages.pairs \(preference\) generates text: declare a client"):
        build({"judge": "llm"})
    with pytest.raises(ConfigError, match="stages.pairs.judge='vibes': choose one of reward, llm, math, "
                                          "instructions, verifier$"):
        build({"judge": "vibes"})
    with pytest.raises(ConfigError, match=r"^stages.pairs.verifier is required with judge: verifier \(e.g. "):
        build({"judge": "verifier"})
    build({"judge": "reward"})  # no client needed
