"""Leak audit: does any training file hold an evaluation task, in any form?

A held-out score means something only if no training file (pretraining corpus, seed
conversations, SDG prompt pools and outputs, reward and preference records) states an
evaluation prompt or its answer. Exact string matching misses most leaks: the corpus writes
a task as a fact line (`What is the largest number of 3, 5: The largest number is 5. ...`),
another task has the same items in another order (the same answer), a format task wraps an
evaluation task in an instruction. `LeakIndex` checks a record four ways against every
evaluation item (prompt + reference answer), each a separate count:

    prompt   the evaluation prompt inside a text of the record, case / spacing / punctuation
             normalised, clause-aligned (nemojax.sdg.dedup.ClauseMatcher)
    twin     the same with the task's item list in any order ("of 5, 3" for "of 3, 5")
    task     the same toy task by its canonical key (`task_keys`): the family's template read
             into an order-insensitive form of its items, whatever the wording or where it
             appears: a prompt, a fact line, a worked answer ("3 + 4 = 7"), a program
    answer   a question / answer pair (a chat turn, a prompt with a response, a corpus
             "Question: / Answer:" or fact line) whose question has the evaluation prompt's
             items (its numbers and quoted words) and whose answer holds the evaluation answer:
             the task asked in other words

`audit_files` runs it over files and returns counts per file and check, with examples. The
toy world filters every training task through the same index (nemojax.align.toy_world), and
`nemojax align` and benchmarks/reward_model_cpu.py audit every file they train on.
"""

from __future__ import annotations

import collections
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from nemojax.sdg.dedup import ClauseMatcher, clauses

CHECKS = ("prompt", "twin", "task", "answer")


@dataclass(frozen=True)
class EvalItem:
    """One evaluation prompt with its reference answer, and where it came from (file:line)."""

    prompt: str
    answer: str
    where: str = ""


# --------------------------------------------------------------------------- canonical task keys

def _flat(text: str, cl: tuple[tuple[str, ...], ...] | None = None) -> str:
    """Normalised text: clause tokens joined by spaces, clauses by " | " (no commas, no case)."""
    return " | ".join(" ".join(c) for c in (clauses(text) if cl is None else cl))


def _nums(s: str) -> str:
    return ",".join(str(n) for n in sorted(int(x) for x in s.split()))


_CODE_OPS = (
    (re.compile(r"^adds (\d+) to it$"), "x+{}"),
    (re.compile(r"^multiplies it by (\d+)$"), "x*{}"),
    (re.compile(r"^subtracts (\d+) from it$"), "x-{}"),
    (re.compile(r"^squares it$"), "x*x"),
    (re.compile(r"^reverses it$"), "x[::-1]"),
    (re.compile(r"^converts it to upper case$"), "x.upper()"),
    (re.compile(r"^doubles it$"), "x+x"),
    (re.compile(r"^sorts its characters$"), "''.join(sorted(x))"),
)


def _code_op(desc: str) -> str:
    for pat, expr in _CODE_OPS:
        m = pat.match(desc)
        if m:
            return expr.format(*m.groups())
    return "?" + desc  # an operation this parser does not know: still a key, by its words


def _code_prompt(m: re.Match) -> str:
    return "code:" + ";".join(_code_op(d.strip()) for d in m.group(1).split(" then "))


# a sum or difference of two numbers standing alone, not a term of a longer expression ("(x * 7) - 6")
_OPERAND = r"(?<![\w-])(?<![-+*/=x] )"
_END = r"(?! \d)(?! [*/])\b"
_FLAT_RULES: tuple[tuple[re.Pattern, Any], ...] = (
    (re.compile(r"what is the (largest|smallest) number of ((?:\d+ )*\d+)(?! \d)"),
     lambda m: f"lists:{'max' if m.group(1) == 'largest' else 'min'}:{_nums(m.group(2))}"),
    (re.compile(r"sort these numbers from smallest to largest (?:\| )?((?:\d+ )*\d+)(?! \d)"),
     lambda m: f"lists:sort:{_nums(m.group(1))}"),
    (re.compile(r"repeat the word ([a-z]+)\b"), lambda m: f"strings:repeat:{m.group(1)}"),
    (re.compile(r"write ([a-z]+) in capital letters"), lambda m: f"strings:upper:{m.group(1)}"),
    (re.compile(r"reverse the string ([a-z]+)\b"), lambda m: f"strings:reverse:{m.group(1)}"),
    (re.compile(r"how many letters are in ([a-z]+)\b"), lambda m: f"strings:length:{m.group(1)}"),
    (re.compile(_OPERAND + r"(\d+) \+ (\d+)" + _END), lambda m: f"arith:+:{_nums(m.group(1) + ' ' + m.group(2))}"),
    (re.compile(_OPERAND + r"(\d+) - (\d+)" + _END), lambda m: f"arith:-:{m.group(1)},{m.group(2)}"),
    (re.compile(r"has (\d+) [a-z]+ and gets (\d+) more"), lambda m: f"arith:+:{_nums(m.group(1) + ' ' + m.group(2))}"),
    (re.compile(r"has (\d+) [a-z]+ and gives away (\d+)\b"), lambda m: f"arith:-:{m.group(1)},{m.group(2)}"),
    (re.compile(r"write a python function f that takes (?:an integer|a string) x (.+?) and returns the result"),
     _code_prompt),
)
_PROGRAM = re.compile(r"def f\(x\):((?:\n[ \t]+x = [^\n]+)+)\n[ \t]+return x\b")


def task_keys(text: str, cl: tuple[tuple[str, ...], ...] | None = None) -> set[str]:
    """Canonical keys of every toy-world task `text` mentions (nemojax.align.tasks templates):
    the family, the kind and the items in an order-insensitive form where order does not change
    the answer (`lists:max:3,5` for "What is the largest number of 5, 3?" and for "... of 3, 5";
    `arith:+:3,4` for "Compute 4 + 3." and for "3 + 4 = 7"; `code:x+3;x*2` for the prompt and
    for the program). A format task's key is its base task's: the same task with an instruction.
    `cl`: the text's clauses, if at hand."""
    keys: set[str] = set()
    flat = _flat(text, cl)
    for pat, key in _FLAT_RULES:
        keys.update(key(m) for m in pat.finditer(flat))
    for m in _PROGRAM.finditer(text):
        exprs = [line.split("=", 1)[1] for line in m.group(1).strip("\n").split("\n")]
        keys.add("code:" + ";".join("".join(e.split()) for e in exprs))
    return keys


_NUMBER = re.compile(r"\d+")
_QUOTED = re.compile(r'"([^"\n]+)"')


def items(text: str) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """What a question is about, in any order: its numbers and its quoted words."""
    return (tuple(sorted(int(x) for x in _NUMBER.findall(text))),
            tuple(sorted(q.strip().lower() for q in _QUOTED.findall(text))))


# --------------------------------------------------------------------------- records

def record_texts(rec: Any) -> Iterator[str]:
    """Every string in a JSON record, at any depth."""
    if isinstance(rec, str):
        yield rec
    elif isinstance(rec, dict):
        for v in rec.values():
            yield from record_texts(v)
    elif isinstance(rec, list):
        for v in rec:
            yield from record_texts(v)


_QA = re.compile(r"^Question:\s*(.*)\nAnswer:\s*(.*)$", re.MULTILINE)


def record_units(rec: Any) -> Iterator[tuple[str, str]]:
    """The (question, answer) pairs of a record: chat turns, a prompt with its response / chosen /
    rejected / answer, and in plain text the "Question: / Answer:" pairs and `question: answer`
    fact lines."""
    if not isinstance(rec, dict):
        return
    msgs = rec.get("messages")
    if isinstance(msgs, list):
        for a, b in zip(msgs, msgs[1:]):
            if isinstance(a, dict) and isinstance(b, dict) and a.get("role") == "user" and b.get("role") == "assistant":
                yield str(a.get("content", "")), str(b.get("content", ""))
    prompt = rec.get("prompt")
    if isinstance(prompt, list):
        prompt = "\n".join(str(m.get("content", "")) for m in prompt if isinstance(m, dict))
    if isinstance(prompt, str):
        for key in ("response", "chosen", "rejected", "answer"):
            if isinstance(rec.get(key), str):
                yield prompt, rec[key]
    text = rec.get("text")
    if isinstance(text, str):
        for m in _QA.finditer(text):
            yield m.group(1), m.group(2)
        for line in text.split("\n"):
            q, sep, a = line.rpartition(": ")
            if sep and q and not line.startswith(("Question:", "Answer:")):
                yield q, a


# --------------------------------------------------------------------------- the index

class LeakIndex:
    """Every evaluation item, indexed for the four checks (module docstring)."""

    def __init__(self, items_: Sequence[EvalItem]) -> None:
        seen: dict[str, EvalItem] = {}
        for it in items_:  # the same prompt in two evaluation files (tasks and their chat form) once
            seen.setdefault(_flat(it.prompt), it)
        self.items = list(seen.values())
        self._prompts = ClauseMatcher(it.prompt for it in self.items)
        self._answers = ClauseMatcher((it.answer for it in self.items), whole_clauses=True)
        self._keys: dict[str, list[int]] = collections.defaultdict(list)
        self._by_items: dict[tuple, list[int]] = collections.defaultdict(list)
        self._task_cache: dict[tuple[str, str], dict[str, set[int]]] = {}
        for i, it in enumerate(self.items):
            for k in task_keys(it.prompt) | task_keys(it.answer):
                self._keys[k].append(i)
            its = items(it.prompt)
            if any(its):
                self._by_items[its].append(i)

    def check_record(self, rec: Any) -> dict[str, set[int]]:
        """{check: indices of the evaluation items the record leaks} (only checks that hit)."""
        hits: dict[str, set[int]] = collections.defaultdict(set)
        for text in record_texts(rec):
            cl = clauses(text)
            hits["prompt"].update(self._prompts.find(text, cl))
            hits["twin"].update(self._prompts.find_twins(text))
            for k in task_keys(text, cl):
                hits["task"].update(self._keys.get(k, ()))
        for q, a in record_units(rec):
            cands = self._by_items.get(items(q))
            if cands:
                hits["answer"].update(set(cands) & set(self._answers.find(a)))
        hits["twin"] -= hits["prompt"]  # a copy is counted as a copy
        return {k: v for k, v in hits.items() if v}

    def task_leaks(self, prompt: str, answer: str) -> dict[str, set[int]]:
        """What `check_record` finds in a task's own prompt and answer (every form the toy world
        writes a task in reduces to these two texts). Remembered: a world draws the same small
        tasks many times."""
        key = (prompt, answer)
        if key not in self._task_cache:
            self._task_cache[key] = self.check_record({"prompt": prompt, "answer": answer})
        return self._task_cache[key]


# --------------------------------------------------------------------------- files

def _jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None


def eval_items_from_files(paths: Iterable[str | Path]) -> list[EvalItem]:
    """Evaluation items of JSONL files: `Task` records and `{prompt, answer}` (prompt + answer),
    chat records (each user turn + the assistant turn after it), preference records (prompt +
    chosen) and reward records (prompt + response)."""
    out: list[EvalItem] = []
    for p in map(Path, paths):
        for n, rec in _jsonl(p):
            units = list(record_units(rec))
            if not units and isinstance(rec, dict) and isinstance(rec.get("prompt"), str):
                units = [(rec["prompt"], "")]
            out += [EvalItem(q, a, f"{p}:{n}") for q, a in units[:1] if q.strip()]
    return out


def audit_files(index: LeakIndex, paths: Iterable[str | Path], *, examples: int = 10) -> dict[str, Any]:
    """Run the index over every record of every file. Returns {"hits": total, "by_check":
    {check: n}, "eval_items_leaked": distinct evaluation items hit, "files": {path: {"records",
    "hits", "by_check", "eval_items_leaked"}}, "examples": [...]}; a hit is one (record,
    evaluation item, check)."""
    report: dict[str, Any] = {"eval_items": len(index.items), "hits": 0, "by_check": dict.fromkeys(CHECKS, 0),
                              "eval_items_leaked": 0, "files": {}, "examples": []}
    leaked_any: set[int] = set()
    for p in map(Path, paths):
        entry = {"records": 0, "hits": 0, "by_check": dict.fromkeys(CHECKS, 0), "eval_items_leaked": 0}
        leaked: set[int] = set()
        for n, rec in _jsonl(p):
            entry["records"] += 1
            for check, idx in index.check_record(rec).items():
                entry["by_check"][check] += len(idx)
                entry["hits"] += len(idx)
                leaked |= idx
                for i in sorted(idx):
                    if len(report["examples"]) < examples:
                        report["examples"].append({"file": f"{p}:{n}", "check": check,
                                                   "eval_prompt": index.items[i].prompt,
                                                   "eval_from": index.items[i].where})
        entry["eval_items_leaked"] = len(leaked)
        leaked_any |= leaked
        report["files"][str(p)] = entry
        report["hits"] += entry["hits"]
        for c in CHECKS:
            report["by_check"][c] += entry["by_check"][c]
    report["eval_items_leaked"] = len(leaked_any)
    return report
