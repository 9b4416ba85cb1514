"""The leak audit (nemojax.align.leaks) and the leak-free toy world: a fresh world has 0 hits in
every training file and distinct evaluation tasks; the same world written without the filter,
and one leaked line of each form injected into a clean file, are caught, each by its check."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from nemojax.align import toy_world
from nemojax.align.leaks import EvalItem, LeakIndex, audit_files, eval_items_from_files, task_keys
from nemojax.align.tasks import FAMILIES, Task, make_task
from nemojax.align.toy_world import ToyWorldSpec, build_toy_world, task_signature

SPEC = ToyWorldSpec(seed=3, families=("strings", "lists", "code", "format"), train_levels=(1, 2), eval_levels=(1, 2),
                    pretrain_documents=400, seed_conversations=120, eval_per_family=20, prompts_per_pool=120,
                    pools=1, reward_records=200)
TRAINING = ("pretrain/corpus.jsonl", "seed/sft.jsonl", "seed/code_sft.jsonl", "prompts/pool_1.jsonl",
            "reward/train.jsonl")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("leaks") / "world"
    build_toy_world(out, SPEC)
    return out


def _tasks(world: Path) -> list[Task]:
    return [Task.from_json(json.loads(x)) for x in (world / "eval/tasks.jsonl").read_text().splitlines()]


def test_task_keys_are_canonical():
    same = [("What is the largest number of 3, 5?", "What is the LARGEST number of 5 ,3 ?"),
            ("Sort these numbers from smallest to largest: 7, 1, 4.", "Sort these numbers from smallest to largest: 4, 7, 1"),
            ("What is 3 + 4?", "Compute 4 + 3."), ("What is 3 + 4?", "3 + 4 = 7. The answer is 7."),
            ("Ana has 9 pens and gives away 2. How many pens does Ana have left?", "Calculate 9 - 2."),
            ("Write a Python function f that takes an integer x, adds 3 to it, then squares it, and returns the result.",
             "def f(x):\n    x = x + 3\n    x = x * x\n    return x"),
            ('What is the smallest number of 2, 8? Wrap your entire response with double quotation marks.',
             "What is the smallest number of 8, 2?")]
    for a, b in same:
        assert task_keys(a) and task_keys(a) == task_keys(b), (a, b)
    different = [("What is the largest number of 3, 5?", "What is the largest number of 3, 5, 7?"),
                 ("What is the largest number of 3, 5?", "What is the smallest number of 3, 5?"),
                 ("What is 9 - 2?", "What is 2 - 9?"),
                 ("Write a Python function f that takes an integer x, adds 3 to it, then squares it, and returns the "
                  "result.", "Write a Python function f that takes an integer x, squares it, then adds 3 to it, and "
                  "returns the result."),
                 ('Reverse the string "tac".', 'Repeat the word "cat".'),
                 ("Write a Python function f that takes an integer x, multiplies it by 7, then subtracts 6 from it, and "
                  "returns the result.", "What is 7 - 6?")]
    for a, b in different:
        assert task_keys(a) != task_keys(b), (a, b)
    # a code task's reference expression is not a sum or difference of two numbers
    assert task_keys("(x * 7) - 6") == task_keys("(x - 4) + 6") == set()
    rng = random.Random(0)  # every family's template is read: a task always has a key
    for fam in FAMILIES:
        for level in (1, 2, 3):
            for _ in range(30):
                t = make_task(fam, rng, level)
                assert task_keys(t.prompt), t.prompt


def test_fresh_world_is_leak_free_and_its_evaluation_distinct(world):
    tasks = _tasks(world)
    assert len(tasks) == 80
    keys = [frozenset(task_signature(t)) for t in tasks]
    assert all(keys) and sum(len(k) for k in keys) == len(set().union(*keys))  # no two share a key
    report = audit_files(LeakIndex(eval_items_from_files([world / "eval/tasks.jsonl", world / "eval/sft.jsonl"])),
                         [world / f for f in TRAINING])
    assert report["eval_items"] == 80
    assert report["hits"] == 0, report["examples"]
    assert all(f["records"] > 0 for f in report["files"].values())
    # sanity of the instrument: the evaluation-side files, audited as if trained on, hit every item
    evals = audit_files(LeakIndex(eval_items_from_files([world / "eval/tasks.jsonl"])),
                        [world / "reward/val.jsonl", world / "reward/preference_val.jsonl"])
    assert evals["eval_items_leaked"] == 80


def test_the_same_world_without_the_filter_leaks(tmp_path, monkeypatch, world):
    """The world as it was written before: the filter off (every task allowed), as the old
    exact-prompt ban of the Q/A form alone amounted to for fact lines and twins."""
    monkeypatch.setattr(toy_world.LeakIndex, "task_leaks", lambda self, p, a: {})
    monkeypatch.setattr(toy_world.LeakIndex, "check_record", lambda self, r: {})
    leaky = tmp_path / "leaky"
    build_toy_world(leaky, SPEC)
    monkeypatch.undo()
    assert (leaky / "eval/tasks.jsonl").read_text() == (world / "eval/tasks.jsonl").read_text()
    report = audit_files(LeakIndex(eval_items_from_files([leaky / "eval/tasks.jsonl"])),
                         [leaky / f for f in TRAINING])
    corpus = report["files"][str(leaky / "pretrain/corpus.jsonl")]
    assert corpus["eval_items_leaked"] > 40 and corpus["by_check"]["task"] > 0 and corpus["by_check"]["answer"] > 0


def _leaked_lines(tasks: list[Task]) -> dict[str, tuple[str, dict, str]]:
    """One leaked record per form: (file it goes in, the record, the check that must catch it)."""
    lst = next(t for t in tasks if t.family == "lists" and t.check["kind"] == "number"
               and len(set(t.prompt.split(" of ")[1].rstrip("?").split(", "))) > 1)
    nums = lst.prompt.split(" of ")[1].rstrip("?").split(", ")
    twin = lst.prompt.replace(", ".join(nums), ", ".join(reversed(nums)))
    word = next(t for t in tasks if t.family == "strings")
    code = next(t for t in tasks if t.family == "code")
    fmt = next(t for t in tasks if t.family == "format")
    base = fmt.prompt.split("? ")[0] + "?" if "? " in fmt.prompt else fmt.prompt.split(". ")[0] + "."
    return {
        "fact line": ("pretrain/corpus.jsonl", {"text": f"{lst.prompt.rstrip('?')}: {lst.answer}"}, "prompt"),
        "Q/A, case and punctuation changed": ("pretrain/corpus.jsonl", {
            "text": f"Question: {word.prompt.upper().replace('.', ' !')}\nAnswer: {word.answer}"}, "prompt"),
        "reordered twin": ("seed/sft.jsonl", {"messages": [{"role": "user", "content": twin},
                                                           {"role": "assistant", "content": lst.answer}]}, "twin"),
        "program alone": ("pretrain/corpus.jsonl", {"text": code.answer + "\n# f(1) == 0"}, "task"),
        "format base under another instruction": ("reward/train.jsonl", {
            "prompt": base + " In your entire response, refrain from the use of any commas.", "response": "x",
            "correctness": 0}, "task"),
        "asked in other words": ("prompts/pool_1.jsonl", {
            "prompt": "Tell me: " + " and ".join(reversed(nums)) + ", which one is " +
            ("biggest" if "largest" in lst.prompt else "least") + "?", "answer": lst.answer}, "answer"),
    }


def test_each_leak_form_is_caught(world, tmp_path):
    tasks = _tasks(world)
    index = LeakIndex([EvalItem(t.prompt, t.answer) for t in tasks])
    for name, (file, record, check) in _leaked_lines(tasks).items():
        dst = tmp_path / name.replace(" ", "_") / file
        dst.parent.mkdir(parents=True)
        shutil.copy(world / file, dst)
        with dst.open("a") as f:
            f.write(json.dumps(record) + "\n")
        report = audit_files(index, [dst])
        assert report["eval_items_leaked"] == 1 and report["by_check"][check] >= 1, (name, report)
        assert report["examples"][0]["file"].endswith(f":{report['files'][str(dst)]['records']}")


def test_near_misses_are_not_leaks(world):
    tasks = _tasks(world)
    index = LeakIndex([EvalItem(t.prompt, t.answer) for t in tasks])
    lst = next(t for t in tasks if t.family == "lists" and t.check["kind"] == "number")
    nums = lst.prompt.split(" of ")[1].rstrip("?")
    for text in (f"{lst.prompt.rstrip('?')}, 0: {lst.answer}",  # another list, the same answer
                 f"Question: What is the {'smallest' if 'largest' in lst.prompt else 'largest'} number of {nums}?",
                 f"Sort these numbers from smallest to largest: {nums}, {nums}."):
        assert index.check_record({"text": text}) == {}, text
