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
    reward/{train,val}.jsonl    HelpSteer2-style records whose attribute labels are known
    reward/preference_val.jsonl held-out preference pairs (chosen = correct answer)
    prompts/pool_<k>.jsonl      prompt pools for SDG iteration k (disjoint from eval)

Held-out tasks never appear in any training file: every file is filtered by the exact
prompt text of the eval set (`decontaminate`).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from nemojax.align.tasks import FAMILIES, MAX_LEVEL, Task, make_task

ALL_FAMILIES = tuple(FAMILIES)


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
    prompts_per_pool: int = 1500
    pools: int = 2
    reward_records: int = 3000
    vocab_size: int = 384
    extra: dict[str, Any] = field(default_factory=dict)


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
                          banned: set[str] = frozenset()) -> Iterator[str]:
    """`n` documents, each 4-8 items of one family at mixed levels. An item is its fact in plain
    text or, half the time, a plain "Question: ... / Answer: ..." exchange (never in the chat
    template, never with a format instruction, never a held-out prompt in `banned`), the way
    web text gives a base model knowledge and question answering but not the assistant's format."""
    fams, lv = list(families), list(levels)
    for i in range(n):
        fam = fams[i % len(fams)]
        items = []
        for _ in range(rng.randint(4, 8)):
            task = make_task(fam, rng, rng.choice(lv))
            if rng.random() < 0.5 and task.prompt not in banned:
                items.append(f"Question: {task.prompt}\nAnswer: {task.answer}")
            else:
                items.append(_fact_lines(task))
        yield "\n".join(items)


# --------------------------------------------------------------------------- reward data

ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")


def _corrupt(task: Task, rng: random.Random) -> str:
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
    response = task.answer if correct else _corrupt(task, rng)
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
    return {"prompt": task.prompt, "chosen": task.answer, "rejected": _corrupt(task, rng),
            "chosen_reward": 4.0, "rejected_reward": 0.0}


# --------------------------------------------------------------------------- the world


def _tasks(rng: random.Random, n: int, families: list[str], levels: list[int], banned: set[str]) -> list[Task]:
    out: list[Task] = []
    while len(out) < n:
        t = make_task(families[len(out) % len(families)], rng, rng.choice(levels))
        if t.prompt not in banned:
            out.append(t)
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
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("spec") == spec_json:
            return manifest
    unknown = set(spec.families) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown task families {sorted(unknown)}; choose from {sorted(FAMILIES)}")
    if max(spec.eval_levels + spec.train_levels) > MAX_LEVEL:
        raise ValueError(f"levels go up to {MAX_LEVEL}")
    fams = list(spec.families)
    rng = random.Random(spec.seed)
    eval_tasks = _tasks(random.Random(rng.random()), spec.eval_per_family * len(fams), fams,
                        list(spec.eval_levels), set())
    banned = {t.prompt for t in eval_tasks}
    counts: dict[str, int] = {}
    counts["eval/tasks.jsonl"] = _write_jsonl(out / "eval/tasks.jsonl", (t.to_json() for t in eval_tasks))
    counts["eval/sft.jsonl"] = _write_jsonl(out / "eval/sft.jsonl", (chat_record(t) for t in eval_tasks))
    docs = list(pretraining_documents(random.Random(rng.random()), spec.pretrain_documents,
                                      [f for f in fams if f != "format"] or fams, spec.train_levels, banned))
    counts["pretrain/corpus.jsonl"] = _write_jsonl(out / "pretrain/corpus.jsonl", ({"text": d} for d in docs))
    seeds = _tasks(random.Random(rng.random()), spec.seed_conversations, fams, list(spec.train_levels), banned)
    counts["seed/sft.jsonl"] = _write_jsonl(out / "seed/sft.jsonl", (chat_record(t) for t in seeds))
    counts["seed/code_sft.jsonl"] = _write_jsonl(out / "seed/code_sft.jsonl",
                                                (chat_record(t) for t in seeds if t.family == "code"))
    for k in range(1, spec.pools + 1):
        pool = _tasks(random.Random(rng.random()), spec.prompts_per_pool, fams, list(spec.train_levels), banned)
        counts[f"prompts/pool_{k}.jsonl"] = _write_jsonl(out / f"prompts/pool_{k}.jsonl", (t.to_json() for t in pool))
    r_rng = random.Random(rng.random())
    r_tasks = _tasks(r_rng, spec.reward_records, fams, list(spec.train_levels), banned)
    n_val = max(1, spec.reward_records // 10)
    counts["reward/train.jsonl"] = _write_jsonl(out / "reward/train.jsonl",
                                               (reward_record(t, r_rng) for t in r_tasks[n_val:]))
    counts["reward/val.jsonl"] = _write_jsonl(out / "reward/val.jsonl",
                                             (reward_record(t, r_rng) for t in r_tasks[:n_val]))
    counts["reward/preference_val.jsonl"] = _write_jsonl(out / "reward/preference_val.jsonl",
                                                        (preference_record(t, r_rng) for t in eval_tasks))
    tok_text = docs + [json.dumps(chat_record(t)) for t in seeds]
    train_tokenizer(tok_text, out / "tokenizer", vocab_size=spec.vocab_size)
    manifest = {"spec": spec_json, "files": counts, "tokenizer": str(out / "tokenizer/tokenizer.model")}
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return manifest
