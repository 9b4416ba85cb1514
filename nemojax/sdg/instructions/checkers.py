"""One checker per IFEval instruction id: `response, **kwargs -> bool`.

Each function's verdict equals the `check_following` of IFEval's reference implementation
(google-research instruction_following_eval, also shipped in lm-eval) for the same kwargs,
including its quirks, because published scores depend on them: keywords are used as regular
expressions, a bullet is a line starting with `*` or `-`, a section marker is a regex, the
language checks pass when no language can be detected, and so on. The differential test
(tests/test_sdg_instructions_reference.py) runs both on generated responses.

Kwargs names are IFEval's. Where the reference would silently draw a random value instead of
the one given (a negative count, a letter that is not one ASCII letter, an `nth_paragraph` outside
`[1, num_paragraphs]`; empty and zero values are refused earlier, in `evaluate`), or crash (an
unknown language or relation), the checker raises a ValueError naming the kwarg: no verdict can
equal the reference's there, and a wrong constraint is better reported than scored.
"""

from __future__ import annotations

import collections
import json
import re

from nemojax.sdg.instructions import text

RELATIONS = ("less than", "at least")
CONSTRAINED_RESPONSES = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


def _compare(count: int, relation: str, threshold: int, relation_name: str = "relation") -> bool:
    if relation == "less than":
        return count < threshold
    if relation == "at least":
        return count >= threshold
    raise ValueError(f"{relation_name}={relation!r}: must be one of {RELATIONS}")


def _count(name: str, value: object, *, negative_ok: bool = False) -> int:
    """A count kwarg, checked: an int, and >= 0 unless the reference keeps negatives as given."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r}: must be an integer")
    if value < 0 and not negative_ok:
        raise ValueError(f"{name}={value}: must be >= 0 (IFEval's reference replaces a negative "
                         f"value with a random one)")
    return value


# ----------------------------------------------------------------------------- keywords


def keywords_existence(response: str, *, keywords: list[str]) -> bool:
    return all(re.search(k, response, flags=re.IGNORECASE) for k in keywords)


def keywords_frequency(response: str, *, keyword: str, frequency: int, relation: str) -> bool:
    found = len(re.findall(keyword.strip(), response, flags=re.IGNORECASE))
    return _compare(found, relation, _count("frequency", frequency))


def keywords_forbidden_words(response: str, *, forbidden_words: list[str]) -> bool:
    return not any(re.search(rf"\b{w}\b", response, flags=re.IGNORECASE) for w in forbidden_words)


def keywords_letter_frequency(response: str, *, letter: str, let_frequency: int, let_relation: str) -> bool:
    if not (isinstance(letter, str) and len(letter) == 1 and letter.isascii() and letter.isalpha()):
        raise ValueError(f"letter={letter!r}: must be one ASCII letter (IFEval's reference draws a "
                         f"random letter otherwise)")
    count = collections.Counter(response.lower())[letter.lower()]
    return _compare(count, let_relation, _count("let_frequency", let_frequency), "let_relation")


# ----------------------------------------------------------------------------- language


def language_response_language(response: str, *, language: str) -> bool:
    if language not in text.LANGUAGE_NAMES:
        raise ValueError(f"language={language!r}: must be one of IFEval's codes: "
                         f"{', '.join(text.LANGUAGE_NAMES)}")
    try:
        return text.detect_language(response) == language
    except text.LanguageUndetectable:
        return True  # the reference counts an undetectable language as followed


# ----------------------------------------------------------------------------- length


def length_number_sentences(response: str, *, num_sentences: int, relation: str) -> bool:
    return _compare(text.count_sentences(response), relation, _count("num_sentences", num_sentences))


def length_number_paragraphs(response: str, *, num_paragraphs: int) -> bool:
    _count("num_paragraphs", num_paragraphs)
    parts = re.split(r"\s?\*\*\*\s?", response)
    count = len(parts)
    for i, part in enumerate(parts):
        if not part.strip():
            if i in (0, len(parts) - 1):
                count -= 1  # a divider at the very start or end opens no paragraph
            else:
                return False  # two dividers with nothing between them
    return count == num_paragraphs


def length_number_words(response: str, *, num_words: int, relation: str) -> bool:
    return _compare(text.count_words(response), relation, _count("num_words", num_words))


def length_nth_paragraph_first_word(response: str, *, num_paragraphs: int, nth_paragraph: int,
                                    first_word: str) -> bool:
    _count("num_paragraphs", num_paragraphs)
    if not 0 < _count("nth_paragraph", nth_paragraph) <= num_paragraphs:
        raise ValueError(f"nth_paragraph={nth_paragraph}: must be in [1, num_paragraphs={num_paragraphs}]")
    parts = re.split(r"\n\n", response)
    count = sum(1 for p in parts if p.strip())
    if nth_paragraph > count:
        return False
    paragraph = parts[nth_paragraph - 1].strip()  # indexes the raw split, as the reference does
    if not paragraph:
        return False
    word = paragraph.split()[0].strip().lstrip("'").lstrip('"')
    head = []
    for ch in word:
        if ch in {".", ",", "?", "!", "'", '"'}:
            break
        head.append(ch.lower())
    return count == num_paragraphs and "".join(head) == first_word.lower()


# ----------------------------------------------------------------------------- content


def content_number_placeholders(response: str, *, num_placeholders: int) -> bool:
    return len(re.findall(r"\[.*?\]", response)) >= _count("num_placeholders", num_placeholders)


def content_postscript(response: str, *, postscript_marker: str) -> bool:
    marker = postscript_marker.strip()
    if marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + marker.lower() + r".*$"
    return bool(re.findall(pattern, response.lower(), flags=re.MULTILINE))


# ----------------------------------------------------------------------------- format


def format_number_bullet_lists(response: str, *, num_bullets: int) -> bool:
    _count("num_bullets", num_bullets)
    stars = re.findall(r"^\s*\*[^\*].*$", response, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", response, flags=re.MULTILINE)
    return len(stars) + len(dashes) == num_bullets


def format_constrained_response(response: str) -> bool:
    body = response.strip()
    return any(option in body for option in CONSTRAINED_RESPONSES)


def format_number_highlighted_sections(response: str, *, num_highlights: int) -> bool:
    single = [h for h in re.findall(r"\*[^\n\*]*\*", response) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", response)
              if h.removeprefix("**").removesuffix("**").strip()]
    return len(single) + len(double) >= _count("num_highlights", num_highlights)


def format_multiple_sections(response: str, *, section_spliter: str, num_sections: int) -> bool:
    marker = section_spliter.strip()
    return len(re.split(r"\s?" + marker + r"\s?\d+\s?", response)) - 1 >= _count("num_sections", num_sections)


def format_json_format(response: str) -> bool:
    body = response.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):  # applied in turn, as the reference does
        body = body.removeprefix(fence)
    body = body.removesuffix("```").strip()
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


def format_title(response: str) -> bool:
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", response))


# ----------------------------------------------------------------------------- combination


def combination_two_responses(response: str) -> bool:
    parts = response.split("******")
    kept = []
    for i, part in enumerate(parts):
        if part.strip():
            kept.append(part)
        elif i not in (0, len(parts) - 1):
            return False
    return len(kept) == 2 and kept[0].strip() != kept[1].strip()


def combination_repeat_prompt(response: str, *, prompt_to_repeat: str) -> bool:
    return response.strip().lower().startswith(prompt_to_repeat.strip().lower())


# ----------------------------------------------------------------------------- start / end


def startend_end_checker(response: str, *, end_phrase: str) -> bool:
    return response.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def startend_quotation(response: str) -> bool:
    body = response.strip()
    return len(body) > 1 and body[0] == '"' and body[-1] == '"'


# ----------------------------------------------------------------------------- case


def change_case_capital_word_frequency(response: str, *, capital_frequency: int, capital_relation: str) -> bool:
    count = sum(1 for w in text.word_tokens(response) if w.isupper())
    # the reference keeps a negative capital_frequency as given (it only replaces a missing one)
    return _compare(count, capital_relation, _count("capital_frequency", capital_frequency, negative_ok=True),
                    "capital_relation")


def change_case_english_capital(response: str) -> bool:
    try:
        return response.isupper() and text.detect_language(response) == "en"
    except text.LanguageUndetectable:
        return True


def change_case_english_lowercase(response: str) -> bool:
    try:
        return response.islower() and text.detect_language(response) == "en"
    except text.LanguageUndetectable:
        return True


# ----------------------------------------------------------------------------- punctuation


def punctuation_no_comma(response: str) -> bool:
    return "," not in response
