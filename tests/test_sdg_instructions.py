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
    kw = {"end_phrase": "Bye."}
    response = "Sure, here you go.\nThe answer.\nBye.\n*Note: generated*"
    assert not follows("startend:end_checker", response, kw)
    assert follows("startend:end_checker", response, kw, loose=True)  # last line removed
    title = "**<<Title>>**"
    assert follows("detectable_format:title", title, {})
    assert not follows("punctuation:no_comma", "   ", {}, loose=True)  # empty never passes


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
