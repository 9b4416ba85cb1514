"""Task families whose answers a program verifies: the toy world's stand-in for real prompts.

Each family draws prompts at a difficulty `level` (digits of a number, length of a string,
depth of a program) and knows the reference answer and how to check any response. A
verifier is what makes every alignment stage measurable on a CPU: it filters sampled
responses (rejection sampling), picks chosen / rejected pairs, gives RPO its reward gap and
scores held-out accuracy. Families:

    arithmetic   "What is 47 + 8?" (level: 1 = one-digit operands, 2 = two and one digits, ...)
    word_problem templated stories with the same operands (GSM8K-style "The answer is N.")
    strings      repeat / uppercase / reverse / count the letters of a word (levels 1-2: a fixed
                 vocabulary; 3+: random letters)
    lists        sort, max, min of two or three numbers
    format       one of the other families plus an IFEval instruction (lowercase, quotes,
                 end phrase, no commas, title), checked by nemojax.sdg.instructions
    code         "Write a Python function f(x) that ..." checked by running f on test inputs
                 in a sandboxed subprocess (see `run_code_checks`)

Everything is a pure function of a `random.Random`: the same seed gives the same tasks.
"""

from __future__ import annotations

import functools
import json
import random
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

LETTERS = "abcdefghijklmnopqrstuvwxyz"
NAMES = ("Ana", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea")
ITEMS = ("apples", "books", "coins", "stamps", "shells", "cards", "pens", "marbles")
MAX_LEVEL = 6


@dataclass(frozen=True)
class Task:
    """One prompt with its reference answer. `check` holds what the verifier needs."""

    family: str
    level: int
    prompt: str
    answer: str
    check: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(obj: dict[str, Any]) -> "Task":
        return Task(obj["family"], int(obj["level"]), obj["prompt"], obj["answer"], dict(obj.get("check", {})))


# --------------------------------------------------------------------------- answers

_NUMBER = re.compile(r"-?\d[\d,]*")
_ANSWER_IS = re.compile(r"answer is\s*:?\s*(-?\d[\d,]*)", re.IGNORECASE)


def extract_number(text: str) -> int | None:
    """GSM8K-style answer extraction: the number after "answer is", else the last number."""
    m = _ANSWER_IS.search(text)
    raw = m.group(1) if m else (_NUMBER.findall(text) or [None])[-1]
    if raw is None:
        return None
    try:
        return int(raw.replace(",", ""))
    except ValueError:
        return None


def _strip_wrapping(text: str) -> str:
    """The response without surrounding whitespace, quotes, a trailing full stop or a title line."""
    t = text.strip()
    t = re.sub(r"^<<[^>]*>>\s*", "", t)
    if len(t) >= 2 and t[0] == t[-1] == '"':
        t = t[1:-1].strip()
    return t.rstrip(".").strip()


# --------------------------------------------------------------------------- families


# Short words the string tasks draw from at levels 1-2 (a finite vocabulary a small base model can
# learn the spelling of in pretraining); level 3 uses random letters, which only a model that
# learned to copy and transform character by character can handle.
WORDS = ("cat", "dog", "sun", "map", "red", "box", "cup", "pen", "hat", "bus", "jam", "fox", "owl", "ant",
         "bee", "egg", "ice", "kit", "log", "mud", "net", "oak", "pig", "rug", "sky", "toy", "van", "web",
         "yak", "zip", "bird", "book", "cake", "door", "fish", "gold", "hill", "kite", "lamp", "moon", "nest",
         "park", "rain", "ship", "star", "tree", "wind", "wolf", "apple", "bread", "chair", "cloud", "dream",
         "field", "grape", "house", "lemon", "music", "ocean", "plant", "river", "stone", "tiger", "water")


def _digits(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits - 1)


def _operands(rng: random.Random, level: int) -> tuple[int, int]:
    """level 1: one digit each; 2: two digits and one; 3: two digits each; 4+: level-1 digits each."""
    if level == 1:
        return _digits(rng, 1), _digits(rng, 1)
    if level == 2:
        return _digits(rng, 2), _digits(rng, 1)
    if level == 3:
        return _digits(rng, 2), _digits(rng, 2)
    return _digits(rng, level - 1), _digits(rng, level - 1)


def _word(rng: random.Random, level: int) -> str:
    if level == 1:
        return rng.choice([w for w in WORDS if len(w) <= 4])
    if level == 2:
        return rng.choice([w for w in WORDS if len(w) >= 4])
    return "".join(rng.choice(LETTERS) for _ in range(level + 2))


def arithmetic(rng: random.Random, level: int) -> Task:
    op = rng.choice("+-")
    a, b = _operands(rng, level)
    if op == "-" and b > a:
        a, b = b, a
    c = a + b if op == "+" else a - b
    prompt = rng.choice(("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Calculate {a} {op} {b}."))
    return Task("arithmetic", level, prompt.format(a=a, op=op, b=b), f"{a} {op} {b} = {c}. The answer is {c}.",
                {"kind": "number", "value": c})


def word_problem(rng: random.Random, level: int) -> Task:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = _operands(rng, level)
    if rng.random() < 0.5:
        prompt = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
        c, expr = a + b, f"{a} + {b}"
    else:
        a, b = max(a, b), min(a, b)
        prompt = f"{name} has {a} {item} and gives away {b}. How many {item} does {name} have left?"
        c, expr = a - b, f"{a} - {b}"
    return Task("word_problem", level, prompt, f"{name} has {expr} = {c} {item}. The answer is {c}.",
                {"kind": "number", "value": c})


def strings(rng: random.Random, level: int) -> Task:
    s = _word(rng, level)
    kind = rng.choice(("repeat", "upper", "reverse", "length"))
    if kind == "repeat":
        return Task("strings", level, f'Repeat the word "{s}".', s, {"kind": "text", "value": s})
    if kind == "upper":
        return Task("strings", level, f'Write "{s}" in capital letters.', s.upper(),
                    {"kind": "text", "value": s.upper(), "case": True})
    if kind == "reverse":
        return Task("strings", level, f'Reverse the string "{s}".', s[::-1], {"kind": "text", "value": s[::-1]})
    n = len(s)
    return Task("strings", level, f'How many letters are in "{s}"?',
                f'"{s}" has {n} letters. The answer is {n}.', {"kind": "number", "value": n})


def lists(rng: random.Random, level: int) -> Task:
    hi = 9 if level <= 2 else 99
    xs = [rng.randint(0, hi) for _ in range(2 if level == 1 else 3 if level <= 3 else level)]
    shown = ", ".join(map(str, xs))
    kind = rng.choice(("sort", "max", "min"))
    if kind == "sort":
        out = ", ".join(map(str, sorted(xs)))
        return Task("lists", level, f"Sort these numbers from smallest to largest: {shown}.", out,
                    {"kind": "text", "value": out})
    value = {"max": max, "min": min}[kind](xs)
    word = {"max": "largest", "min": "smallest"}[kind]
    return Task("lists", level, f"What is the {word} number of {shown}?",
                f"The {word} number is {value}. The answer is {value}.", {"kind": "number", "value": value})


# IFEval instructions the format family attaches: (instruction id, kwargs sampler, prompt text).
def _end_phrase(rng: random.Random) -> dict[str, Any]:
    return {"end_phrase": rng.choice(("Is there anything else?", "Hope this helps.", "That is all."))}


FORMAT_INSTRUCTIONS: tuple[tuple[str, Callable[[random.Random], dict[str, Any]], str], ...] = (
    ("change_case:english_lowercase", lambda r: {},
     "Your entire response should be in English, and in all lowercase letters. No capital letters are allowed."),
    ("change_case:english_capital", lambda r: {},
     "Your entire response should be in English, and in all capital letters."),
    ("startend:quotation", lambda r: {}, "Wrap your entire response with double quotation marks."),
    ("startend:end_checker", _end_phrase,
     "Finish your response with this exact phrase {end_phrase} No other words should follow this phrase."),
    ("punctuation:no_comma", lambda r: {}, "In your entire response, refrain from the use of any commas."),
    ("detectable_format:title", lambda r: {},
     "Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>."),
)


def _apply_format(answer: str, instruction_id: str, kwargs: dict[str, Any]) -> str:
    """The reference answer rewritten to follow one instruction."""
    if instruction_id == "change_case:english_lowercase":
        return answer.lower()
    if instruction_id == "change_case:english_capital":
        return answer.upper()
    if instruction_id == "startend:quotation":
        return f'"{answer}"'
    if instruction_id == "startend:end_checker":
        return f"{answer} {kwargs['end_phrase']}"
    if instruction_id == "punctuation:no_comma":
        return answer.replace(", ", " ").replace(",", "")
    if instruction_id == "detectable_format:title":
        return f"<<answer>>\n{answer}"
    raise ValueError(f"unknown format instruction {instruction_id!r}")


@functools.lru_cache(maxsize=65536)
def _reference_passes(instruction_id: str, answer: str, kwargs_json: str) -> bool:
    """The instruction's checker on a reference answer, remembered: the same few hundred answers
    come back thousands of times when a world is drawn, and the case checkers run a language
    detector (tens of milliseconds each)."""
    from nemojax.sdg.instructions import check as instruction_check

    return bool(instruction_check(instruction_id, answer, **json.loads(kwargs_json)))


def format_following(rng: random.Random, level: int) -> Task:
    """A base task plus one IFEval instruction. Drawn again until the reference answer passes
    the instruction's own checker (e.g. IFEval's case checks also demand text langdetect reads
    as English, which a bare sorted-letters answer is not), so every reference is correct."""
    for _ in range(100):
        base = rng.choice((arithmetic, strings, lists))(rng, max(1, level - 1))
        iid, sampler, text = rng.choice(FORMAT_INSTRUCTIONS)
        kwargs = sampler(rng)
        answer = _apply_format(base.answer, iid, kwargs)
        if _reference_passes(iid, answer, json.dumps(kwargs, sort_keys=True)):
            break
    else:  # pragma: no cover - the arithmetic base always passes
        raise RuntimeError("could not draw a format task whose reference passes its checker")
    check = dict(base.check, instruction_id=iid, instruction_kwargs=kwargs, base_family=base.family)
    if iid in ("change_case:english_lowercase", "change_case:english_capital"):
        check["case"] = False
    if iid == "startend:end_checker":
        check["suffix"] = kwargs["end_phrase"]
    return Task("format", level, f"{base.prompt} {text.format(**kwargs)}", answer, check)


# Code: f(x) = a composition of `level` primitive operations, on ints or on strings.
_INT_OPS: tuple[tuple[str, str, Callable[[int], str]], ...] = (
    ("adds {k} to it", "x + {k}", lambda k: str(k)),
    ("multiplies it by {k}", "x * {k}", lambda k: str(k)),
    ("subtracts {k} from it", "x - {k}", lambda k: str(k)),
    ("squares it", "x * x", lambda k: ""),
)
_STR_OPS: tuple[tuple[str, str], ...] = (
    ("reverses it", "x[::-1]"),
    ("converts it to upper case", "x.upper()"),
    ("doubles it", "x + x"),
    ("sorts its characters", "''.join(sorted(x))"),
)


def code(rng: random.Random, level: int) -> Task:
    depth = min(level, 3)
    if rng.random() < 0.5:
        words, exprs = [], []
        for _ in range(depth):
            desc, tmpl, _ = rng.choice(_INT_OPS)
            k = rng.randint(2, 9)
            words.append(desc.format(k=k))
            exprs.append(tmpl.format(k=k))
        tests = [rng.randint(-20, 20) for _ in range(4)]
        arg = "an integer x"
    else:
        picked = [rng.choice(_STR_OPS) for _ in range(depth)]
        words, exprs = [d for d, _ in picked], [e for _, e in picked]
        tests = ["".join(rng.choice(LETTERS) for _ in range(rng.randint(1, 5))) for _ in range(4)]
        arg = "a string x"
    body = "x"
    for e in exprs:
        body = e.replace("x", f"({body})") if body != "x" else e
    lines = ["def f(x):"] + [f"    x = {e}" for e in exprs] + ["    return x"]
    prompt = f"Write a Python function f that takes {arg}, " + ", then ".join(words) + ", and returns the result."
    return Task("code", level, prompt, "\n".join(lines), {"kind": "code", "tests": tests, "reference": body})


FAMILIES: dict[str, Callable[[random.Random, int], Task]] = {
    "arithmetic": arithmetic,
    "word_problem": word_problem,
    "strings": strings,
    "lists": lists,
    "format": format_following,
    "code": code,
}


def make_task(family: str, rng: random.Random, level: int) -> Task:
    if family not in FAMILIES:
        raise ValueError(f"unknown task family {family!r}; choose from {sorted(FAMILIES)}")
    if not 1 <= level <= MAX_LEVEL:
        raise ValueError(f"level must be in 1..{MAX_LEVEL}, got {level}")
    return FAMILIES[family](rng, level)


# --------------------------------------------------------------------------- verification


def _check_text(task: Task, response: str) -> bool:
    want = str(task.check["value"])
    got = _strip_wrapping(response)
    if task.check.get("case", True):
        return got == want
    return got.lower() == want.lower()


def _check_format(task: Task, response: str) -> bool:
    from nemojax.sdg.instructions import check as instruction_check

    iid, kwargs = task.check["instruction_id"], task.check.get("instruction_kwargs", {})
    if not instruction_check(iid, response, **kwargs):
        return False
    body = response
    if "suffix" in task.check:
        body = body.strip()
        body = body[: -len(task.check["suffix"])] if body.endswith(task.check["suffix"]) else body
    if task.check.get("kind") == "number":
        return extract_number(body) == task.check["value"]
    want = str(task.check["value"])
    if iid == "punctuation:no_comma":
        want = want.replace(", ", " ").replace(",", "")
    got = _strip_wrapping(body)
    return got.lower() == want.lower() if not task.check.get("case", True) or iid.startswith("change_case") \
        else got == want


def verify(task: Task, response: str) -> bool:
    """Is `response` a correct answer to `task`? (Code tasks: see `verify_many`.)"""
    if task.family == "code":
        return verify_many([task], [response])[0]
    if "instruction_id" in task.check:
        return _check_format(task, response)
    if task.check["kind"] == "number":
        return extract_number(response) == task.check["value"]
    return _check_text(task, response)


def verify_many(tasks: Sequence[Task], responses: Sequence[str], *, timeout_s: float = 20.0) -> list[bool]:
    """Verify many responses at once; all code tasks share one sandboxed subprocess."""
    if len(tasks) != len(responses):
        raise ValueError(f"{len(tasks)} tasks but {len(responses)} responses")
    out = [False] * len(tasks)
    code_idx = [i for i, t in enumerate(tasks) if t.family == "code"]
    for i, (t, r) in enumerate(zip(tasks, responses)):
        if t.family != "code":
            out[i] = verify(t, r)
    if code_idx:
        results = run_code_checks([(responses[i], tasks[i].check["reference"], tasks[i].check["tests"])
                                   for i in code_idx], timeout_s=timeout_s)
        for i, ok in zip(code_idx, results):
            out[i] = ok
    return out


# The sandbox: a fresh interpreter (-I: isolated, no site, no user paths) with CPU-time and
# memory limits, no builtins beyond arithmetic and strings, and an alarm per program.
_SANDBOX = r"""
import json, resource, signal, sys
resource.setrlimit(resource.RLIMIT_AS, (512 * 2**20, 512 * 2**20))
resource.setrlimit(resource.RLIMIT_CPU, (int(sys.argv[1]), int(sys.argv[1]) + 1))
SAFE = {n: __builtins__.__dict__[n] if hasattr(__builtins__, "__dict__") else __builtins__[n]
        for n in ("len", "sorted", "str", "int", "abs", "min", "max", "sum", "range", "list", "reversed")}
def alarm(*_):
    raise TimeoutError
signal.signal(signal.SIGALRM, alarm)
jobs = json.load(sys.stdin)
out = []
for src, ref, tests in jobs:
    ok = False
    try:
        signal.alarm(1)
        env = {"__builtins__": SAFE}
        exec(compile(src, "<response>", "exec"), env)
        want_env = {"__builtins__": SAFE}
        ok = all(env["f"](t) == eval(ref, want_env, {"x": t}) for t in tests)
    except BaseException:
        ok = False
    finally:
        signal.alarm(0)
    out.append(bool(ok))
json.dump(out, sys.stdout)
"""


def run_code_checks(jobs: Sequence[tuple[str, str, list[Any]]], *, timeout_s: float = 20.0) -> list[bool]:
    """For each (source, reference expression in x, test inputs): does the source define an
    `f` that equals the reference on every input? Runs in one isolated subprocess with
    resource limits; a crash or timeout of the whole batch counts every job as failed."""
    if not jobs:
        return []
    try:
        proc = subprocess.run([sys.executable, "-I", "-c", _SANDBOX, str(max(1, int(timeout_s)))],
                              input=json.dumps(list(jobs)), capture_output=True, text=True, timeout=timeout_s)
        results = json.loads(proc.stdout)
    except (subprocess.TimeoutExpired, json.JSONDecodeError):
        return [False] * len(jobs)
    return [bool(r) for r in results] if len(results) == len(jobs) else [False] * len(jobs)


def sample_tasks(families: Iterable[str], levels: Sequence[int], n: int, seed: int) -> list[Task]:
    """`n` tasks cycling over families, levels drawn uniformly from `levels`."""
    rng = random.Random(seed)
    fams = list(families)
    return [make_task(fams[i % len(fams)], rng, rng.choice(list(levels))) for i in range(n)]


def verify_record(item: dict[str, Any], responses: Sequence[str]) -> list[bool]:
    """SDG verifier (`verifier: nemojax.align.tasks:verify_record`): `item` is a serialised
    `Task` (a prompt pool record, plus whatever the pipeline added), `responses` its answers."""
    task = Task.from_json(item)
    return verify_many([task] * len(responses), list(responses))


_WORDS = re.compile(r"[a-z0-9]+")


def worked_solution_matches(task: Task, response: str) -> bool:
    """For a number answer: is the response the reference worked solution word for word (case,
    spacing and punctuation aside)? (Other answers: True; their checks already compare whole
    texts.)

    A final-answer check accepts `"bras has 8 largnswer is 5.` for the letters in "river", and
    a check of the numbers alone still accepts `"skas" has 5 letters. The answer is 5.`; a weak
    generator produces many such right-for-the-wrong-reason answers, and training on them
    teaches the garble (here: miscopied words, which every string task then suffers from).
    Evaluation keeps GSM8K-style final-answer matching (`verify`)."""
    if task.check.get("kind") != "number":
        return True
    return _WORDS.findall(response.lower()) == _WORDS.findall(task.answer.lower())


def verify_record_strict(item: dict[str, Any], responses: Sequence[str]) -> list[bool]:
    """SDG verifier for training data (`verifier: nemojax.align.tasks:verify_record_strict`):
    `verify_record`, and a number answer must be the reference worked solution
    (`worked_solution_matches`), as a judge reading the whole response would demand."""
    task = Task.from_json(item)
    oks = verify_many([task] * len(responses), list(responses))
    return [ok and worked_solution_matches(task, r) for ok, r in zip(oks, responses)]
