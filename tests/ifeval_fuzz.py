"""Random responses and kwargs that stress every IFEval checker, for the differential tests.

`fuzz_texts(n, seed)` composes responses from fragments aimed at each checker's edge cases:
doubled and spaced end punctuation ("great!!", "Why??", ". . ."), abbreviations, bullets of every
kind, placeholders, section markers, *** and ****** dividers, blank-line paragraphs, JSON with and
without fences, <<titles>>, *highlights*, postscripts, end phrases, quotes, capitals, other
languages, commas, markdown wrappers the loose mode strips. `fuzz_kwargs(rng, id, text)` draws
kwargs for an id, edge values included: 0, negatives, empty strings and lists, invalid letters,
languages and relations, thresholds around what the text actually contains. Deterministic for a
seed (only `random.Random` methods whose output is stable across Python versions are used).
"""

from __future__ import annotations

import json
import random
import re
import string
from typing import Any

from nemojax.sdg.instructions.registry import ENDINGS, KEYWORD_POOL

PROMPT = "Write a short note about the river festival."

WORDS = ("the", "river", "festival", "garden", "Morning", "NASA", "EU", "market", "i", "I", "OK", "well-known",
         "it's", "don't", "energy", "window", "Lantern", "RIVER", "x", "e", "z", "Zigzag", "buzz", "jazz", "quiz",
         "3.14", "1,000", "42", "naïve", "café", "A", "a", "B", "BIG", "small", "U.S.", "e.g.", "Dr.", "Mr.",
         "etc.", "a.m.", "Jan.", "No.", "vs.", "Inc.", "St.", "Ph.D.")
ENDS = (".", ".", ".", "!", "?", "!!", "??", "?!", "!?", "...", "..", ". . .", " . . .", "…", "", ".\"", "!\"",
        "?\"", ").", ".)", "!!!", ".'", ":", ";")
FOREIGN = ("Le festival de la rivière commence demain matin et tout le monde est invité à venir.",
           "El festival del río empieza mañana por la mañana y todos están invitados.",
           "Das Flussfest beginnt morgen früh und alle sind herzlich eingeladen.",
           "Il festival del fiume inizia domani mattina e tutti sono invitati.",
           "Речной фестиваль начинается завтра утром, и приглашены все.",
           "川祭りは明日の朝に始まり、誰でも参加できます。",
           "नदी उत्सव कल सुबह शुरू होगा और सभी आमंत्रित हैं।",
           "Tamasha la mto linaanza kesho asubuhi na kila mtu amealikwa.",
           "Jokijuhla alkaa huomenna aamulla ja kaikki ovat tervetulleita.",
           "12345 678", "!!!", "ok")
LANGUAGES = ("en", "fr", "es", "de", "it", "ru", "ja", "hi", "sw", "fi", "pt", "ko")


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS + KEYWORD_POOL) for _ in range(rng.randint(1, 9))]
    if rng.random() < 0.5:
        words[0] = words[0].capitalize()
    if rng.random() < 0.2:
        words.insert(rng.randint(0, len(words)), ",")
    text = " ".join(words).replace(" ,", ",")
    return text + rng.choice(ENDS)


def _prose(rng: random.Random) -> str:
    return " ".join(_sentence(rng) for _ in range(rng.randint(1, 5)))


def _bullets(rng: random.Random) -> str:
    marks = ("* ", "- ", "*", "-", "  * ", "** ", "1. ", "• ", "*  ", "+ ", "**Bold** ", "-- ")
    return "\n".join(rng.choice(marks) + _sentence(rng) for _ in range(rng.randint(1, 6)))


def _placeholders(rng: random.Random) -> str:
    holes = ("[name]", "[]", "[ ]", "[a [b] c]", "[[x]]", "[date]", "[address here]", "[", "]", "[1]")
    return " ".join(rng.choice(holes + (_sentence(rng),)) for _ in range(rng.randint(1, 5)))


def _sections(rng: random.Random) -> str:
    heads = ("Section", "SECTION", "section", "Section ", "Part", "SECTION\t")
    out = []
    for i in range(rng.randint(1, 5)):
        num = rng.choice((str(i + 1), str(i + 1), "X", "", f"{i + 1}:"))
        out.append(f"{rng.choice(heads)} {num}".rstrip() + "\n" + _prose(rng))
    return "\n".join(out)


def _paragraphs(rng: random.Random) -> str:
    dividers = ("\n***\n", " *** ", "***", "\n\n***\n\n", "\n***\n***\n", "\n****\n", "\n* * *\n", "\n\n")
    parts = [_prose(rng) for _ in range(rng.randint(1, 5))]
    text = parts[0]
    for p in parts[1:]:
        text += rng.choice(dividers) + p
    if rng.random() < 0.2:
        text = "***\n" + text
    if rng.random() < 0.2:
        text += "\n***"
    return text


def _blank_line_paragraphs(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(1, 5)):
        first = rng.choice(KEYWORD_POOL + ("\"garden\"", "'river", "Garden,", "garden's", "GARDEN.", ""))
        parts.append((first + " " + _prose(rng)).strip())
    return rng.choice(("\n\n", "\n\n", "\n\n\n", "\n \n")).join(parts)


def _json(rng: random.Random) -> str:
    body = rng.choice((json.dumps({"name": rng.choice(KEYWORD_POOL), "count": rng.randint(0, 9)}),
                       json.dumps([rng.randint(0, 9) for _ in range(rng.randint(0, 3))]), "3", "\"x\"",
                       "{'a': 1}", "{\"a\": 1,}", "{\"a\": [1, 2}", "null", "{}"))
    fence = rng.choice(("", "```json\n", "```JSON\n", "```Json\n", "```\n", "```python\n"))
    tail = "\n```" if fence and rng.random() < 0.8 else ""
    return fence + body + tail


def _title(rng: random.Random) -> str:
    return rng.choice(("<<The River Festival>>", "<< >>", "<<>>", "<<a\nb>>", "<Title>", "<<<x>>>",
                       "**<<Bold Title>>**", "<< spaced title >>")) + "\n" + _prose(rng)


def _highlights(rng: random.Random) -> str:
    marks = ("*one*", "**two**", "* *", "***three***", "*a\nb*", "** **", "*", "**", "*x* *y*", "_z_")
    return " ".join(rng.choice(marks + (_sentence(rng),)) for _ in range(rng.randint(1, 6)))


def _postscript(rng: random.Random) -> str:
    marker = rng.choice(("P.S.", "P.P.S", "P.P.S.", "p.s.", "P. S.", "PS", "P.S", "p. p. s", "PPS", "Ps."))
    return _prose(rng) + rng.choice(("\n", "\n\n", " ")) + marker + " " + _sentence(rng)


def _ending(rng: random.Random) -> str:
    end = rng.choice(ENDINGS + ("Any other questions?", "Is there anything else I can help with?"))
    end = rng.choice((end, end.lower(), end.upper(), end + "\"", end + "  ", end[:-1], end + " Thanks."))
    return _prose(rng) + " " + end


def _constrained(rng: random.Random) -> str:
    return rng.choice(("My answer is yes.", "My answer is no.", "My answer is maybe.", "My answer is Yes.",
                       "my answer is no.", "My answer is yes", "Well. My answer is maybe. Indeed"))


def _two_responses(rng: random.Random) -> str:
    a, b = _prose(rng), _prose(rng)
    sep = rng.choice(("\n******\n", "******", "\n*******\n", "\n******\n******\n", "\n*****\n"))
    return rng.choice((a + sep + b, a + sep + a, sep + a + sep + b + sep, a + sep))


def _repeat_prompt(rng: random.Random) -> str:
    start = rng.choice((PROMPT, PROMPT.lower(), PROMPT.upper(), "  " + PROMPT, PROMPT[:-1], "Sure! " + PROMPT))
    return start + rng.choice(("\n", " ", "")) + _prose(rng)


def _capitals(rng: random.Random) -> str:
    return " ".join(rng.choice(("NASA", "EU", "U.S.", "I", "OK", "BIG", "DON'T", "WELL-KNOWN", "A", "word",
                                "Word", "X1", "HTTP/2", "NO.")) for _ in range(rng.randint(1, 12)))


def _foreign(rng: random.Random) -> str:
    return " ".join(rng.sample(FOREIGN, rng.randint(1, 2)))


def _letters(rng: random.Random) -> str:
    letter = rng.choice(string.ascii_letters)
    return " ".join(letter * rng.randint(1, 4) for _ in range(rng.randint(1, 5)))


BLOCKS = (_prose, _prose, _bullets, _placeholders, _sections, _paragraphs, _blank_line_paragraphs, _json,
          _title, _highlights, _postscript, _ending, _constrained, _two_responses, _repeat_prompt, _capitals,
          _foreign, _letters)


def _wrap(rng: random.Random, text: str) -> str:
    """Transforms the loose mode and the case / quotation checkers care about."""
    if rng.random() < 0.1:
        text = text.upper()
    elif rng.random() < 0.1:
        text = text.lower()
    if rng.random() < 0.15:  # a chatty first line, removed by loose mode
        text = rng.choice(("Sure! Here is my answer:", "**Answer**", "Of course, here you go.")) + "\n" + text
    if rng.random() < 0.15:  # a trailing note, removed by loose mode
        text += "\n" + rng.choice(("*Note: generated.*", "Hope this helps!", "---"))
    if rng.random() < 0.12:  # markdown emphasis around the whole answer, stripped by loose mode
        text = rng.choice(("*", "**")) + text + rng.choice(("*", "**"))
    if rng.random() < 0.1:
        text = re.sub(r"\b(\w+)\b", lambda m: f"**{m.group(1)}**" if rng.random() < 0.2 else m.group(1), text)
    if rng.random() < 0.1:
        text = '"' + text + '"'
    if rng.random() < 0.1:
        text = rng.choice(("  ", "\n", "\t", " \n ")) + text + rng.choice(("  ", "\n", "\n\n", ""))
    return text


def fuzz_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = ["", "   ", "\n", "*", "**", '"', '""', "That is great!!", "Why??", "He ran. . . She ran.",
           "Wow!!! Really?! No?!?", PROMPT]
    while len(out) < n:
        blocks = [rng.choice(BLOCKS)(rng) for _ in range(rng.randint(1, 4))]
        out.append(_wrap(rng, rng.choice(("\n", "\n\n", " ", "\n***\n", "")).join(blocks)))
    return out[:n]


def _words_of(text: str) -> list[str]:
    return re.findall(r"[A-Za-z]+", text) or ["river"]


def _count(rng: random.Random, around: int, top: int = 12) -> int:
    """A threshold near `around`, sometimes an edge value (0, negative, far off)."""
    roll = rng.random()
    if roll < 0.08:
        return 0
    if roll < 0.13:
        return -rng.randint(1, 3)
    if roll < 0.2:
        return rng.randint(0, top)
    return max(1, around + rng.randint(-2, 2))


def _relation(rng: random.Random) -> str:
    return rng.choice(("less than", "at least") * 20 + ("more than", ""))


def fuzz_kwargs(rng: random.Random, instruction_id: str, text: str) -> dict[str, Any]:
    """kwargs for `instruction_id` (IFEval's names), near what `text` contains, edge values included."""
    words = _words_of(text)
    word = rng.choice(words + list(KEYWORD_POOL[:5])) if rng.random() > 0.05 else rng.choice(("", " ", "RIVER"))
    n_words = len(re.findall(r"\w+", text))
    kind = instruction_id
    if kind == "keywords:existence":
        return {"keywords": [rng.choice(words + list(KEYWORD_POOL)) for _ in range(rng.choice((0, 1, 1, 2, 2, 3)))]}
    if kind == "keywords:frequency":
        return {"keyword": word, "frequency": _count(rng, text.lower().count(word.lower()) if word else 1),
                "relation": _relation(rng)}
    if kind == "keywords:forbidden_words":
        return {"forbidden_words": [rng.choice(words + list(KEYWORD_POOL)) for _ in range(rng.choice((0, 1, 2, 3)))]}
    if kind == "keywords:letter_frequency":
        letter = rng.choice(list(string.ascii_letters) * 3 + ["", " a", "ab", "1", "é", "İ", "Z"])
        return {"letter": letter, "let_frequency": _count(rng, text.lower().count(letter.lower()) if letter else 1),
                "let_relation": _relation(rng)}
    if kind == "language:response_language":
        return {"language": rng.choice(LANGUAGES * 4 + ("xx", "", "EN"))}
    if kind == "length_constraints:number_sentences":
        return {"num_sentences": _count(rng, text.count(".") + text.count("!") + text.count("?")),
                "relation": _relation(rng)}
    if kind == "length_constraints:number_paragraphs":
        return {"num_paragraphs": _count(rng, text.count("***") + 1, 6)}
    if kind == "length_constraints:number_words":
        return {"num_words": _count(rng, n_words, 500), "relation": _relation(rng)}
    if kind == "length_constraints:nth_paragraph_first_word":
        paragraphs = [p for p in text.split("\n\n") if p.strip()] or [text]
        num = _count(rng, len(paragraphs), 6)
        nth = rng.choice((rng.randint(1, max(1, num)),) * 6 + (0, -1, num + 1))
        firsts = [_words_of(p)[0].lower() for p in paragraphs]
        first = rng.choice(firsts + ["garden", "river", ""])
        return {"num_paragraphs": num, "nth_paragraph": nth, "first_word": first}
    if kind == "detectable_content:number_placeholders":
        return {"num_placeholders": _count(rng, text.count("["), 5)}
    if kind == "detectable_content:postscript":
        return {"postscript_marker": rng.choice(("P.S.", "P.P.S") * 6 + ("PS", "p.s.", " P.S. ", "", "P.P.S."))}
    if kind == "detectable_format:number_bullet_lists":
        return {"num_bullets": _count(rng, text.count("\n* ") + text.count("\n- ") + 1, 6)}
    if kind == "detectable_format:number_highlighted_sections":
        return {"num_highlights": _count(rng, text.count("*") // 2, 6)}
    if kind == "detectable_format:multiple_sections":
        return {"section_spliter": rng.choice(("Section", "SECTION") * 6 + (" Section ", "Part", "")),
                "num_sections": _count(rng, text.lower().count("section"), 5)}
    if kind == "combination:repeat_prompt":
        return {"prompt_to_repeat": rng.choice((PROMPT,) * 8 + (PROMPT.upper(), " " + PROMPT, "", "Write"))}
    if kind == "startend:end_checker":
        tail = " ".join(text.split()[-rng.randint(1, 4):]) if text.split() else ""
        return {"end_phrase": rng.choice(ENDINGS + ("Any other questions?", tail, tail, "", " x "))}
    if kind == "change_case:capital_word_frequency":
        caps = sum(1 for w in text.split() if w.isupper())
        return {"capital_frequency": _count(rng, caps, 15), "capital_relation": _relation(rng)}
    return {}
