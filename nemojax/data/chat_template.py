"""The Nemotron-4 Instruct chat template, as text.

    <extra_id_0>System\\n{system}\\n<extra_id_1>User\\n{prompt}\\n<extra_id_1>Assistant\\n{response}\\n<extra_id_1>User\\n...

Every conversation opens with the system turn (empty when there is no system message);
each later turn is `<extra_id_1>{Role}\\n{content}\\n`. A model generating a reply stops
at `<extra_id_1>` (the start of the next turn). Reward-model inputs end the scored
response with `<extra_id_2>`. Kept as pure string functions so the sampling engine, SFT
data and the SDG pipeline all render conversations identically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

SYSTEM_TOKEN = "<extra_id_0>"
TURN_TOKEN = "<extra_id_1>"
REWARD_TOKEN = "<extra_id_2>"
# Generation of an assistant turn ends when the model opens the next turn.
STOP_STRINGS = (TURN_TOKEN,)
_ROLE_NAMES = {"user": "User", "assistant": "Assistant"}


class ChatFormatError(ValueError):
    """A conversation that cannot be rendered; the message names the offending message."""


def format_chat(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
    """Render `[{role, content}, ...]` with the Nemotron-4 template.

    Roles: an optional leading "system", then "user" / "assistant" turns. With
    `add_generation_prompt`, a conversation whose last message is not from the assistant
    ends with `<extra_id_1>Assistant\\n`, the prefix the model continues from.
    """
    system = ""
    body = list(messages)
    if body and _role(body[0], 0) == "system":
        system = _content(body[0], 0)
        body = body[1:]
    parts = [f"{SYSTEM_TOKEN}System\n{system}\n"]
    for i, msg in enumerate(body, start=len(messages) - len(body)):
        role = _role(msg, i)
        if role == "system":
            raise ChatFormatError(f"messages[{i}]: a system message may only come first")
        if role not in _ROLE_NAMES:
            raise ChatFormatError(f"messages[{i}]: unknown role {role!r}; use system, user or assistant")
        parts.append(f"{TURN_TOKEN}{_ROLE_NAMES[role]}\n{_content(msg, i)}\n")
    if add_generation_prompt and (not body or _role(body[-1], len(messages) - 1) != "assistant"):
        parts.append(f"{TURN_TOKEN}Assistant\n")
    return "".join(parts)


def format_reward_input(messages: Sequence[Mapping[str, str]]) -> str:
    """A conversation ending in the assistant response to score, followed by `<extra_id_2>`.

    `...<extra_id_1>Assistant\\n{response}\\n<extra_id_2>`: the reward head reads the final
    hidden state at that last token.
    """
    if not messages or _role(messages[-1], len(messages) - 1) != "assistant":
        raise ChatFormatError("a reward-model input must end with an assistant message")
    return format_chat(messages, add_generation_prompt=False) + REWARD_TOKEN


def _role(msg: Mapping[str, str], i: int) -> str:
    try:
        return str(msg["role"])
    except (KeyError, TypeError):
        raise ChatFormatError(f"messages[{i}] has no 'role' (expected {{'role': ..., 'content': ...}}), "
                              f"got {msg!r}") from None


def _content(msg: Mapping[str, str], i: int) -> str:
    content = msg.get("content")
    if not isinstance(content, str):
        raise ChatFormatError(f"messages[{i}] needs a string 'content', got {content!r}")
    return content
