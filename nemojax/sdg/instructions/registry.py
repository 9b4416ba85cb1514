"""The 25 IFEval instruction ids: kwargs, description templates, parameter samplers, conflicts.

`INSTRUCTIONS[id]` is an `InstructionSpec`. Descriptions are the project's own wording of each
constraint (override any of them with `describe(..., templates={id: "..."})`); the kwargs
names, the ranges the samplers draw from and the conflict table follow IFEval, so prompts built
here are scored by IFEval's own checkers and vice versa.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Any, Callable

from nemojax.sdg.instructions import checkers as C
from nemojax.sdg.instructions.text import LANGUAGE_NAMES

# Common English words used as keywords / forbidden words / first words (project's own list).
KEYWORD_POOL = (
    "garden", "window", "river", "history", "market", "energy", "morning", "planet", "music",
    "science", "journey", "kitchen", "winter", "village", "engine", "letter", "mountain", "budget",
    "coffee", "library", "forest", "signal", "memory", "harvest", "bridge", "doctor", "ocean",
    "festival", "pencil", "island", "weather", "machine", "teacher", "balance", "ticket", "shadow",
    "network", "pattern", "courage", "station", "silver", "captain", "garage", "summer",
    "language", "freedom", "picture", "company", "highway", "rocket", "fabric", "lantern", "meadow",
    "orchard", "puzzle", "quarter", "recipe", "season", "thunder", "umbrella", "voyage", "wallet",
)
ENDINGS = ("Is there anything else I can help with?", "Let me know if you have further questions.",
           "That is all for now.")
POSTSCRIPT_MARKERS = ("P.S.", "P.P.S")
SECTION_MARKERS = ("Section", "SECTION")

Sampler = Callable[[random.Random, str], dict[str, Any]]


@dataclass(frozen=True)
class InstructionSpec:
    """One verifiable instruction: its checker, kwargs, description template and sampler."""

    id: str
    checker: Callable[..., bool]
    kwargs: tuple[str, ...]  # IFEval's names, all required by the checker
    template: str  # str.format over the kwargs (lists are joined with ", ")
    sample: Sampler  # (rng, prompt) -> kwargs

    def describe(self, kwargs: dict[str, Any], template: str | None = None) -> str:
        shown = {k: (", ".join(v) if isinstance(v, (list, tuple)) else v) for k, v in kwargs.items()}
        if "language" in shown:
            shown["language_name"] = LANGUAGE_NAMES.get(shown["language"], shown["language"])
        return (template or self.template).format(**shown)


def _relation(rng: random.Random) -> str:
    return rng.choice(C.RELATIONS)


def _words(rng: random.Random, n: int) -> list[str]:
    return rng.sample(sorted(set(KEYWORD_POOL)), n)


def _nth_first_word(rng: random.Random, _: str) -> dict[str, Any]:
    n = rng.randint(1, 5)
    return {"num_paragraphs": n, "nth_paragraph": rng.randint(1, n), "first_word": _words(rng, 1)[0]}


_SPECS = [
    InstructionSpec("keywords:existence", C.keywords_existence, ("keywords",),
                    "Make sure the words {keywords} all appear in your answer.",
                    lambda r, p: {"keywords": sorted(_words(r, 2))}),
    InstructionSpec("keywords:frequency", C.keywords_frequency, ("keyword", "frequency", "relation"),
                    "Use the word \"{keyword}\" {relation} {frequency} times in your answer.",
                    lambda r, p: {"keyword": _words(r, 1)[0], "frequency": r.randint(1, 3),
                                  "relation": _relation(r)}),
    InstructionSpec("keywords:forbidden_words", C.keywords_forbidden_words, ("forbidden_words",),
                    "Never use any of these words in your answer: {forbidden_words}.",
                    lambda r, p: {"forbidden_words": sorted(_words(r, 2))}),
    InstructionSpec("keywords:letter_frequency", C.keywords_letter_frequency,
                    ("letter", "let_frequency", "let_relation"),
                    "The letter \"{letter}\" must occur {let_relation} {let_frequency} times in your answer.",
                    lambda r, p: {"letter": r.choice(string.ascii_lowercase), "let_frequency": r.randint(1, 10),
                                  "let_relation": _relation(r)}),
    InstructionSpec("language:response_language", C.language_response_language, ("language",),
                    "Write your whole answer in {language_name} and in no other language.",
                    lambda r, p: {"language": r.choice(sorted(LANGUAGE_NAMES))}),
    InstructionSpec("length_constraints:number_sentences", C.length_number_sentences,
                    ("num_sentences", "relation"),
                    "Your answer must have {relation} {num_sentences} sentences.",
                    lambda r, p: {"num_sentences": r.randint(1, 20), "relation": _relation(r)}),
    InstructionSpec("length_constraints:number_paragraphs", C.length_number_paragraphs, ("num_paragraphs",),
                    "Write exactly {num_paragraphs} paragraphs, with a line holding only *** between "
                    "consecutive paragraphs.",
                    lambda r, p: {"num_paragraphs": r.randint(1, 5)}),
    InstructionSpec("length_constraints:number_words", C.length_number_words, ("num_words", "relation"),
                    "Your answer must be {relation} {num_words} words long.",
                    lambda r, p: {"num_words": r.randint(100, 500), "relation": _relation(r)}),
    InstructionSpec("length_constraints:nth_paragraph_first_word", C.length_nth_paragraph_first_word,
                    ("num_paragraphs", "nth_paragraph", "first_word"),
                    "Write exactly {num_paragraphs} paragraphs separated by blank lines (two newlines, "
                    "nothing else); paragraph number {nth_paragraph} must begin with the word \"{first_word}\".",
                    _nth_first_word),
    InstructionSpec("detectable_content:number_placeholders", C.content_number_placeholders,
                    ("num_placeholders",),
                    "Leave at least {num_placeholders} placeholders in square brackets, like [name], "
                    "for the reader to fill in.",
                    lambda r, p: {"num_placeholders": r.randint(1, 4)}),
    InstructionSpec("detectable_content:postscript", C.content_postscript, ("postscript_marker",),
                    "End your answer with a postscript that starts with {postscript_marker}",
                    lambda r, p: {"postscript_marker": r.choice(POSTSCRIPT_MARKERS)}),
    InstructionSpec("detectable_format:number_bullet_lists", C.format_number_bullet_lists, ("num_bullets",),
                    "Format your answer as exactly {num_bullets} markdown bullet points, each on its own "
                    "line starting with \"* \".",
                    lambda r, p: {"num_bullets": r.randint(1, 5)}),
    InstructionSpec("detectable_format:constrained_response", C.format_constrained_response, (),
                    "Reply with one of these exact sentences: \"My answer is yes.\", \"My answer is no.\" "
                    "or \"My answer is maybe.\"",
                    lambda r, p: {}),
    InstructionSpec("detectable_format:number_highlighted_sections", C.format_number_highlighted_sections,
                    ("num_highlights",),
                    "Emphasise at least {num_highlights} parts of your answer with markdown, "
                    "like *this part*.",
                    lambda r, p: {"num_highlights": r.randint(1, 4)}),
    InstructionSpec("detectable_format:multiple_sections", C.format_multiple_sections,
                    ("section_spliter", "num_sections"),
                    "Split your answer into {num_sections} sections, each opened by a line "
                    "\"{section_spliter} N\" where N is its number.",
                    lambda r, p: {"section_spliter": r.choice(SECTION_MARKERS), "num_sections": r.randint(1, 5)}),
    InstructionSpec("detectable_format:json_format", C.format_json_format, (),
                    "Give your entire answer as valid JSON (a ```json fence around it is fine).",
                    lambda r, p: {}),
    InstructionSpec("detectable_format:title", C.format_title, (),
                    "Start with a title inside double angle brackets, like <<a title>>.",
                    lambda r, p: {}),
    InstructionSpec("combination:two_responses", C.combination_two_responses, (),
                    "Write two different answers, separated by a line of six asterisks (******) and "
                    "nothing else.",
                    lambda r, p: {}),
    InstructionSpec("combination:repeat_prompt", C.combination_repeat_prompt, ("prompt_to_repeat",),
                    "Before answering, copy the request above word for word (not this sentence), then "
                    "give your answer.",
                    lambda r, p: {"prompt_to_repeat": p}),
    InstructionSpec("startend:end_checker", C.startend_end_checker, ("end_phrase",),
                    "The last words of your answer must be exactly: {end_phrase}",
                    lambda r, p: {"end_phrase": r.choice(ENDINGS)}),
    InstructionSpec("startend:quotation", C.startend_quotation, (),
                    "Put your whole answer inside double quotation marks.",
                    lambda r, p: {}),
    InstructionSpec("change_case:capital_word_frequency", C.change_case_capital_word_frequency,
                    ("capital_frequency", "capital_relation"),
                    "Words written entirely in capital letters must appear {capital_relation} "
                    "{capital_frequency} times in your answer.",
                    lambda r, p: {"capital_frequency": r.randint(1, 20), "capital_relation": _relation(r)}),
    InstructionSpec("change_case:english_capital", C.change_case_english_capital, (),
                    "Answer in English, using only capital letters.",
                    lambda r, p: {}),
    InstructionSpec("change_case:english_lowercase", C.change_case_english_lowercase, (),
                    "Answer in English, using only lowercase letters; no capitals at all.",
                    lambda r, p: {}),
    InstructionSpec("punctuation:no_comma", C.punctuation_no_comma, (),
                    "Do not use a single comma anywhere in your answer.",
                    lambda r, p: {}),
]
INSTRUCTIONS: dict[str, InstructionSpec] = {s.id: s for s in _SPECS}
INSTRUCTION_IDS: tuple[str, ...] = tuple(INSTRUCTIONS)


def _conflicts() -> dict[str, frozenset[str]]:
    """Pairs that cannot (or should not) be asked together, made symmetric; every id conflicts
    with itself. The pairs are IFEval's."""
    everything = set(INSTRUCTION_IDS)
    raw: dict[str, set[str]] = {i: {i} for i in INSTRUCTION_IDS}
    raw["language:response_language"] |= {
        "detectable_format:multiple_sections", "keywords:existence", "keywords:frequency",
        "keywords:forbidden_words", "startend:end_checker", "change_case:english_capital",
        "change_case:english_lowercase"}
    raw["length_constraints:number_paragraphs"] |= {
        "length_constraints:nth_paragraph_first_word", "length_constraints:number_sentences"}
    raw["detectable_format:constrained_response"] |= everything
    raw["detectable_format:multiple_sections"] |= {"detectable_format:number_highlighted_sections"}
    raw["detectable_format:json_format"] |= everything - {"keywords:forbidden_words", "keywords:existence"}
    raw["combination:two_responses"] |= everything - {
        "keywords:forbidden_words", "keywords:existence", "language:response_language",
        "detectable_format:title", "punctuation:no_comma"}
    raw["combination:repeat_prompt"] |= everything - {
        "keywords:existence", "detectable_format:title", "punctuation:no_comma"}
    raw["change_case:capital_word_frequency"] |= {"change_case:english_lowercase", "change_case:english_capital"}
    raw["change_case:english_lowercase"] |= {"change_case:english_capital"}
    raw["startend:quotation"] |= {"detectable_format:title"}
    for a in list(raw):
        for b in raw[a]:
            raw[b].add(a)
    return {k: frozenset(v) for k, v in raw.items()}


CONFLICTS: dict[str, frozenset[str]] = _conflicts()


def spec(instruction_id: str) -> InstructionSpec:
    try:
        return INSTRUCTIONS[instruction_id]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(instruction_id, INSTRUCTION_IDS, n=3, cutoff=0.4)
        raise ValueError(f"unknown instruction id {instruction_id!r}"
                         + (f"; did you mean {', '.join(close)}?" if close else
                            f"; known ids: {', '.join(INSTRUCTION_IDS)}")) from None


def sample_instructions(rng: random.Random, prompt: str, n: int, *,
                        allowed: list[str] | tuple[str, ...] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """Up to `n` mutually compatible instructions with sampled kwargs, in draw order."""
    pool = list(allowed or INSTRUCTION_IDS)
    for i in pool:
        spec(i)
    chosen: list[str] = []
    while len(chosen) < n:
        candidates = [i for i in pool if not any(i in CONFLICTS[c] for c in chosen)]
        if not candidates:
            break
        chosen.append(rng.choice(candidates))
    return [(i, INSTRUCTIONS[i].sample(rng, prompt)) for i in chosen]
