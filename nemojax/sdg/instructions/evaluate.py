"""Scoring responses against verifiable instructions, IFEval's way (strict and loose).

strict: the response as it is. loose: an instruction passes when any of eight variants of the
response passes: as is, without its first line, without its last line, without both, and each
of those four with every `*` removed (markdown emphasis). An empty (whitespace-only) response or
variant never passes. Accuracy is reported per prompt (all its instructions pass) and per
instruction (each instruction counted on its own).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from nemojax.sdg.instructions.registry import spec


def _clean_kwargs(instruction_id: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The kwargs the checker gets. None means "not used" (HF IFEval rows carry every kwarg name,
    null where unused). An empty or zero value (0, "", []) is refused: IFEval's evaluator drops
    every falsy kwarg before building its checker, which then draws a random value in its place,
    so no fixed verdict can equal the reference's."""
    s = spec(instruction_id)
    given = {k: v for k, v in kwargs.items() if v is not None}
    unknown = sorted(set(given) - set(s.kwargs))
    if unknown:
        raise ValueError(f"{instruction_id}: unknown kwargs {unknown}; it takes {list(s.kwargs) or 'none'}")
    missing = [k for k in s.kwargs if k not in given]
    if missing:
        raise ValueError(f"{instruction_id}: missing kwargs {missing}")
    empty = [f"{k}={given[k]!r}" for k in s.kwargs if not given[k]]
    if empty:
        raise ValueError(f"{instruction_id}: {', '.join(empty)} is empty; IFEval's reference treats an empty "
                         f"or zero kwarg as unset and draws a random value for it, so give a real one")
    return given


def check(instruction_id: str, response: str, **kwargs: Any) -> bool:
    """Whether `response` follows the instruction (IFEval's `check_following`, strict, no
    empty-response rule). kwargs use IFEval's names; None values are ignored."""
    return bool(spec(instruction_id).checker(response, **_clean_kwargs(instruction_id, kwargs)))


def loose_variants(response: str) -> list[str]:
    lines = response.split("\n")
    cut = ["\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return [response, response.replace("*", ""), *cut, *(c.replace("*", "") for c in cut)]


def follows(instruction_id: str, response: str, kwargs: Mapping[str, Any], *, loose: bool = False) -> bool:
    """One instruction, with the evaluator's rules: empty responses fail; loose tries 8 variants."""
    clean = _clean_kwargs(instruction_id, kwargs)
    checker = spec(instruction_id).checker
    candidates = loose_variants(response) if loose else [response]
    # the checker runs before the emptiness test so that invalid kwargs raise whatever the response
    return any(checker(r, **clean) and bool(r.strip()) for r in candidates)


def follows_all(instruction_ids: list[str], kwargs_list: list[Mapping[str, Any]], response: str, *,
                loose: bool = False) -> list[bool]:
    if len(instruction_ids) != len(kwargs_list):
        raise ValueError(f"{len(instruction_ids)} instruction ids but {len(kwargs_list)} kwargs entries")
    return [follows(i, response, kw, loose=loose) for i, kw in zip(instruction_ids, kwargs_list)]


def evaluate(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Accuracy over records `{"instruction_id_list": [...], "kwargs": [...], "response": str}`.

    Returns prompt_level_strict, instruction_level_strict, prompt_level_loose,
    instruction_level_loose (fractions in [0, 1]), counts, and per-id instruction accuracy.
    """
    prompts = 0
    prompt_ok = {"strict": 0, "loose": 0}
    inst_total = 0
    inst_ok = {"strict": 0, "loose": 0}
    per_id: dict[str, list[int]] = {}
    for n, rec in enumerate(records):
        try:
            ids, kws, response = rec["instruction_id_list"], rec["kwargs"], rec["response"]
        except KeyError as e:
            raise ValueError(f"record {n}: missing field {e.args[0]!r} (needs instruction_id_list, kwargs, "
                             f"response)") from None
        prompts += 1
        inst_total += len(ids)
        for mode in ("strict", "loose"):
            verdicts = follows_all(ids, kws, response, loose=mode == "loose")
            prompt_ok[mode] += all(verdicts)
            inst_ok[mode] += sum(verdicts)
            if mode == "strict":
                for i, v in zip(ids, verdicts):
                    per_id.setdefault(i, [0, 0])
                    per_id[i][0] += v
                    per_id[i][1] += 1

    def frac(a: int, b: int) -> float:
        return a / b if b else 0.0

    return {
        "prompt_level_strict": frac(prompt_ok["strict"], prompts),
        "instruction_level_strict": frac(inst_ok["strict"], inst_total),
        "prompt_level_loose": frac(prompt_ok["loose"], prompts),
        "instruction_level_loose": frac(inst_ok["loose"], inst_total),
        "prompts": prompts, "instructions": inst_total,
        "per_instruction_strict": {k: frac(a, b) for k, (a, b) in sorted(per_id.items())},
    }
