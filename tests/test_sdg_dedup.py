"""Exact and MinHash near-duplicate removal, decontamination that tells contamination from a shared
task template, and the dedup stage with per-family counts."""

from __future__ import annotations

import json
import random
import re

from nemojax.align.leaks import task_keys
from nemojax.align.tasks import make_task
from nemojax.sdg.dedup import Decontaminator, clauses, counts_by_group, dedup_texts, dedup_verdicts, ngrams
from tests.sdg_helpers import read, run_pipeline

BASE = "the quick brown fox jumps over the lazy dog near the quiet river bank at dawn today"


def test_exact_near_and_threshold():
    texts = [BASE, BASE.upper() + "!!", BASE.replace("today", "tomorrow"), "a completely different sentence here"]
    kept, dropped = dedup_texts(texts, threshold=0.7)
    assert kept == [0, 3] and dropped == {"exact_duplicate": 1, "near_duplicate": 1}
    kept, dropped = dedup_texts(texts, near=False)
    assert kept == [0, 2, 3] and dropped == {"exact_duplicate": 1}
    kept, _ = dedup_texts(texts, threshold=0.95)  # one changed word: trigram Jaccard 14/16 < 0.95
    assert kept == [0, 2, 3]


def test_clauses_normalise_and_twins_sort_item_lists():
    assert clauses('What is the LARGEST number of 3 ,5 ?  "Hi" there.') == (
        ("what", "is", "the", "largest", "number", "of", "3", "5"), ("hi", "there"))
    assert clauses("Sort: 10, 9, 2.", items_sorted=True) == (("sort",), ("2", "9", "10"))
    # only a clause-final list of one-token items is sorted: prose and programs keep their order
    prose = "takes an integer x, adds 3 to it, then squares it, and returns the result"
    assert clauses(prose, items_sorted=True) == clauses(prose)


def test_each_kind_of_contamination_and_what_is_not():
    evals = ["What is the largest number of 3, 5?", 'Repeat the word "cat".', "2+2",
             "Sort these numbers from smallest to largest: 7, 1, 4.",
             "What is the capital of France? Answer in one word please, thank you very much indeed."]
    d = Decontaminator(evals, n=8)
    assert d.contaminated("what is the largest number of 3 5") == "contaminated_exact"
    assert d.contaminated("Question: WHAT IS THE LARGEST NUMBER OF 3,5? Answer: 5") == "contaminated_prompt"
    assert d.contaminated("Please: What is the largest number of 5, 3? Be brief.") == "contaminated_twin"
    assert d.contaminated("Sort these numbers from smallest to largest: 4, 7, 1. Thanks.") == "contaminated_twin"
    assert d.contaminated("compute 2 + 2 quickly") == "contaminated_prompt"  # a short eval text occurs whole
    assert d.contaminated("Quiz: what is the capital of france, answer in one word please, thank you very "
                          "much indeed!") == "contaminated_ngram"  # other clause structure, the same words
    for clean in ("What is the largest number of 3, 5, 7?",  # the list goes on: another task
                  "What is the largest number of 3, 6?", "What is the smallest number of 3, 5?",
                  'Repeat the word "cats".', "compute 22 quickly", "What is the capital of Spain? Answer briefly.",
                  "Sort these numbers from smallest to largest: 7, 1, 4, 2.",
                  "Quiz: what is the capital of france answer in one word, now!"):  # a phrase, not the text
        assert d.contaminated(clean) is None, clean


def test_template_ngrams_are_not_evidence():
    """Long texts that share a boilerplate (an n-gram in more than template_fraction of the texts)
    but not their content are not contaminated; the same boilerplate with the content is."""
    boiler = "Read the passage below carefully and answer the question that follows it in one short sentence."
    topics = [f"The {a} of the {b} is {c}." for a in ("colour", "height", "age", "name", "owner")
              for b in ("tower", "river", "house", "garden", "bridge", "market") for c in ("blue", "old", "tall")]
    evals = [f"{boiler} Passage: {t} Question: what is said about it?" for t in topics[:10]]
    pool = [f"{boiler} Passage: {t} Question: what is said about it?" for t in topics[10:]]
    d = Decontaminator(evals, n=8).fit_templates(pool)
    assert all(d.is_template(g) for g in ngrams(boiler.lower().rstrip(".").split(), 8))
    assert not any(d.contaminated(t) for t in pool)
    # the same words with other clause punctuation: not a clause copy, but all its distinctive n-grams
    assert d.contaminated(evals[3].replace(". Passage:", ", passage")) == "contaminated_ngram"


def _pool(rng: random.Random, n: int, families: tuple[str, ...]) -> list:
    return [make_task(families[i % len(families)], rng, rng.choice((1, 2))) for i in range(n)]


def test_toy_pool_template_is_not_contamination_and_every_leak_is_caught():
    """A clean pool of toy prompts keeps every prompt that is not an evaluation task, though code
    and format prompts share long template n-grams with the evaluation prompts (the 13-gram rule
    dropped most of them); the truly contaminated ones are the pool prompts with an evaluation
    task's canonical key (nemojax.align.leaks.task_keys, a parser independent of this code), plus
    injected copies and reordered twins of evaluation prompts."""
    fams = ("lists", "strings", "code")
    evals = _pool(random.Random(1), 60, fams)
    eval_keys = set().union(*(task_keys(t.prompt) for t in evals))
    pool = _pool(random.Random(2), 400, fams) + _pool(random.Random(3), 120, ("format",))
    listed = next(t for t in evals if t.family == "lists" and len(set(re.findall(r"\d+", t.prompt))) > 1)
    nums = re.findall(r"\d+", listed.prompt)
    twin = listed.prompt.replace(", ".join(nums), ", ".join(reversed(nums)))
    injected = [evals[0].prompt, evals[1].prompt.upper().replace(".", " !"), evals[2].prompt + " Be quick.", twin]
    texts = [t.prompt for t in pool] + injected
    d = Decontaminator([t.prompt for t in evals]).fit_templates(texts)
    verdicts = dedup_verdicts(texts, decontaminate=d, exact=False, near=False)
    contaminated = [i for i, v in enumerate(verdicts) if v]
    truth = [i for i, t in enumerate(pool) if t.family != "format" and task_keys(t.prompt) & eval_keys]
    assert [i for i in contaminated if i < len(pool) and pool[i].family != "format"] == truth
    assert all(task_keys(pool[i].prompt) & eval_keys for i in contaminated if i < len(pool))  # no false drop
    assert all(verdicts[len(pool) + k] for k in range(len(injected)))  # every injected leak dropped
    code_kept = sum(1 for i, t in enumerate(pool) if t.family == "code" and verdicts[i] is None)
    code_all = sum(1 for t in pool if t.family == "code")
    assert code_kept >= code_all - len(truth)  # the template shared with every code prompt costs nothing
    # the old rule (any shared 13-gram) would have dropped most code prompts for their template
    grams = lambda s: {" ".join(w[i:i + 13]) for w in [[t for c in clauses(s) for t in c]]  # noqa: E731
                       for i in range(len(w) - 12)}
    eval_grams = set().union(*(grams(t.prompt) for t in evals))
    old_dropped = sum(1 for t in pool if t.family == "code" and grams(t.prompt) & eval_grams)
    assert old_dropped > code_all // 2, (old_dropped, code_all)


def test_counts_by_group():
    assert counts_by_group(["a", "b", "a"], [None, "exact_duplicate", "contaminated_twin"]) == {
        "a": {"in": 2, "kept": 1, "dropped": {"contaminated_twin": 1}},
        "b": {"in": 1, "kept": 0, "dropped": {"exact_duplicate": 1}}}


def test_dedup_stage(tmp_path):
    src = tmp_path / "p.jsonl"
    rows = [{"prompt": BASE, "family": "x"}, {"prompt": BASE + ".", "family": "x"},
            {"prompt": "What is the capital of France? Tell me.", "family": "y"},
            {"prompt": "Something new entirely, unlike the others.", "family": "y"}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    evals = tmp_path / "eval.jsonl"
    evals.write_text(json.dumps({"prompt": "what is the capital of france"}) + "\n")
    run, summary = run_pipeline(tmp_path, {
        "prompts": {"kind": "read", "path": str(src)},
        "dd": {"kind": "dedup", "eval_file": str(evals), "ngram": 13, "group_field": "family"},
    }, {})
    assert [r["prompt"] for r in read(run, "dd")] == [BASE, rows[3]["prompt"]]
    assert summary["dd"]["dropped"] == {"contaminated_prompt": 1, "exact_duplicate": 1}
    assert json.loads((run / "dd.by_group.json").read_text()) == {
        "x": {"in": 2, "kept": 1, "dropped": {"exact_duplicate": 1}},
        "y": {"in": 2, "kept": 1, "dropped": {"contaminated_prompt": 1}}}
