"""A toy world in which every alignment stage's effect is measurable on a 2-core CPU.

The real system aligns a 340B model on data a weaker aligned model generated. Here the
"world" is a handful of task families with exact verifiers (nemojax.align.tasks), and the
files it writes stand in for what a real run starts from:

    tokenizer/tokenizer.model   a small SentencePiece model (digits split, chat symbols)
    pretrain/corpus.jsonl       base-model pretraining text: the families' facts as plain text
                                (equations, string facts, small programs) and plain Q/A
                                exchanges, never in the chat template and never with format
                                instructions, so alignment has something to teach
    seed/sft.jsonl              the "human-written" seed conversations (the paper's ~20k
                                human annotations, in miniature)
    seed/code_sft.jsonl         the code family's part of it (the code SFT stage's seed data)
    eval/tasks.jsonl            held-out tasks (serialised `Task`s), never used for training
    eval/sft.jsonl              the same tasks' reference conversations (held-out loss)
    reward/train.jsonl          HelpSteer2-style records whose attribute labels are known
    reward/val.jsonl            the same for the held-out tasks (one response each)
    reward/preference_val.jsonl held-out preference pairs (chosen = correct answer)
    prompts/pool_<k>.jsonl      prompt pools for SDG iteration k (disjoint from eval)

Held out means held out in every form. The evaluation tasks are distinct: no two share a
canonical key (nemojax.align.leaks.task_keys: the same task with its items in another order,
or wrapped in a format instruction, is the same task). They are drawn only from a reserved
share (`eval_share`) of each family's keys, chosen by a hash of the key, so evaluation never
uses up a small family (two-digit lists, one-operation programs) and training keeps most of
it. Every training task, and every training record as written (a reward record's wrong
answer may be another task's answer), is checked against the evaluation tasks with the leak
audit's index (`LeakIndex`: normalised prompt, reordered twin, canonical key, the answer
asked in other words) and redrawn when it leaks; `nemojax align` audits the files again.
"""

from __future__ import annotations

import collections
import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from nemojax.align.leaks import EvalItem, LeakIndex, task_keys
from nemojax.align.tasks import FAMILIES, MAX_LEVEL, Task, make_task

ALL_FAMILIES = tuple(FAMILIES)
# Bumped when the same spec writes a different world (2: evaluation tasks distinct, held out in every form)
WORLD_VERSION = 2


@dataclass
class ToyWorldSpec:
    """How big the toy world is. Defaults make a 20-minute CPU demonstration."""

    seed: int = 0
    families: tuple[str, ...] = ALL_FAMILIES
    train_levels: tuple[int, ...] = (1, 2, 3)  # levels of pretraining facts and prompts
    eval_levels: tuple[int, ...] = (1, 2, 3)
    pretrain_documents: int = 12000  # each a few related facts
    seed_conversations: int = 400
    eval_per_family: int = 60
    eval_counts: dict[str, int] = field(default_factory=dict)  # per-family overrides of eval_per_family
    eval_share: float = 0.4  # share of each family's canonical task keys reserved for evaluation
    prompts_per_pool: int = 1500
    pools: int = 2
    reward_records: int = 3000
    vocab_size: int = 384
    extra: dict[str, Any] = field(default_factory=dict)


# Pools drawn before the reward records (the original two); later pools are drawn after everything
# else, so adding one changes no other file of the world (nemojax.align.loop's world fingerprint).
EARLY_POOLS = 2


def chat_record(task: Task, response: str | None = None) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": task.prompt},
                         {"role": "assistant", "content": task.answer if response is None else response}]}


# --------------------------------------------------------------------------- pretraining text


def _fact_lines(task: Task) -> str:
    """A task's knowledge as plain text (no question, no chat): what a base model reads."""
    if task.family == "code":
        tests = task.check["tests"]
        return task.answer + "\n" + "\n".join(
            f"# f({t!r}) == {eval(task.check['reference'], {'__builtins__': {'sorted': sorted}}, {'x': t})!r}"
            for t in tests[:2])
    if task.family in ("arithmetic", "word_problem"):  # the answer states its own question
        return task.answer
    return f"{task.prompt.rstrip('.?')}: {task.answer}"


def pretraining_documents(rng: random.Random, n: int, families: Iterable[str], levels: Iterable[int],
                          leaks: Callable[[Task], bool] = lambda t: False) -> Iterator[str]:
    """`n` documents, each 4-8 items of one family at mixed levels. An item is its fact in plain
    text or, half the time, a plain "Question: ... / Answer: ..." exchange (never in the chat
    template, never with a format instruction), the way web text gives a base model knowledge
    and question answering but not the assistant's format. A task for which `leaks(task)` holds
    (a held-out task in any form) is drawn again: it is written in no form at all."""
    fams, lv = list(families), list(levels)
    for i in range(n):
        fam = fams[i % len(fams)]
        items = []
        for _ in range(rng.randint(4, 8)):
            task = _draw(lambda: make_task(fam, rng, rng.choice(lv)), leaks, f"a {fam} pretraining fact")
            if rng.random() < 0.5:
                items.append(f"Question: {task.prompt}\nAnswer: {task.answer}")
            else:
                items.append(_fact_lines(task))
        yield "\n".join(items)


# --------------------------------------------------------------------------- reward data

ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")


def wrong_answer(task: Task, rng: random.Random) -> str:
    """A wrong answer, of one of the kinds a judge meets (equally likely):

    * off-topic: the right answer to another question of the same family and level;
    * careless: number answers keep the worked solution but state another final number;
      reverse / upper / sort tasks return their input untransformed (the instruction ignored);
    * incomplete: the answer stops before its result (a weak generator running out);
    * miscomputed: a changed number, or scrambled text (the error only computing catches).

    The result is always wrong by the family's verifier (code: on the task's test inputs).
    """
    from nemojax.align.tasks import make_task, verify

    def wrong(text: str) -> bool:
        if task.family != "code":
            return not verify(task, text)
        env: dict[str, Any] = {"__builtins__": {"sorted": sorted}}
        exec(text, env)  # our own generated source, never a model's (verify_many sandboxes those)
        want = [eval(task.check["reference"], {"__builtins__": {"sorted": sorted}}, {"x": t})
                for t in task.check["tests"]]
        try:
            return [env["f"](t) for t in task.check["tests"]] != want
        except (TypeError, ValueError, AttributeError):  # e.g. a function of strings given integers
            return True

    kind = rng.choice(("off_topic", "careless", "incomplete", "miscomputed"))
    if kind == "off_topic":
        for _ in range(4):
            other = make_task(task.family, rng, task.level).answer
            if wrong(other):
                return other
    if kind in ("careless", "incomplete"):
        out = _careless(task, rng) if kind == "careless" else _incomplete(task)
        if out is not None and wrong(out):
            return out
    return _miscomputed(task, rng)


def _incomplete(task: Task) -> str | None:
    """The answer cut before its result: before the first statement of the value, the code before
    its `return`, or the first half of a text answer."""
    value = task.check.get("value")
    if task.check.get("kind") == "number":
        head, sep, _ = task.answer.partition(str(value))
        return head.rstrip() if sep and head.strip() else None
    if task.family == "code":
        return task.answer.rsplit("\n", 1)[0]
    return task.answer[:len(task.answer) // 2] or None


def _careless(task: Task, rng: random.Random) -> str | None:
    """The final number changed after a correct worked solution, or the input echoed back."""
    value = task.check.get("value")
    if task.check.get("kind") == "number":
        head, sep, tail = task.answer.rpartition(str(value))
        return head + str(value + rng.choice((-10, -2, -1, 1, 2, 10))) + tail if sep else None
    if task.family == "strings":
        m = re.search(r'"([a-z]+)"', task.prompt)
        return m.group(1) if m else None
    if task.family == "lists":
        m = re.search(r": ([\d, ]+)\.$", task.prompt)
        return m.group(1) if m else None
    return None


def _miscomputed(task: Task, rng: random.Random) -> str:
    """A plausible wrong answer: a changed number, or a scrambled / truncated text."""
    value = task.check.get("value")
    if task.check.get("kind") == "number":
        wrong = value + rng.choice((-10, -2, -1, 1, 2, 10))
        return task.answer.replace(str(value), str(wrong))
    if task.family == "code":
        return task.answer.replace("+", "-", 1) if "+" in task.answer else task.answer.replace("return x", "return x + x")
    s = list(task.answer)
    rng.shuffle(s)
    out = "".join(s)
    return out if out != task.answer else task.answer[:-1]


def reward_record(task: Task, rng: random.Random, correct: bool | None = None) -> dict[str, Any]:
    """One response of known quality with HelpSteer2's five 0-4 labels (`correct`: force a right
    or a wrong response, e.g. to give a prompt one of each as HelpSteer2 gives it several; None:
    either, equally likely).

    correctness: 4 if verified right else 0; helpfulness: 4 / 3 when correct (to the point /
    rambling), 1 / 0 when wrong;
    coherence: 4 unless the response is rambling filler; complexity: the task level;
    verbosity: length of the response in characters, bucketed.
    """
    if correct is None:
        correct = rng.random() < 0.5
    response = task.answer if correct else wrong_answer(task, rng)
    rambling = rng.random() < 0.25
    if rambling:
        response = response + " " + " ".join(rng.choice(("um", "well", "so", "anyway", "hmm")) for _ in range(rng.randint(3, 12)))
    verbosity = min(4, len(response) // 25)
    return {"prompt": task.prompt, "response": response,
            "helpfulness": (4 if correct else 1) - (1 if rambling else 0),
            "correctness": 4 if correct else 0,
            "coherence": 1 if rambling else 4,
            "complexity": min(4, task.level),
            "verbosity": verbosity}


def preference_record(task: Task, rng: random.Random) -> dict[str, Any]:
    return {"prompt": task.prompt, "chosen": task.answer, "rejected": wrong_answer(task, rng),
            "chosen_reward": 4.0, "rejected_reward": 0.0}


# --------------------------------------------------------------------------- the world

MAX_DRAWS = 10_000  # consecutive rejected draws before a family / level counts as used up


def _draw(make: Callable[[], Any], leaks: Callable[[Any], bool], what: str) -> Any:
    """`make()` until the result does not leak an evaluation task."""
    for _ in range(MAX_DRAWS):
        x = make()
        if not leaks(x):
            return x
    raise ValueError(f"could not draw {what} that leaks no evaluation task in {MAX_DRAWS} tries: the "
                     f"evaluation set covers too much of the family; lower eval_per_family or eval_share")


def _tasks(rng: random.Random, n: int, families: list[str], levels: list[int],
           leaks: Callable[[Task], bool] = lambda t: False) -> list[Task]:
    return [_draw(lambda: make_task(families[i % len(families)], rng, rng.choice(levels)), leaks,
                  f"a {families[i % len(families)]} task") for i in range(n)]


def task_signature(task: Task) -> set[str]:
    """The canonical keys of a task (its prompt's and its answer's; a format task's are its base
    task's), or its normalised prompt when no template is recognised."""
    from nemojax.sdg.dedup import clauses

    return (task_keys(task.prompt) | task_keys(task.answer)) or {
        "prompt:" + " | ".join(" ".join(c) for c in clauses(task.prompt, items_sorted=True))}


def _reserved(key: str, seed: int, share: float) -> bool:
    """Is `key` in the evaluation's share of the task space? (a hash, so the same for every draw)"""
    h = int.from_bytes(hashlib.sha256(f"{seed}/{key}".encode()).digest()[:8], "big")
    return h < share * 2 ** 64


def evaluation_tasks(rng: random.Random, counts: dict[str, int], levels: list[int], *, share: float,
                     seed: int) -> list[Task]:
    """`counts[family]` distinct evaluation tasks per family, families interleaved, levels drawn
    uniformly among those not used up. Distinct: no two share a key (`task_signature`); every key
    is in the reserved share. A level of a family that gives MAX_DRAWS rejections in a row is used
    up (its reserved keys taken) and the family's remaining tasks come from its other levels."""
    order = [f for k in range(max(counts.values(), default=0)) for f in counts if k < counts[f]]
    avail = {f: list(levels) for f in counts}
    misses: collections.Counter[tuple[str, int]] = collections.Counter()
    used: set[str] = set()
    out: list[Task] = []
    for fam in order:
        while True:
            if not avail[fam]:
                raise ValueError(f"the toy world cannot hold {counts[fam]} distinct evaluation tasks of {fam!r} at "
                                 f"levels {levels} with eval_share {share}: lower eval_per_family / eval_counts, "
                                 f"raise eval_share or add levels")
            level = rng.choice(avail[fam])
            task = make_task(fam, rng, level)
            keys = task_signature(task)
            if keys & used or not all(_reserved(k, seed, share) for k in keys):
                misses[fam, level] += 1
                if misses[fam, level] >= MAX_DRAWS:
                    avail[fam].remove(level)
                continue
            misses[fam, level] = 0
            used |= keys
            out.append(task)
            break
    return out


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    n = 0
    with tmp.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
            n += 1
    tmp.replace(path)
    return n


def build_toy_world(out_dir: str | Path, spec: ToyWorldSpec | None = None) -> dict[str, Any]:
    """Write the toy world's files (see the module docstring) and return a manifest.

    Idempotent: an existing, complete world with the same spec is left alone.
    """
    from nemojax.data.tokenizer import train_tokenizer

    spec = spec or ToyWorldSpec()
    out = Path(out_dir)
    manifest_path = out / "manifest.json"
    spec_json = {k: list(v) if isinstance(v, tuple) else v for k, v in spec.__dict__.items()}
    spec_json["world_version"] = WORLD_VERSION
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("spec") == spec_json:
            return manifest
    unknown = set(spec.families) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown task families {sorted(unknown)}; choose from {sorted(FAMILIES)}")
    if max(spec.eval_levels + spec.train_levels) > MAX_LEVEL:
        raise ValueError(f"levels go up to {MAX_LEVEL}")
    if not 0.0 < spec.eval_share < 1.0:
        raise ValueError(f"eval_share must be in (0, 1), got {spec.eval_share}")
    fams = list(spec.families)
    unknown_counts = set(spec.eval_counts) - set(fams)
    if unknown_counts:
        raise ValueError(f"eval_counts names families not in the world: {sorted(unknown_counts)}")
    rng = random.Random(spec.seed)
    counts = {f: int(spec.eval_counts.get(f, spec.eval_per_family)) for f in fams}
    eval_tasks = evaluation_tasks(random.Random(rng.random()), counts, list(spec.eval_levels),
                                  share=spec.eval_share, seed=spec.seed)
    index = LeakIndex([EvalItem(t.prompt, t.answer, f"eval/tasks.jsonl:{i + 1}") for i, t in enumerate(eval_tasks)])
    leaks_task = lambda t: bool(index.task_leaks(t.prompt, t.answer))  # noqa: E731
    leaks_record = lambda r: bool(index.check_record(r))  # noqa: E731
    counts_out: dict[str, int] = {}
    counts_out["eval/tasks.jsonl"] = _write_jsonl(out / "eval/tasks.jsonl", (t.to_json() for t in eval_tasks))
    counts_out["eval/sft.jsonl"] = _write_jsonl(out / "eval/sft.jsonl", (chat_record(t) for t in eval_tasks))
    docs = list(pretraining_documents(random.Random(rng.random()), spec.pretrain_documents,
                                      [f for f in fams if f != "format"] or fams, spec.train_levels, leaks_task))
    counts_out["pretrain/corpus.jsonl"] = _write_jsonl(out / "pretrain/corpus.jsonl", ({"text": d} for d in docs))
    seeds = _tasks(random.Random(rng.random()), spec.seed_conversations, fams, list(spec.train_levels), leaks_task)
    counts_out["seed/sft.jsonl"] = _write_jsonl(out / "seed/sft.jsonl", (chat_record(t) for t in seeds))
    counts_out["seed/code_sft.jsonl"] = _write_jsonl(out / "seed/code_sft.jsonl",
                                                    (chat_record(t) for t in seeds if t.family == "code"))
    def write_pool(k: int) -> None:
        pool = _tasks(random.Random(rng.random()), spec.prompts_per_pool, fams, list(spec.train_levels), leaks_task)
        counts_out[f"prompts/pool_{k}.jsonl"] = _write_jsonl(out / f"prompts/pool_{k}.jsonl", (t.to_json() for t in pool))

    for k in range(1, min(spec.pools, EARLY_POOLS) + 1):
        write_pool(k)
    r_rng = random.Random(rng.random())
    r_tasks = _tasks(r_rng, spec.reward_records, fams, list(spec.train_levels), leaks_task)
    counts_out["reward/train.jsonl"] = _write_jsonl(out / "reward/train.jsonl", (
        _draw(lambda: reward_record(t, r_rng), leaks_record, "a reward record") for t in r_tasks))
    counts_out["reward/val.jsonl"] = _write_jsonl(out / "reward/val.jsonl", (reward_record(t, r_rng) for t in eval_tasks))
    counts_out["reward/preference_val.jsonl"] = _write_jsonl(out / "reward/preference_val.jsonl",
                                                            (preference_record(t, r_rng) for t in eval_tasks))
    # pools after the second are drawn last: a world with more pools is the two-pool world of the
    # same seed (every other file identical) plus those pools, so a run can add an iteration
    for k in range(EARLY_POOLS + 1, spec.pools + 1):
        write_pool(k)
    tok_text = docs + [json.dumps(chat_record(t)) for t in seeds]
    train_tokenizer(tok_text, out / "tokenizer", vocab_size=spec.vocab_size)
    manifest = {"spec": spec_json, "files": counts_out, "tokenizer": str(out / "tokenizer/tokenizer.model"),
                "eval_levels_drawn": dict(sorted(collections.Counter(f"{t.family}/{t.level}" for t in eval_tasks).items()))}
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return manifest
