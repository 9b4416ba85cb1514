"""Reward clients: `await reward.score(messages) -> {attribute: score, ..., "reward": float}`.

Three backends behind one interface:
- `InProcessReward`: a nemojax reward checkpoint through `nemojax.inference.reward.RewardScorer`,
  scoring the conversations of all items in flight in batches (micro-batching driver, as the
  engine client does for generation);
- `HTTPReward`: NVIDIA's reward API shape, which `nemojax serve --reward-checkpoint` also answers:
  POST /v1/chat/completions with the conversation (ending in the assistant turn); the scores come
  back as `choices[0].logprobs.content = [{"token": attribute, "logprob": score}, ...]`;
- `ScriptedReward`: scores from a Python function (tests, dry runs).
When the backend gives no "reward" entry it is the weighted sum of the attributes (default
weights: the published Nemotron-4-340B-Reward ones).
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Protocol

from nemojax.data.chat_template import ChatFormatError
from nemojax.sdg.http_client import OpenAIHTTP
from nemojax.sdg.llm import LLMError

NEMOTRON_REWARD_WEIGHTS = {"helpfulness": 0.3, "correctness": 0.74, "coherence": 0.46, "complexity": 0.47,
                           "verbosity": -0.33}


def with_reward(scores: dict[str, float], weights: dict[str, float]) -> dict[str, float]:
    out = {k: float(v) for k, v in scores.items()}
    if "reward" not in out:
        out["reward"] = sum(w * out[a] for a, w in weights.items() if a in out)
    return out


class RewardClient(Protocol):
    name: str

    async def score(self, messages: list[dict[str, str]]) -> dict[str, float]: ...

    async def aclose(self) -> None: ...


class HTTPReward:
    def __init__(self, base_url: str, model: str, *, name: str = "reward",
                 weights: dict[str, float] | None = None, **http: Any) -> None:
        self.name = name
        self.model = model
        self.weights = dict(weights or NEMOTRON_REWARD_WEIGHTS)
        self.http = OpenAIHTTP(base_url, **http)

    async def score(self, messages: list[dict[str, str]]) -> dict[str, float]:
        data = await self.http.post("/chat/completions", {"model": self.model, "messages": messages})
        try:
            entries = data["choices"][0]["logprobs"]["content"]
            scores = {e["token"]: float(e["logprob"]) for e in entries}
        except (KeyError, TypeError, IndexError, ValueError) as e:
            raise LLMError(f"reward response has no choices[0].logprobs.content scores ({e!r}): "
                           f"{str(data)[:200]}", "bad_response", transport=True) from None
        return with_reward(scores, self.weights)

    async def aclose(self) -> None:
        await self.http.aclose()


class ScriptedReward:
    def __init__(self, fn: Callable[[list[dict[str, str]]], dict[str, float]], *, name: str = "scripted-reward",
                 weights: dict[str, float] | None = None) -> None:
        self.name = name
        self.fn = fn
        self.weights = dict(weights or NEMOTRON_REWARD_WEIGHTS)

    async def score(self, messages: list[dict[str, str]]) -> dict[str, float]:
        return with_reward(self.fn(messages), self.weights)

    async def aclose(self) -> None:
        return None


class InProcessReward:
    """Batches the conversations of concurrent items into `RewardScorer.score` calls."""

    def __init__(self, scorer: Any, *, name: str = "reward", batch_size: int = 8,
                 weights: dict[str, float] | None = None) -> None:
        self.name = name
        self.scorer = scorer
        self.batch_size = batch_size
        self.weights = dict(weights or NEMOTRON_REWARD_WEIGHTS)
        self._queued: list[tuple[list[dict[str, str]], asyncio.Future]] = []
        self._driver: asyncio.Task | None = None

    @classmethod
    def from_checkpoint(cls, checkpoint: str, *, tokenizer: Any = None, batch_size: int = 8,
                        max_len: int | None = 1024, **kw: Any) -> "InProcessReward":
        """A reward checkpoint loaded through `RewardScorer.from_checkpoint` (its own tokenizer.model
        if it has one, else the builtin one, unless `tokenizer` is given)."""
        from nemojax.inference.reward import RewardScorer

        scorer = RewardScorer.from_checkpoint(checkpoint, tokenizer=tokenizer, batch_size=batch_size, max_len=max_len)
        return cls(scorer, batch_size=batch_size, **kw)

    async def score(self, messages: list[dict[str, str]]) -> dict[str, float]:
        fut = asyncio.get_running_loop().create_future()
        self._queued.append((messages, fut))
        if self._driver is None or self._driver.done():
            self._driver = asyncio.get_running_loop().create_task(self._drive())
        return await fut

    async def _drive(self) -> None:
        await asyncio.sleep(0)  # let every ready item queue its conversation first
        while self._queued:
            batch, self._queued = self._queued[:self.batch_size], self._queued[self.batch_size:]
            try:
                results = self.scorer.score([m for m, _ in batch])
            except ChatFormatError:  # one malformed conversation: score the others without it
                results = [self._one(m) for m, _ in batch]
            except Exception as e:  # the scorer broke: not an outcome of these items
                results = [LLMError(f"reward scoring failed: {e}", "reward_error", transport=True)] * len(batch)
            for (_, fut), scores in zip(batch, results):
                if fut.done():
                    continue
                if isinstance(scores, LLMError):
                    fut.set_exception(scores)
                else:
                    fut.set_result(with_reward(dict(scores), self.weights))
            await asyncio.sleep(0)

    def _one(self, messages: list[dict[str, str]]) -> Any:
        try:
            return self.scorer.score([messages])[0]
        except ChatFormatError as e:
            return LLMError(f"conversation cannot be scored: {e}", "bad_conversation")
        except Exception as e:
            return LLMError(f"reward scoring failed: {e}", "reward_error", transport=True)

    async def aclose(self) -> None:
        if self._driver is not None and not self._driver.done():
            self._driver.cancel()
