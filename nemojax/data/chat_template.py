"""The Nemotron-4 Instruct chat template: the one place that knows its text.

    <extra_id_0>System\\n{system}\\n<extra_id_1>User\\n{prompt}\\n<extra_id_1>Assistant\\n{response}\\n<extra_id_1>User\\n...

Every conversation opens with the system turn (empty when there is no system message);
each later turn is `<extra_id_1>{Role}\\n{content}\\n`. A model generating a reply stops
at `<extra_id_1>` (the start of the next turn). Reward-model inputs end the scored
response with `<extra_id_2>`.

A conversation is rendered as a list of `Segment`s (template text, message content, the
turn token) so that tokenization (`nemojax.data.chat`) can treat content differently from
template text and knows which spans an SFT loss trains on; `format_chat` simply joins them.
Training marks, per segment (`Segment.trains`): each assistant message's content, the "\\n"
that ends it, and the `<extra_id_1>` right after it (the next turn's opener, or the closing
token added after a final assistant message): the model learns to answer and to stop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

SYSTEM_TOKEN = "<extra_id_0>"
TURN_TOKEN = "<extra_id_1>"
REWARD_TOKEN = "<extra_id_2>"
# Generation of an assistant turn ends when the model opens the next turn.
STOP_STRINGS = (TURN_TOKEN,)
# Strings that must never become control tokens when they appear inside message content.
CONTROL_STRINGS = (SYSTEM_TOKEN, TURN_TOKEN, REWARD_TOKEN, "<s>", "</s>")
ROLES = ("system", "user", "assistant")
_ROLE_NAMES = {"user": "User", "assistant": "Assistant"}


class ChatFormatError(ValueError):
    """A conversation that cannot be rendered; the message names the offending message."""


@dataclass(frozen=True)
class Segment:
    """One span of a rendered conversation.

    content: True for message text (tokenized with control strings escaped), False for
    template text (whose `<extra_id_*>` must become the control tokens).
    trains: True for the spans an SFT loss is computed on.
    """

    text: str
    content: bool = False
    trains: bool = False


def chat_segments(messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True,
                  end: str = "") -> list[Segment]:
    """The segments of `[{role, content}, ...]` rendered with the Nemotron-4 template.

    Roles: an optional leading "system", then "user" / "assistant" turns. With
    `add_generation_prompt`, a conversation whose last message is not from the assistant
    ends with `<extra_id_1>Assistant\\n`, the prefix the model continues from. `end` is
    appended last: `<extra_id_1>` closes a final assistant message for training (and is
    trained on), `<extra_id_2>` marks the response a reward model scores.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise ChatFormatError(f"messages must be a list of {{'role': ..., 'content': ...}} objects, "
                              f"got {type(messages).__name__}")
    system = ""
    body = list(messages)
    if body and _role(body[0], 0) == "system":
        system = _content(body[0], 0)
        body = body[1:]
    segs = [Segment(f"{SYSTEM_TOKEN}System\n"), Segment(system, content=True), Segment("\n")]
    after_assistant = False
    for i, msg in enumerate(body, start=len(messages) - len(body)):
        role = _role(msg, i)
        if role == "system":
            raise ChatFormatError(f"messages[{i}]: a system message may only come first")
        if role not in _ROLE_NAMES:
            raise ChatFormatError(f"messages[{i}]: unknown role {role!r}; use system, user or assistant")
        trains = role == "assistant"
        segs += [Segment(TURN_TOKEN, trains=after_assistant), Segment(f"{_ROLE_NAMES[role]}\n"),
                 Segment(_content(msg, i), content=True, trains=trains), Segment("\n", trains=trains)]
        after_assistant = trains
    if add_generation_prompt and not after_assistant:
        segs += [Segment(TURN_TOKEN), Segment("Assistant\n")]
    if end:
        segs.append(Segment(end, trains=after_assistant and end == TURN_TOKEN))
    return segs


def format_chat(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
    """Render `[{role, content}, ...]` with the Nemotron-4 template (see `chat_segments`)."""
    return "".join(s.text for s in chat_segments(messages, add_generation_prompt=add_generation_prompt))


def format_reward_input(messages: Sequence[Mapping[str, str]]) -> str:
    """A conversation ending in the assistant response to score, followed by `<extra_id_2>`.

    `...<extra_id_1>Assistant\\n{response}\\n<extra_id_2>`: the reward head reads the final
    hidden state at that last token.
    """
    check_ends_with_assistant(messages, "a reward-model input")
    return "".join(s.text for s in chat_segments(messages, add_generation_prompt=False, end=REWARD_TOKEN))


def check_ends_with_assistant(messages: Sequence[Mapping[str, str]], what: str) -> None:
    if not messages or _role(messages[-1], len(messages) - 1) != "assistant":
        raise ChatFormatError(f"{what} must end with an assistant message")


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
