"""Generated responses that exercise every IFEval checker's edge cases (shared by the SDG tests).

Built from fragments (sentences with abbreviations, bullets of both kinds, single and double
emphasis, section markers, *** dividers, blank-line paragraphs, JSON with and without fences,
<<titles>>, ****** splits, postscripts, quotes, capitals, commas, other languages, placeholders),
combined at random with a fixed seed, so the same list comes back on every run.
"""

from __future__ import annotations

import json
import random

from nemojax.sdg.instructions.registry import KEYWORD_POOL

PROMPT = "Write a short note about the river festival."

FRAGMENTS = [
    "Dr. Smith went to the U.S. capital. He stayed for a week.",
    "The river festival starts at 9 a.m. on Jan. 5th. Bring a lantern!",
    "Is this the garden? Yes. It is the garden of the village.",
    "* First point about the market\n* Second point about energy\n* Third point",
    "- a dash item\n- another dash item",
    "**Bold start** and a *highlighted section* and * not one *.",
    "*one* *two* **three** ** ** *",
    "Section 1\nThe opening.\nSection 2\nThe middle.\nSECTION 3\nThe end.",
    "First paragraph here.\n***\nSecond paragraph here.\n***\nThird one.",
    "***\nStarts with a divider.\n***",
    "Para one.\n\nPara two starts here.\n\n\"Quoted\" para three.",
    "garden party in the morning.\n\nwindow seats for everyone.",
    '{"name": "river", "count": 3}',
    '```json\n{"a": [1, 2, 3]}\n```',
    "```\n[1, 2]\n```",
    "<<The Poem of Joy>>\nA line of verse.",
    "<<   >> is an empty title",
    "Answer one about rivers.\n******\nAnswer two about mountains.",
    "Same.\n******\nSame.",
    "P.S. Do not forget the ticket.",
    "p. p. s remember the wallet",
    "P.P.S. one more thing",
    "My answer is yes.",
    "\"The whole answer is quoted.\"",
    "THIS IS ALL IN CAPITAL LETTERS AND IT IS ENGLISH TEXT ABOUT THE RIVER.",
    "this text is all lowercase and written in english about the morning market.",
    "I DON'T KNOW THE U.S. RULES, BUT NASA AND THE EU DO.",
    "No commas at all in this sentence",
    "Commas, commas, and more commas, everywhere.",
    "Le festival de la rivière commence demain matin et tout le monde est invité à venir.",
    "El festival del río empieza mañana por la mañana y todos están invitados a venir.",
    "Fill in [name] at [address] before [date].",
    "12345 678",
    "Is there anything else I can help with?",
    "That is all for now.",
    "Mr. and Mrs. Jones arrived... Then they left. Wow! Really?",
    "   \n  ",
]


def make_responses(n: int = 160, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = list(FRAGMENTS)
    out.append(PROMPT + " Here is my note.")
    out.append("Every keyword once: " + " ".join(KEYWORD_POOL) + ".")
    out.append(json.dumps({"k": " ".join(rng.sample(KEYWORD_POOL, 5))}))
    while len(out) < n:
        parts = rng.sample(FRAGMENTS, rng.randint(2, 4))
        parts += [" ".join(rng.sample(KEYWORD_POOL, rng.randint(1, 6)))]
        rng.shuffle(parts)
        sep = rng.choice(["\n", "\n\n", " ", "\n***\n"])
        text = sep.join(parts)
        if rng.random() < 0.15:
            text = text.upper()
        if rng.random() < 0.15:
            text = text.lower()
        if rng.random() < 0.1:
            text = f'"{text}"'
        if rng.random() < 0.1:
            text = PROMPT + "\n" + text
        out.append(text)
    return out


# id -> (kwargs, responses that pass, responses that fail); each verdict was worked out from the
# reference implementation's code and is confirmed against it by the differential test.
CASES: dict[str, tuple[dict, list[str], list[str]]] = {
    "keywords:existence": ({"keywords": ["river", "lantern"]},
                           ["The RIVER glowed under a Lantern.", "riverside lanterns"],  # substring regex
                           ["Only the river.", ""]),
    "keywords:frequency": ({"keyword": "river", "frequency": 2, "relation": "at least"},
                           ["river, River", "rivers and riverbanks"], ["one river only"]),
    "keywords:forbidden_words": ({"forbidden_words": ["market", "coffee"]},
                                 ["The supermarket sells coffees."],  # \b word boundaries
                                 ["Coffee at the market.", "a MARKET day"]),
    "keywords:letter_frequency": ({"letter": "z", "let_frequency": 3, "let_relation": "less than"},
                                  ["Zz only", "no such letter"], ["zzz", "Zigzag zoo"]),
    "language:response_language": ({"language": "fr"},
                                   ["Le festival de la rivière commence demain et tout le monde est invité.",
                                    "12345 678"],  # undetectable counts as followed
                                   ["The river festival starts tomorrow and everyone is invited."]),
    "length_constraints:number_sentences": ({"num_sentences": 3, "relation": "less than"},
                                            ["Dr. Smith went home. He was tired.", "One sentence only"],
                                            ["One. Two. Three.", "Is it? Yes! Really."]),
    "length_constraints:number_paragraphs": ({"num_paragraphs": 3},
                                             ["a\n***\nb\n***\nc", "***\na *** b *** c\n***"],
                                             ["a\n***\n***\nb\n***\nc", "a\n***\nb", "a\n\nb\n\nc"]),
    "length_constraints:number_words": ({"num_words": 5, "relation": "at least"},
                                        ["one two three four five", "it's a well-known fact"],
                                        ["one two three four"]),
    "length_constraints:nth_paragraph_first_word": (
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "garden"},
        ["Intro text.\n\nGarden, the second one.", "Intro.\n\n\"garden's\" edge."],
        ["Intro.\n\nThe garden.", "Garden first.\n\nIntro.", "Intro.\n\nGarden.\n\nThird."]),
    "detectable_content:number_placeholders": ({"num_placeholders": 2},
                                               ["Dear [name], see [date].", "[a][b]"],
                                               ["Dear [name], see you.", "no placeholders"]),
    "detectable_content:postscript": ({"postscript_marker": "P.S."},
                                      ["Body.\nP.S. bring snacks", "Body. p. s. later"],
                                      ["Body.\nPS bring snacks", "P.P.S only"]),
    "detectable_format:number_bullet_lists": ({"num_bullets": 2},
                                              ["* one\n* two", "- one\n  * two"],
                                              ["* one\n* two\n* three", "** bold\n* one", "1. one\n2. two"]),
    "detectable_format:constrained_response": ({}, ["My answer is yes.", "Well. My answer is maybe. Indeed"],
                                               ["My answer is Yes.", "yes"]),
    "detectable_format:number_highlighted_sections": ({"num_highlights": 2},
                                                      ["*one* and *two*", "**bold** and *one*"],
                                                      ["*one* only", "**bold one**", "* * and ** **"]),
    "detectable_format:multiple_sections": ({"section_spliter": "Section", "num_sections": 2},
                                            ["Section 1\na\nSection 2\nb", "x Section 1 a Section 2 b"],
                                            ["Section 1\na", "SECTION 1\na\nSECTION 2\nb"]),
    "detectable_format:json_format": ({}, ['{"a": 1}', '```json\n{"a": [1, 2]}\n```', "```\n3\n```"],
                                      ["{'a': 1}", "Here it is: {\"a\": 1}"]),
    "detectable_format:title": ({}, ["<<Poem of Joy>>\ntext", "a <<t>> b"], ["<<   >>", "<Poem>", "<<a\nb>>"]),
    "combination:two_responses": ({}, ["First.\n******\nSecond.", "******\nA\n******\nB\n******"],
                                  ["Same.\n******\nSame.", "A\n******\n******\nB", "Just one."]),
    "combination:repeat_prompt": ({"prompt_to_repeat": "Write a note."},
                                  ["write a NOTE. Here it is.", "  Write a note.\nDone"],
                                  ["Sure! Write a note.", "Write a"]),
    "startend:end_checker": ({"end_phrase": "Any other questions?"},
                             ["Text. Any other questions?", "Text. any other questions?\"  "],
                             ["Any other questions? Thanks.", "Any other questions"]),
    "startend:quotation": ({}, ['"quoted"', '  "a"  '], ['"', "'single'", '"open only']),
    "change_case:capital_word_frequency": ({"capital_frequency": 3, "capital_relation": "at least"},
                                           ["I SAID NO TO NASA", "U.S. AND EU RULES"],
                                           ["I said no to NASA", "Hello World"]),
    "change_case:english_capital": ({}, ["THIS IS AN ENGLISH SENTENCE ABOUT THE RIVER FESTIVAL."],
                                    ["This is an English sentence about the river.",
                                     "THIS ENGLISH SENTENCE HAS ONE lowercase WORD."]),
    "change_case:english_lowercase": ({}, ["this is an english sentence about the river festival."],
                                      ["This is an English sentence about the river festival."]),
    "punctuation:no_comma": ({}, ["No commas here.", "semicolons; fine"], ["a, b", "one,two"]),
}
