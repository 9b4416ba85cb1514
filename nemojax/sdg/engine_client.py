"""`EngineLLM`: the SDG client over an in-process `nemojax.inference.Engine`.

Why a driver loop: stages await one request at a time per item, but many items run at once.
Every `generate` call queues its request; one driver task submits everything queued to the
engine, runs `engine.step()` (one decode chunk for all slots) and resolves the futures of the
samples that finished, then yields to the event loop so the woken items can queue their next
requests before the following chunk. The engine's slots therefore stay as full as the number of
items in flight allows. The engine (and its compiled functions) lives as long as the client, so
every stage of a pipeline reuses the same executables.

Only the engine's public API is used: submit, step, has_work, free_slots, cancel (and its
settings, read for `identity`).

Determinism: every request carries a seed from the stage (stages/base.py), and the engine's
sampling keys depend only on (seed, sample index, token index), never on the slot. What else
runs can still change the numbers its tokens are drawn from: on XLA:CPU a matmul row's result
depends on how many rows the call has, so a prompt prefilled together with others, or reusing
keys/values another prompt's prefill computed (prefix cache), gets slightly different logits;
and decode's attention sums over a window sized to the longest running sample, so a
neighbour's length changes the rounding too (benchmarks/sdg_batch_invariance.py). Pipeline
engine clients are therefore built batch-invariant by default (ClientConfig.batch_invariant:
one prompt per prefill call, no prefix cache across requests, one decode window of max_len
rows), which makes every request's tokens independent of what runs beside it, so a resumed
stage writes the bytes an uninterrupted one does. An engine passed in from Python keeps its
own settings.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from nemojax.sdg.llm import GenRequest, GenResult, LLMError


class EngineLLM:
    def __init__(self, engine: Any, tokenizer: Any, *, name: str = "engine", bos: bool = True) -> None:
        self.name = name
        self.engine = engine
        self.tokenizer = tokenizer
        self.bos = bos
        try:
            self._turn_id: int | None = tokenizer.special_id("<extra_id_1>")
        except Exception:  # a tokenizer without chat pieces: chat prompts still stop at eos
            self._turn_id = None
        self._ids = itertools.count()
        self._queued: list[tuple[Any, asyncio.Future]] = []
        self._running: dict[Any, tuple[asyncio.Future, list[Any], int]] = {}
        self._driver: asyncio.Task | None = None

    def _prompt_ids(self, request: GenRequest) -> list[int]:
        from nemojax.data.chat import prompt_ids

        return prompt_ids(self.tokenizer, request.messages if request.messages is not None else request.prompt,
                          bos=self.bos)

    async def generate(self, request: GenRequest) -> GenResult:
        from nemojax.inference import Request, SamplingParams
        from nemojax.inference.sampling import SamplingError

        try:
            ids = self._prompt_ids(request)
            stop_ids = [self._turn_id] if request.messages is not None and self._turn_id is not None else []
            params = SamplingParams(temperature=request.temperature, top_p=request.top_p,
                                    max_tokens=request.max_tokens, stop=list(request.stop),
                                    stop_token_ids=stop_ids, seed=request.seed, n=request.n).validate()
        except (SamplingError, ValueError) as e:
            raise LLMError(f"bad request: {e}", "bad_request") from None
        if len(ids) >= self.engine.max_len:
            raise LLMError(f"prompt of {len(ids)} tokens does not fit the engine's max_len {self.engine.max_len}",
                           "prompt_too_long")
        fut = asyncio.get_running_loop().create_future()
        self._queued.append((Request(("sdg", next(self._ids)), ids, params), fut))
        if self._driver is None or self._driver.done():
            self._driver = asyncio.get_running_loop().create_task(self._drive())
        return await fut

    def _has_work(self) -> bool:
        hw = self.engine.has_work
        return bool(hw() if callable(hw) else hw)

    async def _drive(self) -> None:
        while self._queued or self._has_work():
            queued, self._queued = self._queued, []
            for req, fut in queued:
                try:
                    self.engine.submit(req)
                except ValueError as e:
                    fut.set_exception(LLMError(str(e), "prompt_too_long"))
                    continue
                self._running[req.id] = (fut, [], req.params.n)
            if self._has_work():
                try:
                    finished = self.engine.step()
                except Exception as e:  # fail every waiter rather than hang them
                    for rid, (fut, _, _) in self._running.items():
                        self.engine.cancel(rid)
                        if not fut.done():
                            fut.set_exception(LLMError(f"engine failed: {e}", "engine_error", transport=True))
                    self._running.clear()
                    raise
                for c in finished:
                    entry = self._running.get(c.request_id)
                    if entry is None:
                        continue
                    fut, got, n = entry
                    got.append(c)
                    if len(got) == n:
                        del self._running[c.request_id]
                        if not fut.done():
                            fut.set_result(self._result(got))
            # let the woken items queue their next requests before the next chunk
            await asyncio.sleep(0)
        for rid, (fut, _, _) in list(self._running.items()):  # the engine dropped them (cancelled)
            if not fut.done():
                fut.set_exception(LLMError(f"request {rid} was dropped by the engine", "engine_error", transport=True))
        self._running.clear()

    def identity(self) -> dict[str, Any]:
        """What about the live engine changes its answers (for the runner's stage fingerprints):
        the model's shape and the engine settings that change numerics or admission."""
        import dataclasses

        e = self.engine
        return {"model_config": dataclasses.asdict(e.cfg), "max_slots": e.max_slots, "max_len": e.max_len,
                "decode_steps": e.decode_steps, "max_prefill_batch": e.batch_buckets[-1],
                "prefix_cache_tokens": e.prefix_cache.num_blocks * e.prefix_cache.block_size,
                "windows": list(e.window_buckets), "min_bucket": e.len_buckets[0], "bos": self.bos}

    def _result(self, completions: list[Any]) -> GenResult:
        completions = sorted(completions, key=lambda c: c.sample_index)
        texts = []
        for c in completions:
            text = c.text if c.text is not None else self.tokenizer.decode(c.output_ids)
            if c.finish_reason == "stop" and text.endswith("\n"):
                text = text[:-1]  # the template's newline before <extra_id_1>
            texts.append(text)
        return GenResult(texts, [c.finish_reason for c in completions], completions[0].prompt_tokens,
                         sum(c.completion_tokens for c in completions))

    async def aclose(self) -> None:
        for rid, (fut, _, _) in list(self._running.items()):
            self.engine.cancel(rid)
            if not fut.done():
                fut.cancel()
        self._running.clear()
        if self._driver is not None and not self._driver.done():
            self._driver.cancel()
