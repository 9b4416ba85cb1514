"""Prompts that carry verifiable instructions: single-turn, multi-turn and second-turn revision.

Each builder returns `{"messages": [...], "instruction_id_list": [...], "kwargs": [...]}`; the
instructions apply to the final assistant turn (single-turn, revision) or to every assistant
turn from the first on (multi-turn). Wording is overridable through `templates`.
"""

from __future__ import annotations

from typing import Any

from nemojax.sdg.instructions.registry import spec

Instruction = tuple[str, dict[str, Any]]

DEFAULT_TEMPLATES = {
    "single_turn": "{prompt}\n\n{instructions}",
    "multi_turn": "For this question and every question I ask after it, follow these rules: "
                  "{instructions}\n\n{prompt}",
    "revision": "Rewrite your previous answer so that it follows these rules: {instructions}",
}


def describe_all(instructions: list[Instruction], descriptions: dict[str, str] | None = None) -> str:
    return " ".join(spec(i).describe(kw, (descriptions or {}).get(i)) for i, kw in instructions)


def _record(messages: list[dict[str, str]], instructions: list[Instruction]) -> dict[str, Any]:
    return {"messages": messages, "instruction_id_list": [i for i, _ in instructions],
            "kwargs": [dict(kw) for _, kw in instructions]}


def single_turn(prompt: str, instructions: list[Instruction], *, templates: dict[str, str] | None = None,
                descriptions: dict[str, str] | None = None) -> dict[str, Any]:
    t = {**DEFAULT_TEMPLATES, **(templates or {})}
    text = t["single_turn"].format(prompt=prompt, instructions=describe_all(instructions, descriptions))
    return _record([{"role": "user", "content": text}], instructions)


def multi_turn(prompts: list[str], instructions: list[Instruction], *, templates: dict[str, str] | None = None,
               descriptions: dict[str, str] | None = None) -> dict[str, Any]:
    """The first user turn states the rules for all later turns; later prompts are the follow-up
    user turns (assistant turns are generated in between)."""
    t = {**DEFAULT_TEMPLATES, **(templates or {})}
    first = t["multi_turn"].format(prompt=prompts[0], instructions=describe_all(instructions, descriptions))
    rec = _record([{"role": "user", "content": first}], instructions)
    rec["followups"] = list(prompts[1:])
    return rec


def revision(prompt: str, first_answer: str, instructions: list[Instruction], *,
             templates: dict[str, str] | None = None, descriptions: dict[str, str] | None = None) -> dict[str, Any]:
    """user prompt, the assistant's unconstrained answer, then a user turn asking to revise it."""
    t = {**DEFAULT_TEMPLATES, **(templates or {})}
    ask = t["revision"].format(instructions=describe_all(instructions, descriptions))
    return _record([{"role": "user", "content": prompt}, {"role": "assistant", "content": first_answer},
                    {"role": "user", "content": ask}], instructions)
