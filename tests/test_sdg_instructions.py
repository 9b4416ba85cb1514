"""IFEval checkers: a passing and a failing response for every id, the public API, the
evaluator's strict / loose and prompt / instruction levels, samplers, conflicts and builders."""

from __future__ import annotations

import random

import pytest

from nemojax.sdg.instructions import (CONFLICTS, INSTRUCTION_IDS, check, evaluate, follows, multi_turn,
                                      revision, sample_instructions, single_turn, spec)
from tests.sdg_responses import CASES


def test_all_25_ids_have_cases():
    assert len(INSTRUCTION_IDS) == 25 and set(CASES) == set(INSTRUCTION_IDS)


@pytest.mark.parametrize("instruction_id", INSTRUCTION_IDS)
def test_pass_and_fail(instruction_id):
    kwargs, passing, failing = CASES[instruction_id]
    for r in passing:
        assert check(instruction_id, r, **kwargs), (instruction_id, r)
    for r in failing:
        assert not follows(instruction_id, r, kwargs), (instruction_id, r)


def test_kwargs_errors_name_the_problem():
    with pytest.raises(ValueError, match="did you mean punctuation:no_comma"):
        check("punctuation:no_coma", "x")
    with pytest.raises(ValueError, match="missing kwargs \\['keywords'\\]"):
        check("keywords:existence", "x")
    with pytest.raises(ValueError, match="unknown kwargs \\['keyword'\\]"):
        check("keywords:existence", "x", keywords=["a"], keyword="a")
    with pytest.raises(ValueError, match="relation='more than'"):
        check("length_constraints:number_words", "x", num_words=3, relation="more than")
    # HF IFEval rows carry every kwarg name with nulls for the unused ones
    assert check("punctuation:no_comma", "x", keywords=None, num_words=None) is True


def test_loose_mode_variants():
    """Loose mode tries the response without its first / last line and with every `*` removed.
    Kills: loose IFEval without the `*`-stripped variants (each response below passes loose mode
    only once its `*` are gone: no line can be removed from a one-line answer), and loose mode
    without the line-removed variants."""
    kw = {"end_phrase": "Bye."}
    response = "Sure, here you go.\nThe answer.\nBye.\n*Note: generated*"
    assert not follows("startend:end_checker", response, kw)
    assert follows("startend:end_checker", response, kw, loose=True)  # last line removed
    only_without_stars = [("startend:end_checker", {"end_phrase": "Bye."}, "**Bye.**"),
                          ("startend:quotation", {}, '*"quoted"*'),
                          ("detectable_format:json_format", {}, '**{"a": 1}**'),
                          ("combination:repeat_prompt", {"prompt_to_repeat": "Write a note."},
                           "**Write a note.** Here it is.")]
    for instruction_id, kwargs, r in only_without_stars:
        assert not follows(instruction_id, r, kwargs), r
        assert follows(instruction_id, r, kwargs, loose=True), r
    assert not follows("punctuation:no_comma", "   ", {}, loose=True)  # empty never passes


def test_sentence_and_word_counts_follow_the_reference():
    """IFEval counts sentences with NLTK's Punkt code, quirks included; counts written by hand from
    the reference's splits (also in the frozen reference table). Kills: a Punkt implementation that
    merges runs of end punctuation ("great!!" one sentence, ". . ." part of the previous one), and
    counting words with Python's `re` (a Devanagari word with vowel signs would be several)."""
    from nemojax.sdg.instructions.text import count_sentences, count_words

    counts = {"That is great!!": 2, "Why??": 2, "Why?? Because.": 2, "He ran. . . She ran.": 4, "Really?!": 2,
              "Wow!!! Yes?! No?!?": 4, "Wait... what?": 1, "Dr. Smith arrived. He sat.": 2, "": 0}
    assert {t: count_sentences(t) for t in counts} == counts
    assert check("length_constraints:number_sentences", "That is great!!", num_sentences=2, relation="at least")
    assert count_words("नदी उत्सव कल, river-side") == 5


def test_kwargs_the_reference_would_replace_at_random_are_refused():
    """IFEval's evaluator drops falsy kwargs (0, "", []) and its checkers then draw a random value,
    as they do for negative counts and invalid letters; no fixed verdict equals that, so each is a
    ValueError naming the kwarg, whatever the response. Kills: `num_placeholders=0` passing every
    response and `keywords=[]` passing every response (the reference draws 1-4 and two words); the
    kwarg's name lost from the message of a negative count, for every count kwarg (`_count(None,
    ...)`, `"XXfrequencyXX"`, `"NUM_PLACEHOLDERS"`, ...)."""
    refused = [("detectable_content:number_placeholders", {"num_placeholders": 0}, "num_placeholders=0"),
               ("keywords:existence", {"keywords": []}, "keywords=\\[\\]"),
               ("keywords:forbidden_words", {"forbidden_words": []}, "forbidden_words=\\[\\]"),
               ("startend:end_checker", {"end_phrase": ""}, "end_phrase=''"),
               ("length_constraints:number_words", {"num_words": 0, "relation": "less than"}, "num_words=0"),
               ("detectable_format:number_bullet_lists", {"num_bullets": -1}, "num_bullets=-1"),
               ("keywords:frequency", {"keyword": "text", "frequency": -1, "relation": "at least"},
                "^frequency=-1: must be >= 0"),
               ("detectable_content:number_placeholders", {"num_placeholders": -2}, "^num_placeholders=-2: must be"),
               ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": -1},
                "^num_sections=-1: must be"),
               ("keywords:letter_frequency", {"letter": "a", "let_frequency": -1, "let_relation": "at least"},
                "^let_frequency=-1: must be"),
               ("length_constraints:number_sentences", {"num_sentences": -1, "relation": "at least"},
                "^num_sentences=-1: must be"),
               ("length_constraints:number_paragraphs", {"num_paragraphs": -1}, "^num_paragraphs=-1: must be"),
               ("length_constraints:number_words", {"num_words": -1, "relation": "at least"}, "^num_words=-1: must be"),
               ("length_constraints:nth_paragraph_first_word",
                {"num_paragraphs": -1, "nth_paragraph": 1, "first_word": "a"}, "^num_paragraphs=-1: must be"),
               ("detectable_format:number_highlighted_sections", {"num_highlights": -1}, "^num_highlights=-1: must be"),
               ("length_constraints:nth_paragraph_first_word",
                {"num_paragraphs": 2, "nth_paragraph": -1, "first_word": "a"}, "^nth_paragraph=-1: must be"),
               ("change_case:capital_word_frequency", {"capital_frequency": 1.5, "capital_relation": "at least"},
                "^capital_frequency=1.5: must be an integer"),
               ("keywords:letter_frequency", {"letter": " a", "let_frequency": 1, "let_relation": "at least"},
                "letter=' a'"),
               ("language:response_language", {"language": "xx"}, "language='xx'"),
               ("length_constraints:nth_paragraph_first_word",
                {"num_paragraphs": 2, "nth_paragraph": 3, "first_word": "a"}, "nth_paragraph=3")]
    for instruction_id, kwargs, named in refused:
        for response in ("Some [text] here.", ""):
            with pytest.raises(ValueError, match=named):
                follows(instruction_id, response, kwargs)
    # the reference keeps a negative capital_frequency as given: so do we
    assert check("change_case:capital_word_frequency", "no capitals", capital_frequency=-1,
                 capital_relation="at least")


def test_evaluate_levels():
    recs = [
        {"instruction_id_list": ["punctuation:no_comma", "startend:quotation"], "kwargs": [{}, {}],
         "response": '"no commas"'},                                   # both pass
        {"instruction_id_list": ["punctuation:no_comma", "startend:quotation"], "kwargs": [{}, {}],
         "response": '"a, b"'},                                        # 1 of 2
        {"instruction_id_list": ["startend:end_checker"], "kwargs": [{"end_phrase": "Bye."}],
         "response": "Hi.\nBye.\nP.S. x"},                               # loose only
    ]
    out = evaluate(recs)
    assert out["prompts"] == 3 and out["instructions"] == 5
    assert out["prompt_level_strict"] == pytest.approx(1 / 3)
    assert out["instruction_level_strict"] == pytest.approx(3 / 5)
    assert out["prompt_level_loose"] == pytest.approx(2 / 3)
    assert out["instruction_level_loose"] == pytest.approx(4 / 5)
    assert out["per_instruction_strict"]["startend:quotation"] == 1.0


def test_sampler_respects_conflicts_and_is_deterministic():
    for seed in range(200):
        drawn = sample_instructions(random.Random(seed), "Write about rivers.", 3)
        ids = [i for i, _ in drawn]
        for a in ids:
            for b in ids:
                if a != b:
                    assert b not in CONFLICTS[a]
        for i, kw in drawn:
            assert set(kw) == set(spec(i).kwargs)
            spec(i).describe(kw)
    assert sample_instructions(random.Random(7), "p", 3) == sample_instructions(random.Random(7), "p", 3)
    assert all(a in CONFLICTS[b] for a in CONFLICTS for b in CONFLICTS[a])  # symmetric
    assert CONFLICTS["detectable_format:constrained_response"] == frozenset(INSTRUCTION_IDS)


def test_builders():
    ins = [("punctuation:no_comma", {}), ("keywords:existence", {"keywords": ["river", "tea"]})]
    one = single_turn("Write about rivers.", ins)
    assert one["messages"][0]["content"].startswith("Write about rivers.\n\n")
    assert "river, tea" in one["messages"][0]["content"]
    assert one["instruction_id_list"] == ["punctuation:no_comma", "keywords:existence"]
    multi = multi_turn(["Q1?", "Q2?"], ins)
    assert "every question I ask after it" in multi["messages"][0]["content"] and multi["followups"] == ["Q2?"]
    rev = revision("Q?", "A, with a comma.", ins, templates={"revision": "Fix it: {instructions}"})
    assert [m["role"] for m in rev["messages"]] == ["user", "assistant", "user"]
    assert rev["messages"][2]["content"].startswith("Fix it: Do not use a single comma")


def test_cli_ifeval_and_kinds(tmp_path, capsys):
    import json

    from nemojax.cli import main

    path = tmp_path / "r.jsonl"
    rows = [{"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}], "response": "no commas"},
            {"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}], "response": "a, b"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["sdg", "ifeval", "--input", str(path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt_level_strict"] == 0.5 and out["instructions"] == 2
    path.write_text('{"instruction_id_list": ["nope"], "kwargs": [{}], "response": "x"}\n')
    assert main(["sdg", "ifeval", "--input", str(path)]) == 2
    assert "unknown instruction id 'nope'" in capsys.readouterr().err
    assert main(["sdg", "kinds"]) == 0
    kinds = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert {k["kind"] for k in kinds} >= {"topics", "preference", "genetic_instruct", "dedup", "export_sft"}


def test_highlights_and_titles_whose_text_is_one_letter_or_blank():
    """As IFEval's reference counts them: "*X*" is a highlight and "<<X>>" a title (one letter is
    text), "** **" is no highlight (blank between the double asterisks). Kills the strip sets
    `"*"` -> `"XX*XX"`, `"<"` -> `"XX<XX"`, `">"` -> `"XX>XX"` (an X stripped as if markup), and
    `removeprefix("**").removesuffix("**")` with either call doubled (a blank double highlight
    then keeps a "**" and counts)."""
    highlights = "detectable_format:number_highlighted_sections"
    assert check(highlights, "*X* marks it.", num_highlights=1)
    assert check(highlights, "** ** and *ok*", num_highlights=1)
    assert not check(highlights, "** ** and *ok*", num_highlights=2)
    assert check("detectable_format:title", "<<X>> then text")


def test_upper_case_json_fence_and_an_ending_x():
    """As IFEval's reference reads them: a ```JSON fence is stripped like ```json, and a response
    ending in the letter X ends with a phrase ending in X (only quotes are stripped). Kills the
    fence list's "```JSON" -> "```json" / "XX```JSONXX", and `strip('"')` -> `strip('XX"XX')`."""
    assert check("detectable_format:json_format", '```JSON\n{"a": 1}\n```')
    assert check("startend:end_checker", "The answer is X", end_phrase="is X")


def test_nth_paragraph_first_word_strips_quotes_and_stops_at_punctuation():
    """As IFEval's reference reads a paragraph's first word: leading ' and " stripped, the word
    cut at the first of . , ? ! ' "; and the checker itself refuses nth_paragraph 0 (`follows`
    refuses a zero kwarg before it, the checker's own guard is what a direct call meets). Kills
    `lstrip("'")` -> `lstrip(None)` / `rstrip("'")` / `lstrip("XX'XX")`, `lstrip('"')` ->
    `lstrip('XX"XX')`, "?" and '"' dropped from the stop set, and `0 < nth_paragraph` -> `0 <=`."""
    from nemojax.sdg.instructions.checkers import length_nth_paragraph_first_word

    response = "'Xenon' is a gas.\n\n\"Xenon\" again.\n\nWhy? Because."
    for nth, word in ((1, "xenon"), (2, "xenon"), (3, "why")):
        assert check("length_constraints:nth_paragraph_first_word", response, num_paragraphs=3, nth_paragraph=nth,
                     first_word=word), nth
    with pytest.raises(ValueError, match=r"^nth_paragraph=0: must be in \[1, num_paragraphs=3\]"):
        length_nth_paragraph_first_word(response, num_paragraphs=3, nth_paragraph=0, first_word="xenon")


def test_relations_and_languages_refused_by_their_own_names():
    """An unknown relation is refused naming the kwarg it came in (`let_relation`,
    `capital_relation`), and an unknown language lists IFEval's codes ", "-separated. Kills the
    relation name passed to `_compare` dropped / renamed in `keywords_letter_frequency` and
    `change_case_capital_word_frequency`, and `', '.join` -> `'XX, XX'.join` in
    `language_response_language`."""
    with pytest.raises(ValueError, match="^let_relation='more': must be one of"):
        follows("keywords:letter_frequency", "x", {"letter": "a", "let_frequency": 1, "let_relation": "more"})
    with pytest.raises(ValueError, match="^capital_relation='more': must be one of"):
        follows("change_case:capital_word_frequency", "x", {"capital_frequency": 1, "capital_relation": "more"})
    with pytest.raises(ValueError, match="IFEval's codes: en, es, pt, "):
        follows("language:response_language", "x", {"language": "xx"})


def test_case_of_a_response_without_language_features():
    """Roman-numeral letters are cased but carry no language features: IFEval's reference then
    catches langdetect's error and counts the case instruction as followed, and so do we. Kills
    `except LanguageUndetectable: return True` -> `return False` in `change_case_english_capital`
    and `change_case_english_lowercase`."""
    assert check("change_case:english_capital", "Ⅻ 12")
    assert check("change_case:english_lowercase", "ⅻ 12")
