"""Evaluation suites: what `nemojax eval` measures, each a function returning a `SuiteResult`.

Generation suites talk to any `nemojax.sdg.llm.LLM` (the in-process engine or an
OpenAI-compatible endpoint) with greedy decoding, so a checkpoint and a served model are
measured the same way:

    tasks        the toy world's verifiable tasks (nemojax.align.tasks): accuracy overall,
                 per family and per level; headline = overall accuracy
    answers      GSM8K-style: the number extracted from the response ("answer is N", else the
                 last number) equals the reference; headline = accuracy
    ifeval       IFEval records: prompt- and instruction-level accuracy, strict and loose
                 (nemojax.sdg.instructions); headline = prompt-level strict
    reward       mean reward-model score of the responses (needs a reward client)
    rewardbench  a reward model's pairwise accuracy (chosen scored above rejected) on
                 RewardBench-format records, per subset; headline = mean over subsets
    loss         held-out assistant-token loss (nats/token) of a checkpoint, in-process

Every input file is JSONL; a malformed line raises `EvalDataError` naming file and line. A
request the model (or reward model) could not answer after its client's retries is a failure,
not a wrong answer: it scores as wrong, and `metrics["failed"]` / `SuiteResult.failed` count it
with the first errors, so a caller can refuse to record an incomplete evaluation.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

from nemojax.align.tasks import Task, extract_number, verify_many


class EvalDataError(ValueError):
    """An evaluation file a user must fix; the message names the file and line."""


@dataclass
class SuiteResult:
    name: str
    score: float  # the one headline number (higher is better, except loss)
    metrics: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)  # per-item detail (responses, verdicts)
    failed: int = 0  # requests that got no answer (counted as wrong in the score)
    errors: list[str] = field(default_factory=list)  # the first few of their error messages


MAX_ERRORS = 5


class Failures:
    """Requests that failed during one suite: their count and first messages."""

    def __init__(self) -> None:
        self.count = 0
        self.errors: list[str] = []

    def add(self, error: Exception) -> None:
        self.count += 1
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(str(error)[:300])

    def result(self, name: str, score: float, metrics: dict[str, Any], rows: list[dict[str, Any]] | None = None
               ) -> SuiteResult:
        metrics["failed"] = self.count
        return SuiteResult(name, score, metrics, rows or [], self.count, list(self.errors))


def read_jsonl(path: str | Path, required: Sequence[str] = ()) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise EvalDataError(f"evaluation file not found: {p}")
    out = []
    with p.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalDataError(f"{p}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise EvalDataError(f"{p}:{n}: expected a JSON object, got {type(obj).__name__}")
            missing = [k for k in required if k not in obj]
            if missing:
                raise EvalDataError(f"{p}:{n}: missing field(s) {missing}")
            out.append(obj)
    if not out:
        raise EvalDataError(f"{p} holds no records")
    return out


def _messages(rec: dict[str, Any], where: str) -> list[dict[str, str]]:
    """The conversation to answer: `messages` (a trailing assistant reference is dropped),
    else a `prompt` / `question` string as one user turn."""
    msgs = rec.get("messages")
    if isinstance(msgs, list) and msgs:
        return msgs[:-1] if msgs[-1].get("role") == "assistant" else list(msgs)
    for key in ("prompt", "question"):
        if isinstance(rec.get(key), str):
            return [{"role": "user", "content": rec[key]}]
    raise EvalDataError(f"{where}: needs `messages`, `prompt` or `question`")


async def _generate_all(llm: Any, conversations: list[list[dict[str, str]]], max_tokens: int,
                        failures: Failures, concurrency: int = 256) -> list[str | None]:
    """Greedy responses for every conversation, many in flight at once; None (and a failure
    counted) where the request failed."""
    from nemojax.sdg.llm import GenRequest, LLMError

    sem = asyncio.Semaphore(concurrency)

    async def one(msgs: list[dict[str, str]]) -> str | None:
        async with sem:
            try:
                res = await llm.generate(GenRequest(messages=msgs, temperature=0.0, max_tokens=max_tokens))
            except LLMError as e:
                failures.add(e)
                return None
            return res.text

    return list(await asyncio.gather(*(one(m) for m in conversations)))


async def _score_all(reward: Any, conversations: list[list[dict[str, str]]], failures: Failures
                     ) -> list[dict[str, float] | None]:
    """Reward scores of every conversation; None (and a failure counted) where scoring failed."""
    from nemojax.sdg.llm import LLMError

    async def one(msgs: list[dict[str, str]]) -> dict[str, float] | None:
        try:
            return await reward.score(msgs)
        except LLMError as e:
            failures.add(e)
            return None

    return list(await asyncio.gather(*(one(m) for m in conversations)))


def _acc(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags) if flags else 0.0


async def tasks_suite(llm: Any, tasks: list[Task], *, max_tokens: int = 96) -> SuiteResult:
    failures = Failures()
    got = await _generate_all(llm, [[{"role": "user", "content": t.prompt}] for t in tasks], max_tokens, failures)
    responses = [r or "" for r in got]
    ok = [v and r is not None for v, r in zip(verify_many(tasks, responses), got)]
    by_family: dict[str, list[bool]] = defaultdict(list)
    by_level: dict[int, list[bool]] = defaultdict(list)
    for t, v in zip(tasks, ok):
        by_family[t.family].append(v)
        by_level[t.level].append(v)
    metrics = {"accuracy": _acc(ok), "n": len(ok),
               "by_family": {k: _acc(v) for k, v in sorted(by_family.items())},
               "by_level": {str(k): _acc(v) for k, v in sorted(by_level.items())}}
    fmt = [(t, r) for t, r in zip(tasks, responses) if "instruction_id" in t.check]
    if fmt:
        from nemojax.sdg.instructions import evaluate

        metrics["ifeval"] = {k: v for k, v in evaluate(
            [{"instruction_id_list": [t.check["instruction_id"]], "kwargs": [t.check.get("instruction_kwargs", {})],
              "response": r} for t, r in fmt]).items() if k.startswith(("prompt_level", "instruction_level"))}
    rows = [{"family": t.family, "level": t.level, "prompt": t.prompt, "response": r, "correct": v}
            for t, r, v in zip(tasks, got, ok)]
    return failures.result("tasks", metrics["accuracy"], metrics, rows)


def _reference_number(rec: dict[str, Any], where: str) -> int:
    ans = rec.get("answer")
    if isinstance(ans, (int, float)) and not isinstance(ans, bool):
        return int(ans)
    if isinstance(ans, str):
        text = ans.split("####")[-1] if "####" in ans else ans  # GSM8K: "... #### 42"
        n = extract_number(text)
        if n is not None:
            return n
    raise EvalDataError(f"{where}: `answer` must be a number or text ending in one (GSM8K '#### N'), got {ans!r}")


async def answers_suite(llm: Any, records: list[dict[str, Any]], *, source: str = "answers",
                        max_tokens: int = 128) -> SuiteResult:
    convs = [_messages(r, f"{source}:{i + 1}") for i, r in enumerate(records)]
    refs = [_reference_number(r, f"{source}:{i + 1}") for i, r in enumerate(records)]
    failures = Failures()
    responses = await _generate_all(llm, convs, max_tokens, failures)
    ok = [resp is not None and extract_number(resp) == ref for resp, ref in zip(responses, refs)]
    rows = [{"response": r, "reference": ref, "correct": v} for r, ref, v in zip(responses, refs, ok)]
    return failures.result("answers", _acc(ok), {"accuracy": _acc(ok), "n": len(ok)}, rows)


async def ifeval_suite(llm: Any, records: list[dict[str, Any]], *, source: str = "ifeval",
                       max_tokens: int = 256) -> SuiteResult:
    from nemojax.sdg.instructions import evaluate

    for i, r in enumerate(records):
        if not isinstance(r.get("instruction_id_list"), list) or not isinstance(r.get("kwargs"), list):
            raise EvalDataError(f"{source}:{i + 1}: IFEval records need `prompt`, `instruction_id_list` "
                                f"and `kwargs` lists")
    failures = Failures()
    responses = await _generate_all(llm, [_messages(r, f"{source}:{i + 1}") for i, r in enumerate(records)],
                                    max_tokens, failures)
    try:  # a failed request is checked as an empty response: it follows no instruction
        m = evaluate([dict(r, response=resp or "") for r, resp in zip(records, responses)])
    except ValueError as e:
        raise EvalDataError(f"{source}: {e}") from None
    rows = [{"prompt": r.get("prompt"), "response": resp} for r, resp in zip(records, responses)]
    return failures.result("ifeval", m["prompt_level_strict"], m, rows)


async def reward_suite(llm: Any, reward: Any, records: list[dict[str, Any]], *, source: str = "reward",
                       max_tokens: int = 128) -> SuiteResult:
    convs = [_messages(r, f"{source}:{i + 1}") for i, r in enumerate(records)]
    failures = Failures()
    responses = await _generate_all(llm, convs, max_tokens, failures)
    answered = [(c, r) for c, r in zip(convs, responses) if r is not None]
    scores = await _score_all(reward, [c + [{"role": "assistant", "content": r}] for c, r in answered], failures)
    ok = [s for s in scores if s is not None]
    mean = {k: sum(s[k] for s in ok) / len(ok) for k in ok[0]} if ok else {"reward": float("nan")}
    rows = [{"response": r, "scores": s} for (_, r), s in zip(answered, scores)]
    return failures.result("reward", mean["reward"], {"mean": mean, "n": len(ok)}, rows)


def _pair_messages(rec: dict[str, Any], which: str, where: str) -> list[dict[str, str]]:
    """The conversation ending in the `chosen` / `rejected` response. Accepts RewardBench's
    strings and TRL's message lists (with or without a separate `prompt`)."""
    prompt, resp = rec.get("prompt"), rec.get(which)
    head = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt or [])
    if isinstance(resp, list):
        return head + resp
    if not isinstance(resp, str):
        raise EvalDataError(f"{where}: `{which}` must be a string or a message list")
    if not head:
        raise EvalDataError(f"{where}: needs a `prompt`")
    return head + [{"role": "assistant", "content": resp}]


async def rewardbench_suite(reward: Any, records: list[dict[str, Any]], *, source: str = "rewardbench") -> SuiteResult:
    pairs = [(_pair_messages(r, "chosen", f"{source}:{i + 1}"), _pair_messages(r, "rejected", f"{source}:{i + 1}"))
             for i, r in enumerate(records)]
    failures = Failures()
    chosen = await _score_all(reward, [c for c, _ in pairs], failures)
    rejected = await _score_all(reward, [r for _, r in pairs], failures)
    by_subset: dict[str, list[bool]] = defaultdict(list)
    for rec, c, r in zip(records, chosen, rejected):  # a pair with a failed score counts as wrong
        by_subset[str(rec.get("subset", "all"))].append(c is not None and r is not None and c["reward"] > r["reward"])
    per = {k: _acc(v) for k, v in sorted(by_subset.items())}
    every = [v for vs in by_subset.values() for v in vs]
    metrics = {"accuracy": _acc(every), "by_subset": per, "n": len(every)}
    return failures.result("rewardbench", sum(per.values()) / len(per), metrics)


def loss_suite(model: Any, tokenizer: Any, records: list[dict[str, Any]], *, source: str = "loss",
               seq_len: int = 512, batch_size: int = 16) -> SuiteResult:
    """Mean NLL per assistant token of SFT-format records (`messages`), one jitted forward
    per batch of fixed shape [batch_size, seq_len]."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from nemojax.data.chat import encode_chat
    from nemojax.train.losses import lm_nll_sums

    ids_rows, mask_rows = [], []
    for i, r in enumerate(records):
        msgs = r.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise EvalDataError(f"{source}:{i + 1}: loss records need a non-empty `messages` list")
        enc = encode_chat(tokenizer, msgs)
        ids_rows.append(list(enc.ids)[: seq_len + 1])
        mask_rows.append([bool(m) for m in enc.loss_mask][: seq_len + 1])
    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit
    def sums(params: Any, ids: jax.Array, targets: jax.Array, mask: jax.Array, seg: jax.Array):
        logits = nnx.merge(graphdef, params)(ids, segment_ids=seg)
        return lm_nll_sums(logits, targets, mask)

    nll = count = 0.0
    for start in range(0, len(ids_rows), batch_size):
        chunk = list(zip(ids_rows, mask_rows))[start:start + batch_size]
        ids = np.zeros((batch_size, seq_len), np.int32)
        tgt = np.zeros((batch_size, seq_len), np.int32)
        msk = np.zeros((batch_size, seq_len), np.float32)
        seg = np.zeros((batch_size, seq_len), np.int32)
        for b, (row, m) in enumerate(chunk):
            n = len(row) - 1
            ids[b, :n], tgt[b, :n] = row[:-1], row[1:]
            msk[b, :n] = m[1:]
            seg[b, :n] = 1
        s, c = jax.device_get(sums(params, jnp.asarray(ids), jnp.asarray(tgt), jnp.asarray(msk), jnp.asarray(seg)))
        nll, count = nll + float(s), count + float(c)
    loss = nll / max(count, 1.0)
    return SuiteResult("loss", loss, {"loss": loss, "tokens": int(count), "n": len(records), "failed": 0})


SuiteFn = Callable[..., Awaitable[SuiteResult]]
