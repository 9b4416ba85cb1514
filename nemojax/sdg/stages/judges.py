"""Judges: reward-model threshold filter, and preference triples judged by a reward model, an
LLM asked twice with the order swapped, math ground truth, the instruction checkers, or a
Python verifier (`judge: verifier`, see verify.py).

LLM verdicts are read by `nemojax.sdg.judge_replies.parse_verdict` (explicit statements only; a
reply stating none is dropped as `judge_unparseable`, a tie as `judge_tie`).

Preference records follow the post-training schema: `prompt` (a string for a single-turn
prompt, else the message list before the judged answer), `chosen`, `rejected`,
`chosen_reward` / `rejected_reward` when the judge gives scores, and `judge` with the evidence
(kind, verdicts or scores or extracted answers, which responses were compared).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any

from nemojax.config import ConfigError
from nemojax.sdg.instructions import follows_all
from nemojax.sdg.judge_replies import parse_verdict
from nemojax.sdg.stages.base import Stage, StageSpec, Work
from nemojax.sdg.stages.instruct import judged_turns
from nemojax.sdg.stages.io import conversations

JUDGES = ("reward", "llm", "math", "instructions", "verifier")


@dataclass
class RewardFilterSpec(StageSpec):
    threshold: float = 0.0  # keep conversations whose reward >= threshold

    uses_client = False


class RewardFilter(Stage):
    """Scores each conversation of a record (its responses, or its own messages) and keeps
    those at or above the threshold, with their scores under "reward"."""

    kind = "reward_filter"
    Spec = RewardFilterSpec

    async def process(self, item: dict[str, Any], work: Work) -> list[dict[str, Any]]:
        convs = conversations(item)
        if not convs:
            work.drop("no_conversation")
            return []
        kept = []
        for conv in convs:
            scores = await work.score(conv)
            if scores is None:
                continue
            if scores["reward"] >= self.spec.threshold:
                kept.append((conv, scores))
            else:
                work.drop("below_threshold")
        base = {k: v for k, v in item.items() if k not in ("id", "responses", "messages")}
        return [{**base, "messages": conv, "reward": scores} for conv, scores in kept]


@dataclass
class PreferenceSpec(StageSpec):
    judge: str = "reward"  # reward | llm | math | instructions | verifier
    margin: float = 0.0  # reward judge: keep a pair only when chosen - rejected reward > margin
    answer_field: str = "answer"  # math judge: the record field holding the reference answer
    max_pairs: int = 1  # llm judge: response pairs judged per record
    verifier: str = ""  # verifier judge: package.module:function(item, [texts]) -> [bool]
    max_tokens: int = 8

    def needs_client(self) -> bool:
        return self.judge == "llm"

    def validate(self, key: str, cfg: Any) -> None:
        super().validate(key, cfg)
        if self.judge not in JUDGES:
            raise ConfigError(f"{key}.judge={self.judge!r}: choose one of {', '.join(JUDGES)}")
        if self.judge == "verifier":
            from nemojax.sdg.stages.verify import load_verifier

            if not self.verifier:
                raise ConfigError(f"{key}.verifier is required with judge: verifier "
                                  f"(e.g. nemojax.align.tasks:verify_record)")
            load_verifier(self.verifier)


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def final_answer(text: str) -> str | None:
    """The answer a math response commits to: the last \\boxed{...}, else the number after the
    last "answer is" / "answer:", else the last number in the text; normalised."""
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
    if boxed:
        return normalise_answer(boxed[-1])
    m = list(re.finditer(r"answer\s*(?:is|:)\s*\$?([^\n$]*)", text, re.IGNORECASE))
    if m:
        nums = _NUMBER.findall(m[-1].group(1))
        if nums:
            return normalise_answer(nums[0])
    nums = _NUMBER.findall(text)
    return normalise_answer(nums[-1]) if nums else None


def normalise_answer(ans: str) -> str:
    a = ans.strip().rstrip(".").replace(",", "").replace("$", "").replace(" ", "")
    try:
        if "/" in a:
            num, den = a.split("/", 1)
            value = float(num) / float(den)
        else:
            value = float(a)
        return repr(round(value, 6)).removesuffix(".0")
    except (ValueError, ZeroDivisionError):
        return a.lower()


def split_prompt(conv: list[dict[str, str]]) -> tuple[Any, str]:
    """(prompt in the preference schema, final answer) of a conversation."""
    context = conv[:-1]
    if len(context) == 1 and context[0]["role"] == "user":
        return context[0]["content"], conv[-1]["content"]
    return [dict(m) for m in context], conv[-1]["content"]


def _up_to_turn(response: dict[str, Any], judged: int, turn: int) -> dict[str, Any]:
    """`response` with its conversation cut after judged turn `turn` (0-based, of the last
    `judged` assistant turns)."""
    assistant = [i for i, m in enumerate(response["messages"]) if m["role"] == "assistant"]
    end = assistant[len(assistant) - judged + turn]
    return {**response, "messages": response["messages"][:end + 1]}


class Preference(Stage):
    kind = "preference"
    Spec = PreferenceSpec

    async def process(self, item: dict[str, Any], work: Work) -> list[dict[str, Any]]:
        responses = [r for r in item.get("responses", []) if r.get("messages")]
        distinct, seen = [], set()
        for r in responses:
            text = r["messages"][-1]["content"].strip()
            if text in seen:
                work.drop("duplicate_response")
                continue
            seen.add(text)
            distinct.append(r)
        if len(distinct) < 2:
            work.drop("fewer_than_two_responses")
            return []
        judge = getattr(self, f"_judge_{self.spec.judge}")
        return await judge(item, distinct, work)

    def _record(self, chosen: dict[str, Any], rejected: dict[str, Any], evidence: dict[str, Any],
                rewards: tuple[float, float] | None = None) -> dict[str, Any]:
        prompt, chosen_text = split_prompt(chosen["messages"])
        _, rejected_text = split_prompt(rejected["messages"])
        rec = {"prompt": prompt, "chosen": chosen_text, "rejected": rejected_text}
        if rewards is not None:
            rec["chosen_reward"], rec["rejected_reward"] = rewards
        rec["judge"] = {"kind": self.spec.judge, "chosen_from": chosen["client"], "rejected_from": rejected["client"],
                        **evidence}
        return rec

    async def _judge_reward(self, item, responses, work):  # noqa: ANN001, ANN202
        scored = []
        for r in responses:
            s = await work.score(r["messages"])
            if s is not None:
                scored.append((s["reward"], r, s))
        if len(scored) < 2:
            work.drop("fewer_than_two_scored")
            return []
        scored.sort(key=lambda x: -x[0])
        (hi, best, s_best), (lo, worst, s_worst) = scored[0], scored[-1]
        if hi - lo <= self.spec.margin:
            work.drop("below_margin")
            return []
        return [self._record(best, worst, {"chosen_scores": s_best, "rejected_scores": s_worst}, (hi, lo))]

    async def _judge_llm(self, item, responses, work):  # noqa: ANN001, ANN202
        out = []
        for a, b in itertools.islice(itertools.combinations(responses, 2), self.spec.max_pairs):
            prompt, a_text = split_prompt(a["messages"])
            _, b_text = split_prompt(b["messages"])
            shown = prompt if isinstance(prompt, str) else "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
            replies = []
            for x, y in ((a_text, b_text), (b_text, a_text)):
                reply = await work.ask(work.template("judge_pair", prompt=shown, a=x, b=y))
                if reply is None:
                    break  # the backend failed; work.ask counted why
                replies.append(reply)
            if len(replies) < 2:
                continue
            first, second = parse_verdict(replies[0]), parse_verdict(replies[1])
            if first is None or second is None:  # no verdict stated: never read as a preference
                work.drop("judge_unparseable")
                continue
            if "tie" in (first, second):
                work.drop("judge_tie")
                continue
            # second asked with B first: agreement means the letters differ
            if first == second:
                work.drop("judge_disagrees")
                continue
            chosen, rejected = (a, b) if first == "A" else (b, a)
            out.append(self._record(chosen, rejected, {"verdicts": [first, second], "order": ["ab", "ba"]}))
        return out

    async def _judge_math(self, item, responses, work):  # noqa: ANN001, ANN202
        ref = item.get(self.spec.answer_field)
        if ref is None:
            work.drop("no_reference_answer")
            return []
        want = normalise_answer(str(ref))
        graded = [(final_answer(r["messages"][-1]["content"]), r) for r in responses]
        right = [(a, r) for a, r in graded if a == want]
        wrong = [(a, r) for a, r in graded if a != want]
        if not right:
            work.drop("no_correct_response")
            return []
        if not wrong:
            work.drop("no_incorrect_response")
            return []
        (ca, c), (wa, w) = right[0], wrong[0]
        return [self._record(c, w, {"reference": want, "chosen_answer": ca, "rejected_answer": wa}, (1.0, 0.0))]

    async def _judge_instructions(self, item, responses, work):  # noqa: ANN001, ANN202
        """Chosen: a response following every instruction in every judged turn; rejected: one
        breaking some (fewest followed first). With several judged turns (multi-turn) the pair is
        taken at the rejected response's first failing turn, the chosen conversation up to there
        being the prompt: the rejected text is then wrong in the very context it is shown in (its
        later turns may follow the rules, and they would sit after a context it never saw)."""
        if "instruction_id_list" not in item:
            work.drop("no_instructions")
            return []
        ids, kwargs = item["instruction_id_list"], item["kwargs"]
        results = []
        for r in responses:
            turns = judged_turns(item, r["messages"])
            per = [follows_all(ids, kwargs, t) for t in turns]
            followed = [all(v[i] for v in per) for i in range(len(ids))] if per else []
            first_failing = next((j for j, v in enumerate(per) if not all(v)), None)
            results.append((sum(followed), followed, first_failing, len(turns), r))
        passing = [x for x in results if x[1] and all(x[1])]
        failing = [x for x in results if not (x[1] and all(x[1]))]
        if not passing:
            work.drop("no_passing_response")
            return []
        if not failing:
            work.drop("no_failing_response")
            return []
        failing.sort(key=lambda x: x[0])
        (_, pv, _, c_turns, c), (_, fv, turn, w_turns, w) = passing[0], failing[0]
        evidence = {"instruction_id_list": ids, "kwargs": kwargs, "chosen_follows": pv, "rejected_follows": fv}
        if w_turns > 1 and turn is not None:
            if c_turns != w_turns:
                work.drop("turn_count_differs")
                return []
            c, w = _up_to_turn(c, c_turns, turn), _up_to_turn(w, w_turns, turn)
            evidence["turn"] = turn + 1
        return [self._record(c, w, evidence, (1.0, 0.0))]

    async def _judge_verifier(self, item, responses, work):  # noqa: ANN001, ANN202
        from nemojax.sdg.stages.verify import verdicts

        ok = await verdicts(self.spec.verifier, item, [r["messages"][-1]["content"] for r in responses])
        right = [r for r, v in zip(responses, ok) if v]
        wrong = [r for r, v in zip(responses, ok) if not v]
        if not right:
            work.drop("no_correct_response")
            return []
        if not wrong:
            work.drop("no_incorrect_response")
            return []
        return [self._record(right[0], wrong[0], {"verifier": self.spec.verifier, "passed": sum(ok),
                                                   "total": len(ok)}, (1.0, 0.0))]
