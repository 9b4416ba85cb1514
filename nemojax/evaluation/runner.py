"""Run several evaluation suites against one model and collect one report.

    report = evaluate_model(EvalSpec(checkpoint="runs/sft", suites={"tasks": "eval/tasks.jsonl"}))
    report["score"]                       # the headline of the first suite
    report["suites"]["tasks"]["metrics"]  # everything measured

The model is either a nemojax checkpoint, served in-process by the sampling engine, or any
OpenAI-compatible endpoint (`endpoint` + `model`). Reward suites take a reward checkpoint or a
reward endpoint. The same report shape is what `nemojax align` stores per stage.

An endpoint is tried before anything is sent (`GET <endpoint>/models`): one that cannot be
reached raises `EvalEndpointError`. Requests that fail later (after the client's retries) are
counted per suite and in `report["failed_requests"]`, with the first errors; `report["complete"]`
is false when any failed, and `nemojax eval` then exits 1.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nemojax.align.tasks import Task
from nemojax.evaluation.suites import (EvalDataError, SuiteResult, answers_suite, ifeval_suite, loss_suite,
                                       read_jsonl, reward_suite, rewardbench_suite, tasks_suite)

ENDPOINT_PROBE_TIMEOUT_S = 10.0


class EvalEndpointError(EvalDataError):
    """The endpoint under test (or the reward endpoint) cannot be reached."""


def check_endpoint(url: str, timeout_s: float = ENDPOINT_PROBE_TIMEOUT_S) -> None:
    """Raise EvalEndpointError unless `url` answers HTTP at all (`GET <url>/models`; any status
    counts: some servers do not list models). A refused connection, an unknown host or a timeout
    would otherwise turn into every request failing after minutes of retries."""
    import httpx

    try:
        httpx.get(url.rstrip("/") + "/models", timeout=timeout_s)
    except (httpx.TransportError, httpx.InvalidURL, ValueError) as e:
        raise EvalEndpointError(f"endpoint {url} cannot be reached ({type(e).__name__}: {e}); is the server "
                                f"running and the URL right (e.g. http://localhost:8000/v1)?") from None

SUITES = ("tasks", "answers", "ifeval", "reward", "rewardbench", "loss")
GENERATION_SUITES = ("tasks", "answers", "ifeval", "reward")


@dataclass
class EvalSpec:
    """What to evaluate and against what.

    suites: suite name -> JSONL file (see nemojax.evaluation.suites for each format).
    checkpoint / endpoint+model: the model under test (exactly one). reward_checkpoint /
    reward_endpoint+reward_model: the judge for `reward` and the model under test for
    `rewardbench`. limit: evaluate only the first N records of each file.
    """

    suites: dict[str, str]
    checkpoint: str = ""
    endpoint: str = ""
    model: str = ""
    reward_checkpoint: str = ""
    reward_endpoint: str = ""
    reward_model: str = ""
    tokenizer: str = ""
    max_tokens: int = 128
    batch_slots: int = 32
    max_len: int = 512
    limit: int = 0
    quantize: str = ""  # int8 | fp8: quantize the checkpoint's projections at load ("" = as stored)
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        unknown = sorted(set(self.suites) - set(SUITES))
        if unknown:
            raise EvalDataError(f"unknown suite(s) {unknown}; choose from {list(SUITES)}")
        if not self.suites:
            raise EvalDataError("no suite given; e.g. --suite tasks=eval/tasks.jsonl")
        needs_model = any(s in self.suites for s in (*GENERATION_SUITES, "loss"))
        if needs_model and bool(self.checkpoint) == bool(self.endpoint):
            raise EvalDataError("give exactly one model under test: --checkpoint DIR or --endpoint URL --model NAME")
        if self.endpoint and not self.model:
            raise EvalDataError("--endpoint needs --model (the served model's name)")
        if "loss" in self.suites and not self.checkpoint:
            raise EvalDataError("the loss suite needs the model's logits: use --checkpoint, not --endpoint")
        if any(s in self.suites for s in ("reward", "rewardbench")) and not (self.reward_checkpoint or self.reward_endpoint):
            raise EvalDataError("the reward and rewardbench suites need --reward-checkpoint DIR or --reward-endpoint URL")


def _tokenizer(spec: EvalSpec) -> Any:
    from nemojax.data.tokenizer import load_tokenizer

    if spec.tokenizer:
        return load_tokenizer(spec.tokenizer)
    for base in (Path(spec.checkpoint), Path(spec.checkpoint).parent, Path(spec.checkpoint).parent.parent):
        if (base / "tokenizer.model").is_file():
            return load_tokenizer(base / "tokenizer.model")
    return load_tokenizer("builtin")


def _llm(spec: EvalSpec, model: Any, tokenizer: Any) -> Any:
    if spec.endpoint:
        from nemojax.sdg.http_client import OpenAILLM

        return OpenAILLM(spec.endpoint, spec.model)
    from nemojax.inference import Engine
    from nemojax.sdg.engine_client import EngineLLM

    stops = [tokenizer.eos_id]
    engine = Engine(model, max_slots=spec.batch_slots, max_len=min(spec.max_len, model.cfg.max_seq_len),
                    tokenizer=tokenizer, stop_token_ids=stops)
    return EngineLLM(engine, tokenizer, name=Path(spec.checkpoint).name)


def _reward_client(spec: EvalSpec) -> Any:
    if spec.reward_endpoint:
        from nemojax.sdg.reward import HTTPReward

        return HTTPReward(spec.reward_endpoint, spec.reward_model or "reward")
    from nemojax.sdg.reward import InProcessReward

    return InProcessReward.from_checkpoint(spec.reward_checkpoint)


def _records(spec: EvalSpec, name: str) -> list[dict[str, Any]]:
    rows = read_jsonl(spec.suites[name])
    return rows[: spec.limit] if spec.limit > 0 else rows


async def _run(spec: EvalSpec, model: Any, tokenizer: Any) -> dict[str, SuiteResult]:
    results: dict[str, SuiteResult] = {}
    llm = _llm(spec, model, tokenizer) if any(s in spec.suites for s in GENERATION_SUITES) else None
    reward = _reward_client(spec) if any(s in spec.suites for s in ("reward", "rewardbench")) else None
    try:
        for name in spec.suites:
            if name == "tasks":
                rows = _records(spec, name)
                try:
                    tasks = [Task.from_json(r) for r in rows]
                except (KeyError, TypeError, ValueError) as e:
                    raise EvalDataError(f"{spec.suites[name]}: not a task file ({e!r}); tasks files hold "
                                        f"serialised nemojax.align.tasks.Task records") from None
                results[name] = await tasks_suite(llm, tasks, max_tokens=spec.max_tokens)
            elif name == "answers":
                results[name] = await answers_suite(llm, _records(spec, name), source=spec.suites[name],
                                                    max_tokens=spec.max_tokens)
            elif name == "ifeval":
                results[name] = await ifeval_suite(llm, _records(spec, name), source=spec.suites[name],
                                                   max_tokens=spec.max_tokens)
            elif name == "reward":
                results[name] = await reward_suite(llm, reward, _records(spec, name), source=spec.suites[name],
                                                   max_tokens=spec.max_tokens)
            elif name == "rewardbench":
                results[name] = await rewardbench_suite(reward, _records(spec, name), source=spec.suites[name])
            elif name == "loss":
                results[name] = loss_suite(model, tokenizer, _records(spec, name), source=spec.suites[name],
                                           seq_len=min(spec.max_len, model.cfg.max_seq_len))
    finally:
        for client in (llm, reward):
            if client is not None:
                await client.aclose()
    return results


def evaluate_model(spec: EvalSpec, *, model: Any = None, tokenizer: Any = None) -> dict[str, Any]:
    """Run every suite of `spec`; returns {"score", "suites": {name: {score, metrics}}, "seconds"}.

    `model` / `tokenizer` may be passed in (already loaded) to skip loading the checkpoint.
    """
    spec.validate()
    for url in (spec.endpoint, spec.reward_endpoint):
        if url:
            check_endpoint(url)
    t0 = time.perf_counter()
    if spec.checkpoint and model is None:
        from nemojax.checkpoint import load_model

        model = load_model(spec.checkpoint, quantize=spec.quantize or None)
    if tokenizer is None and (spec.checkpoint or spec.tokenizer):
        tokenizer = _tokenizer(spec)
    results = asyncio.run(_run(spec, model, tokenizer))
    first = next(iter(spec.suites))
    failed = sum(r.failed for r in results.values())
    return {"score": results[first].score, "headline_suite": first,
            "model": spec.checkpoint or f"{spec.endpoint} ({spec.model})",
            "complete": failed == 0, "failed_requests": failed,
            "errors": [e for r in results.values() for e in r.errors][:5],
            "suites": {k: {"score": r.score, "metrics": r.metrics} for k, r in results.items()},
            "rows": {k: r.rows for k, r in results.items()},
            "seconds": round(time.perf_counter() - t0, 2)}


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table of every suite's headline and main metrics."""
    lines = [f"{'suite':<12} {'score':>8}  details"]
    if report.get("failed_requests"):
        lines.append(f"INCOMPLETE: {report['failed_requests']} request(s) failed and count as wrong; first error: "
                     f"{report['errors'][0] if report['errors'] else '?'}")
    for name, r in report["suites"].items():
        m = r["metrics"]
        if name == "tasks":
            detail = " ".join(f"{k}={v:.2f}" for k, v in m["by_family"].items())
        elif name == "ifeval":
            detail = " ".join(f"{k}={m[k]:.3f}" for k in ("prompt_level_strict", "instruction_level_strict",
                                                          "prompt_level_loose", "instruction_level_loose"))
        elif name == "rewardbench":
            detail = " ".join(f"{k}={v:.3f}" for k, v in m["by_subset"].items())
        elif name == "reward":
            detail = " ".join(f"{k}={v:.3f}" for k, v in m["mean"].items())
        else:
            detail = " ".join(f"{k}={v}" for k, v in m.items() if not isinstance(v, dict))
        if m.get("failed"):
            detail += f" failed={m['failed']}"
        lines.append(f"{name:<12} {r['score']:>8.4f}  {detail}")
    return "\n".join(lines)
