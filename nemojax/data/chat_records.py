"""Post-training records on disk (JSONL / Parquet; Hugging Face `datasets` exports) -> examples.

Three kinds, schemas documented in docs/DATA.md:

* sft:        {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
              (ShareGPT's {"conversations": [{"from": "human"|"gpt"|"system", "value": str}]} too)
* preference: {"prompt": str | [messages], "chosen": str, "rejected": str,
               "chosen_reward"?: number, "rejected_reward"?: number}
              NeMo-Aligner's "chosen_response" / "rejected_response" keys, and TRL's form where
              "chosen" / "rejected" are message lists (with or without a separate "prompt").
* reward:     HelpSteer2's {"prompt": str, "response": str, "helpfulness": 0-4, ...} or
              {"messages": [..., assistant], <attribute>: number, ...}; a missing, null or -100
              attribute is masked out of the loss (NeMo labels absent attributes -100).

A prompt string is one user turn, except two documented forms that carry structure:
a rendered Nemotron prompt (starting `<extra_id_0>System\\n`, as NeMo-Aligner files store
them) is parsed back into messages, and HelpSteer2's multi-turn prompts (turns separated by
`\\n<extra_id_1>Assistant\\n` / `\\n<extra_id_1>User\\n`) are split into turns. A response that
ends with the turn token (`...\\n<extra_id_1>`, NeMo-Aligner's convention) loses it: the
tokenizer adds the closing token itself.

Every malformed record is reported as `file:line: what is wrong`; with on_bad="fail" (the
default) loading raises one DataError listing them, with on_bad="skip" they are counted and
left out.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nemojax.config import HELPSTEER2_ATTRIBUTES
from nemojax.data.chat_template import (ROLES, SYSTEM_TOKEN, TURN_TOKEN, ChatFormatError,
                                        chat_segments)
from nemojax.data.sources import DataError, expand_paths

KINDS = ("sft", "preference", "reward")
MISSING_LABEL = -100  # NeMo's marker for an attribute a record does not label
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system"}
_MAX_LISTED = 10

Messages = list[dict[str, str]]


class RecordError(ValueError):
    """One record that cannot be used; the loader prefixes file and line."""


@dataclass(frozen=True)
class SFTExample:
    messages: Messages
    origin: str = ""  # file:line


@dataclass(frozen=True)
class PreferenceExample:
    prompt: Messages  # ends with a user turn; the responses are the next assistant turn
    chosen: str
    rejected: str
    chosen_reward: float | None = None
    rejected_reward: float | None = None
    origin: str = ""


@dataclass(frozen=True)
class RewardExample:
    messages: Messages  # ends with the assistant response being scored
    labels: tuple[float | None, ...] = ()  # one per attribute; None = missing (masked)
    origin: str = ""


@dataclass
class LoadReport:
    """What a loader read: records, problems (first few listed, all counted)."""

    files: list[str] = field(default_factory=list)
    records: int = 0
    bad: int = 0
    problems: list[str] = field(default_factory=list)

    def add_problem(self, where: str, message: str) -> None:
        self.bad += 1
        if len(self.problems) < _MAX_LISTED:
            self.problems.append(f"{where}: {message}")

    def summary(self) -> dict[str, Any]:
        return {"files": len(self.files), "records": self.records, "bad_records": self.bad}


# --------------------------------------------------------------------------- reading files


def iter_records(path: str | Path, what: str = "data") -> Iterator[tuple[str, Any]]:
    """(file:line, decoded record) for every record of a file, directory or glob.

    JSON lines (.jsonl/.json/.ndjson; blank lines skipped) or Parquet (.parquet/.pq; the row
    number stands in for the line). A line that is not valid JSON yields a RecordError instead of
    a record so that the caller reports it with the others.
    """
    for f in expand_paths(str(path), what):
        if f.suffix.lower() in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            for i, rec in enumerate(pq.read_table(f).to_pylist(), start=1):
                yield f"{f}:row {i}", rec
            continue
        with f.open("rb") as fh:
            for i, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                try:
                    yield f"{f}:{i}", json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    yield f"{f}:{i}", RecordError(f"not valid JSON ({e})")


def load_examples(path: str | Path, kind: str, *, attributes: Sequence[str] = HELPSTEER2_ATTRIBUTES,
                  on_bad: str = "fail") -> tuple[list[Any], LoadReport]:
    """Every example of `kind` ("sft" | "preference" | "reward") in `path`, and a LoadReport."""
    if kind not in KINDS:
        raise ValueError(f"record kind {kind!r} is unknown; use one of {', '.join(KINDS)}")
    if on_bad not in ("fail", "skip"):
        raise ValueError(f"on_bad={on_bad!r}: use 'fail' or 'skip'")
    parse = {"sft": parse_sft, "preference": parse_preference,
             "reward": lambda r: parse_reward(r, attributes)}[kind]
    report = LoadReport(files=[str(f) for f in expand_paths(str(path), f"{kind} data")])
    out = []
    for where, rec in iter_records(path, f"{kind} data"):
        report.records += 1
        try:
            if isinstance(rec, RecordError):
                raise rec
            ex = parse(rec)
        except (RecordError, ChatFormatError) as e:
            report.add_problem(where, str(e))
            continue
        out.append(dataclasses.replace(ex, origin=where))
    if report.bad and on_bad == "fail":
        more = f"\n  ... and {report.bad - len(report.problems)} more" if report.bad > len(report.problems) else ""
        raise DataError(f"{report.bad} malformed {kind} record(s) in {path} (fix them, or skip them with "
                        f"stage.on_bad=skip):\n  " + "\n  ".join(report.problems) + more)
    return out, report


# --------------------------------------------------------------------------- fields


def _record(rec: Any) -> Mapping[str, Any]:
    if not isinstance(rec, Mapping):
        raise RecordError(f"a record must be a JSON object, got {type(rec).__name__}")
    return rec


def messages_from(value: Any, key: str) -> Messages:
    """A validated message list: [{"role", "content"}] (or ShareGPT's [{"from", "value"}])."""
    if not isinstance(value, list) or not value:
        raise RecordError(f"{key!r} must be a non-empty list of {{'role': ..., 'content': ...}} objects")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping):
            raise RecordError(f"{key}[{i}] must be an object with 'role' and 'content', got {m!r:.80}")
        if "role" not in m and "from" in m:  # ShareGPT
            role = _SHAREGPT_ROLES.get(str(m["from"]).lower())
            if role is None:
                raise RecordError(f"{key}[{i}]: unknown speaker {m['from']!r}; use human, gpt or system")
            m = {"role": role, "content": m.get("value")}
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise RecordError(f"{key}[{i}]: role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise RecordError(f"{key}[{i}]: content must be a string, got {content!r:.80}")
        out.append({"role": role, "content": content})
    chat_segments(out, add_generation_prompt=False)  # template rules (system only first, ...)
    return out


def prompt_messages(prompt: Any, key: str = "prompt") -> Messages:
    """A record's prompt as messages (see the module docstring for the string forms)."""
    if isinstance(prompt, list):
        return messages_from(prompt, key)
    if not isinstance(prompt, str):
        raise RecordError(f"{key!r} must be a string or a list of messages, got {type(prompt).__name__}")
    if prompt.startswith(f"{SYSTEM_TOKEN}System\n"):
        return _parse_rendered(prompt, key)
    if f"\n{TURN_TOKEN}Assistant\n" in prompt or f"\n{TURN_TOKEN}User\n" in prompt:
        return _split_turns(prompt, key, first_role="user")
    return [{"role": "user", "content": prompt}]


def _split_turns(text: str, key: str, first_role: str) -> Messages:
    """`first\\n<extra_id_1>Role\\ncontent\\n<extra_id_1>Role\\n...` -> messages."""
    pieces = text.split(f"\n{TURN_TOKEN}")
    out = [{"role": first_role, "content": pieces[0]}]
    for piece in pieces[1:]:
        head, sep, body = piece.partition("\n")
        role = {"User": "user", "Assistant": "assistant"}.get(head)
        if role is None or not sep:
            raise RecordError(f"{key!r}: after '<extra_id_1>' expected 'User\\n' or 'Assistant\\n', got {piece[:30]!r}")
        out.append({"role": role, "content": body})
    return out


def _parse_rendered(text: str, key: str) -> Messages:
    """A rendered Nemotron prompt (`<extra_id_0>System\\n...<extra_id_1>Assistant\\n`) -> messages."""
    body = text[len(f"{SYSTEM_TOKEN}System\n"):]
    if body.endswith(f"{TURN_TOKEN}Assistant\n"):  # the generation prompt
        body = body[:-len(f"{TURN_TOKEN}Assistant\n")]
    if not body.endswith("\n"):
        raise RecordError(f"{key!r} starts like a rendered Nemotron prompt but does not end with "
                          f"'\\n<extra_id_1>Assistant\\n'")
    msgs = _split_turns(body[:-1], key, first_role="system")
    if msgs[0]["content"] == "":
        msgs = msgs[1:]
    return msgs


def response_text(value: Any, key: str) -> str:
    """A response string, without a trailing turn token (`\\n<extra_id_1>` or `<extra_id_1>`)."""
    if not isinstance(value, str):
        raise RecordError(f"{key!r} must be a string, got {type(value).__name__}")
    for tail in (f"\n{TURN_TOKEN}", TURN_TOKEN):
        if value.endswith(tail):
            return value[:-len(tail)]
    return value


def _optional_number(rec: Mapping[str, Any], key: str) -> float | None:
    v = rec.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise RecordError(f"{key!r} must be a finite number or null, got {v!r:.40}")
    return float(v)


# --------------------------------------------------------------------------- parsers


def parse_sft(rec: Any) -> SFTExample:
    rec = _record(rec)
    key = "messages" if "messages" in rec else "conversations" if "conversations" in rec else None
    if key is None:
        raise RecordError(f"an SFT record needs 'messages' (a list of {{role, content}}); found keys "
                          f"{sorted(rec)[:8]}")
    msgs = messages_from(rec[key], key)
    if not any(m["role"] == "assistant" for m in msgs):
        raise RecordError(f"{key!r} has no assistant message: nothing to train on")
    return SFTExample(msgs)


def _side(rec: Mapping[str, Any], name: str) -> tuple[Messages, str]:
    """(conversation before the final assistant message, that message) of chosen / rejected."""
    key = name if name in rec else f"{name}_response" if f"{name}_response" in rec else None
    if key is None:
        raise RecordError(f"a preference record needs {name!r} (or NeMo-Aligner's {name + '_response'!r}); "
                          f"found keys {sorted(rec)[:8]}")
    value = rec[key]
    if isinstance(value, list):  # TRL conversational form
        msgs = messages_from(value, key)
        if msgs[-1]["role"] != "assistant":
            raise RecordError(f"{key!r} must end with an assistant message")
        return msgs[:-1], msgs[-1]["content"]
    return [], response_text(value, key)


def parse_preference(rec: Any) -> PreferenceExample:
    rec = _record(rec)
    prompt = prompt_messages(rec["prompt"]) if rec.get("prompt") is not None else []
    c_prefix, chosen = _side(rec, "chosen")
    r_prefix, rejected = _side(rec, "rejected")
    if c_prefix != r_prefix:
        raise RecordError("'chosen' and 'rejected' must share the conversation before their final assistant "
                          "message (the prompt)")
    prompt = prompt + c_prefix
    if not prompt:
        raise RecordError("no prompt: give 'prompt', or message lists in 'chosen'/'rejected' that start with it")
    if prompt[-1]["role"] != "user":
        raise RecordError(f"the prompt must end with a user message, not {prompt[-1]['role']!r}")
    chat_segments(prompt, add_generation_prompt=True)
    return PreferenceExample(prompt, chosen, rejected, _optional_number(rec, "chosen_reward"),
                             _optional_number(rec, "rejected_reward"))


def parse_reward(rec: Any, attributes: Sequence[str]) -> RewardExample:
    rec = _record(rec)
    if "messages" in rec:
        msgs = messages_from(rec["messages"], "messages")
        if msgs[-1]["role"] != "assistant":
            raise RecordError("'messages' must end with the assistant response to score")
    elif "prompt" in rec and "response" in rec:
        msgs = prompt_messages(rec["prompt"]) + [{"role": "assistant",
                                                  "content": response_text(rec["response"], "response")}]
        chat_segments(msgs, add_generation_prompt=False)
    else:
        raise RecordError(f"a reward record needs 'prompt' and 'response' (HelpSteer2 columns) or 'messages'; "
                          f"found keys {sorted(rec)[:8]}")
    labels = []
    for a in attributes:
        v = _optional_number(rec, a)
        labels.append(None if v is None or v == MISSING_LABEL else v)
    if all(v is None for v in labels):
        raise RecordError(f"none of the attributes {list(attributes)} is labelled (set model.reward.attributes "
                          f"to the record's label names)")
    return RewardExample(msgs, tuple(labels))
