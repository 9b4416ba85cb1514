"""Dialogues and two-turn prompts with the model playing the user.

`dialogue`: from a prompt, the assistant answers; then the model, told to play a user with a
persona, writes the next user turn (politeness stripped: "Thank you ...", "Great, ...",
"Sure, I'd be happy ..." sentences are removed), and so on for `turns` user turns. Greedy
decoding by default, as in the paper. `two_turn`: user, assistant, then a generated user
follow-up, ready for a later `respond` stage.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from nemojax.config import ConfigError
from nemojax.sdg.stages.base import Stage, StageSpec, Work, prompt_text

DEFAULT_PERSONAS = [
    "a curious high-school student who asks short, direct questions",
    "a busy software engineer who wants concrete, practical answers",
    "a retired teacher who likes detail and examples",
    "a small-business owner who is new to the subject",
    "a graduate student who challenges vague claims",
]

# Sentences (or sentence openings) a role-played user should not say: thanks and assistant-like
# courtesy that would teach the model to expect a flattering user.
POLITENESS = [
    r"thanks?( you)?( so| very)?( much)?\b[^.!?\n]*[.!?]*",
    r"(great|perfect|awesome|wonderful|excellent|cool)( question| answer| explanation)?[,.!]+",
    r"sure[,!.]? i'?d be (happy|glad) to[^.!?\n]*[.!?]*",
    r"i appreciate[^.!?\n]*[.!?]*",
    r"that('s| is| was) (very )?(helpful|interesting|great|useful)[^.!?\n]*[.!?]*",
    r"(as|like) an ai[^.!?\n]*[.!?]*",
]


def strip_politeness(text: str, patterns: list[str] | None = None) -> str:
    """Remove polite sentences / openings anywhere they start a sentence; tidy whitespace."""
    out = text.strip().strip('"').strip()
    previous = None
    while out != previous:  # one removal can expose another polite opening
        previous = out
        for p in patterns or POLITENESS:
            out = re.sub(r"(^|(?<=[.!?\n]))\s*" + p, " ", out, flags=re.IGNORECASE)
            out = re.sub(r"[ \t]+", " ", out).strip().lstrip(",.;:!- ").strip()
    return out


def show(messages: list[dict[str, str]]) -> str:
    names = {"user": "You", "assistant": "Assistant"}
    return "\n\n".join(f"{names.get(m['role'], m['role'])}: {m['content']}" for m in messages)


@dataclass
class DialogueSpec(StageSpec):
    turns: int = 3  # user turns (each answered by the assistant)
    personas: list[str] = field(default_factory=lambda: list(DEFAULT_PERSONAS))
    politeness: list[str] = field(default_factory=list)  # regexes replacing the default list
    max_tokens: int = 384

    def validate(self, key: str, cfg: Any) -> None:
        super().validate(key, cfg)
        if self.turns < 1 or not self.personas:
            raise ConfigError(f"{key}: need turns >= 1 and at least one persona")


class Dialogue(Stage):
    kind = "dialogue"
    Spec = DialogueSpec
    user_turns_total: int | None = None  # None: spec.turns

    async def _user_turn(self, work: Work, messages: list[dict[str, str]], persona: str) -> str | None:
        raw = await work.ask(work.template("user_turn", persona=persona, conversation=show(messages)))
        if raw is None:
            return None
        text = strip_politeness(raw, self.spec.politeness or None)
        if not text:
            work.drop("empty_user_turn")
            return None
        return text

    async def process(self, item: dict[str, Any], work: Work) -> list[dict[str, Any]]:
        prompt = prompt_text(item)
        if not prompt.strip():
            work.drop("no_prompt")
            return []
        persona = work.rng.choice(self.spec.personas)
        messages = [{"role": "user", "content": prompt}]
        for turn in range(self.spec.turns):
            answer = await work.ask_messages(messages)
            if answer is None:
                return []
            messages.append({"role": "assistant", "content": answer})
            if turn + 1 < self.spec.turns:
                user = await self._user_turn(work, messages, persona)
                if user is None:
                    return []
                messages.append({"role": "user", "content": user})
        return [{"messages": messages, "persona": persona, **{k: item[k] for k in ("task", "topic") if k in item}}]


class TwoTurn(Dialogue):
    """user (real), assistant (generated), user (generated follow-up): a prompt for `respond`."""

    kind = "two_turn"

    async def process(self, item: dict[str, Any], work: Work) -> list[dict[str, Any]]:
        prompt = prompt_text(item)
        if not prompt.strip():
            work.drop("no_prompt")
            return []
        persona = work.rng.choice(self.spec.personas)
        messages = [{"role": "user", "content": prompt}]
        answer = await work.ask_messages(messages)
        if answer is None:
            return []
        messages.append({"role": "assistant", "content": answer})
        user = await self._user_turn(work, messages, persona)
        if user is None:
            return []
        messages.append({"role": "user", "content": user})
        return [{"messages": messages, "persona": persona, **{k: item[k] for k in ("task", "topic") if k in item}}]
