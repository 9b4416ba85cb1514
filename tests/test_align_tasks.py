"""The toy world's verifiable tasks and files: verifiers accept the reference answers and reject
wrong ones, the code sandbox contains bad programs, and the world is deterministic and clean."""

import asyncio
import dataclasses
import json
import random

import pytest

from nemojax.align.tasks import (CODE_LIMITS, FAMILIES, FORMAT_INSTRUCTIONS, MAX_LEVEL, Task, code_check_program,
                                 extract_number, make_task, run_code_checks, verify, verify_many, verify_record,
                                 verify_record_strict)
from nemojax.align.toy_world import ToyWorldSpec, build_toy_world, reward_record


def _all_tasks(n_per=12):
    rng = random.Random(7)
    return [make_task(f, rng, lvl) for f in FAMILIES for lvl in range(1, MAX_LEVEL + 1) for _ in range(n_per // 6 + 1)]


def test_reference_answers_verify_and_corruptions_do_not():
    tasks = _all_tasks()
    assert all(verify_many(tasks, [t.answer for t in tasks]))
    wrong = []
    for t in tasks:
        if t.check.get("kind") == "number":
            wrong.append(t.answer.replace(str(t.check["value"]), str(t.check["value"] + 1)))
        elif t.family == "code":
            wrong.append("def f(x):\n    return None")
        else:
            wrong.append(t.answer + "zz")
    assert not any(verify_many(tasks, wrong))


def test_every_format_instruction_is_checked():
    rng = random.Random(3)
    seen = set()
    while len(seen) < len(FORMAT_INSTRUCTIONS):
        t = make_task("format", rng, 2)
        iid = t.check["instruction_id"]
        seen.add(iid)
        assert verify(t, t.answer), (t.prompt, t.answer)
        # the right content without the formatting fails (except where the plain answer already complies)
        plain = t.check.get("value")
        base = make_task(t.check["base_family"], random.Random(0), 1)
        assert base.family == t.check["base_family"]
        if iid in ("startend:quotation", "detectable_format:title", "startend:end_checker"):
            assert not verify(t, str(plain))


def test_strict_verifier_rejects_right_answers_with_wrong_working():
    rng = random.Random(5)
    letters = next(t for t in (make_task("strings", rng, 2) for _ in range(200)) if t.check["kind"] == "number")
    word, n = letters.prompt.split('"')[1], letters.check["value"]
    garbled = f'"bras has {n + 3} largnswer is {n}.'  # a weak generator's right-for-the-wrong-reason answers
    miscopied = f'"{word[::-1]}x" has {n} letters. The answer is {n}.'
    right = letters.answer
    item = letters.to_json()
    assert verify_record(item, [right, garbled, miscopied]) == [True] * 3  # final-answer matching, as evaluation does
    loose = f"  {right.upper().rstrip('.')}  "  # case, spacing and punctuation do not matter
    assert verify_record_strict(item, [right, garbled, miscopied, loose, right + " Done."]) == \
        [True, False, False, True, False]
    # every family's reference passes; text answers keep their exact check
    tasks = _all_tasks()
    assert all(verify_record_strict(t.to_json(), [t.answer])[0] for t in tasks if t.family != "code")
    sort = next(t for t in (make_task("lists", rng, 2) for _ in range(200)) if t.check["kind"] == "text")
    assert verify_record_strict(sort.to_json(), [sort.answer, sort.answer + " 1"]) == [True, False]
    assert word in letters.prompt


def test_extract_number_gsm8k_style():
    assert extract_number("so 3 + 4 = 7. The answer is 7.") == 7
    assert extract_number("The answer is: -12") == -12
    assert extract_number("It is 1,234 apples") == 1234
    assert extract_number("no digits") is None


def test_code_checks_run_in_the_sandbox_and_count_only_asserts_that_ran():
    """Each response runs alone in nemojax.sdg.sandbox with the tests appended as top-level asserts;
    an import is harmless there (the namespaces hold it), what counts is the function's outputs."""
    ref, tests = "x + 1", [1, 2, 3]
    cases = {
        "right": ("def f(x):\n    return x + 1", True),
        "right, with an import": ("import os\ndef f(x):\n    return x + 1", True),
        "a lambda": ("f = lambda x: x + 1", True),
        "wrong on every input": ("def f(x):\n    return x + 2", False),
        "right on two inputs only": ("def f(x):\n    return x + 1 if x < 3 else 0", False),
        "not python": ("this is not python", False),
        "no f": ("def g(x):\n    return x + 1", False),
        "a float, not the int": ("def f(x):\n    return x + 1.0", False),
        "an object equal to everything": ("class A:\n    def __eq__(s, o):\n        return True\n"
                                          "def f(x):\n    return A()", False),
        "exits before the asserts": ("import os\ndef f(x):\n    return x + 1\nos._exit(0)", False),
        "reads a host file": ("def f(x):\n    return open('/etc/hostname').read()", False),
        "loops forever": ("def f(x):\n    while True:\n        pass", False),
    }
    jobs = [(src, ref, tests) for src, _ in cases.values()]
    got = run_code_checks(jobs, limits=dataclasses.replace(CODE_LIMITS, timeout_s=2.0))
    assert dict(zip(cases, got)) == {k: want for k, (_, want) in cases.items()}
    # the program the sandbox runs: the expected values computed outside it, one assert per input
    program = code_check_program("def f(x):\n    return x", "''.join(sorted(x))", ["ba", "c"])
    assert program.count("\nassert type(_got) is str and _got == ") == 2 and "'ab'" in program


def test_code_checks_inside_a_running_event_loop():
    """The evaluation suite verifies from inside its event loop."""
    async def check():
        return verify_many([Task("code", 1, "p", "", {"kind": "code", "tests": [1, 2], "reference": "x * 2"})] * 2,
                           ["def f(x):\n    return 2 * x", "def f(x):\n    return x + 2"])

    assert asyncio.run(check()) == [True, False]


def test_task_round_trip_and_bad_inputs():
    t = make_task("lists", random.Random(1), 3)
    assert Task.from_json(json.loads(json.dumps(t.to_json()))) == t
    with pytest.raises(ValueError, match="unknown task family"):
        make_task("poetry", random.Random(0), 1)
    with pytest.raises(ValueError, match="level"):
        make_task("strings", random.Random(0), MAX_LEVEL + 1)


def test_reward_labels_are_a_function_of_the_response():
    rng = random.Random(5)
    for _ in range(200):
        task = make_task(random.Random(rng.random()).choice(list(FAMILIES)), rng, rng.randint(1, 4))
        rec = reward_record(task, rng)
        assert all(0 <= rec[a] <= 4 for a in ("helpfulness", "correctness", "coherence", "complexity", "verbosity"))
        if rec["coherence"] == 4 and task.family != "code":  # no filler appended: the verifier decides
            assert (rec["correctness"] == 4) == verify(task, rec["response"])


def test_toy_world_is_deterministic_and_decontaminated(tmp_path):
    spec = ToyWorldSpec(pretrain_documents=300, seed_conversations=60, eval_per_family=10, prompts_per_pool=80,
                        reward_records=100)
    a = build_toy_world(tmp_path / "a", spec)
    b = build_toy_world(tmp_path / "b", spec)
    for name in a["files"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    eval_prompts = {json.loads(l)["prompt"] for l in (tmp_path / "a/eval/tasks.jsonl").read_text().splitlines()}
    for name in ("seed/sft.jsonl", "prompts/pool_1.jsonl", "prompts/pool_2.jsonl", "reward/train.jsonl"):
        for line in (tmp_path / "a" / name).read_text().splitlines():
            rec = json.loads(line)
            prompt = rec.get("prompt") or rec["messages"][0]["content"]
            assert prompt not in eval_prompts, (name, prompt)
    assert (tmp_path / "a/tokenizer/tokenizer.model").is_file()
    # a second build with the same spec is a no-op; another spec rebuilds
    assert build_toy_world(tmp_path / "a", spec) == a
    # a third pool (a third iteration) is drawn last: every other file is the two-pool world's, so
    # runs of configs/align/judge.yaml share stats.yaml's world and bases
    three = build_toy_world(tmp_path / "c", dataclasses.replace(spec, pools=3))
    assert set(three["files"]) == set(a["files"]) | {"prompts/pool_3.jsonl"}
    for name in a["files"]:
        assert (tmp_path / "c" / name).read_bytes() == (tmp_path / "a" / name).read_bytes(), name
    assert (tmp_path / "c/prompts/pool_3.jsonl").read_bytes() != (tmp_path / "a/prompts/pool_2.jsonl").read_bytes()


def test_code_checks_from_many_threads_share_one_event_loop():
    """The SDG verifies items on several threads at once: all their programs run on one loop (one
    program per CPU process-wide; no per-call loop torn down with programs in flight, which hung)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    def check(k: int) -> list[bool]:
        return run_code_checks([(f"def f(x):\n    return x * {k}", f"x * {k}", [1, 2]),
                                (f"def f(x):\n    return x + {k}", f"x * {k}", [1, 2])])

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(check, range(3, 9)))
    assert results == [[True, False]] * 6
    assert [t.name for t in threading.enumerate()].count("nemojax-code-checks") == 1
