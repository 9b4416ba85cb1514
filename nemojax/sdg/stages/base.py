"""What every stage kind shares: its spec (config keys), the per-item `Work` handle, ids."""

from __future__ import annotations

import collections
import hashlib
import random
import zlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

from nemojax.config import ConfigError
from nemojax.sdg.llm import GenRequest, GenResult, LLMError


@dataclass
class StageSpec:
    """Keys every stage accepts (each kind adds its own)."""

    kind: str = ""
    input: str = ""  # the stage whose records this one reads (default: the stage before)
    client: str = ""  # the client generating for this stage (default: the first one declared)
    limit: int = 0  # read at most this many input records (0 = all)
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    max_tokens: int = 256

    uses_client: ClassVar[bool] = True

    def needs_client(self) -> bool:
        return self.uses_client

    def validate(self, key: str, cfg: Any) -> None:
        if self.needs_client():
            if not cfg.clients:
                raise ConfigError(f"{key} ({self.kind}) generates text: declare a client under clients:")
            if self.client and self.client not in cfg.clients:
                raise ConfigError(f"{key}.client={self.client!r} is not declared; clients: {', '.join(cfg.clients)}")
        if self.limit < 0 or self.max_tokens < 1 or self.temperature < 0:
            raise ConfigError(f"{key}: need limit >= 0, max_tokens >= 1, temperature >= 0")


def stable_id(*parts: Any) -> str:
    """A short id that depends only on its parts (stage, parent id, index)."""
    return hashlib.sha1("\x1f".join(str(p) for p in parts).encode()).hexdigest()[:16]


def derived_seed(*parts: Any) -> int:
    return zlib.crc32("\x1f".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


class Work:
    """One item being processed: its random stream, LLM calls, token count and drop reasons.

    Every call gets a seed derived from (pipeline seed, stage, item id, call number), so an item
    samples the same tokens whenever and wherever it runs (first run or resume, any batch).

    `transport` holds the first transport failure of any call (LLMError.transport: unreachable
    server, retries exhausted, engine crash), whatever the stage then did with the error: the
    runner then records no outcome for the item, so a rerun retries it.
    """

    def __init__(self, ctx: Any, stage: str, item_id: str, spec: StageSpec) -> None:
        self.ctx = ctx
        self.stage = stage
        self.item_id = item_id
        self.spec = spec
        self.rng = random.Random(f"{ctx.seed}/{stage}/{item_id}")
        self.tokens = 0
        self.dropped: collections.Counter[str] = collections.Counter()
        self.transport: LLMError | None = None
        self._calls = 0

    def failed(self, error: LLMError) -> None:
        """Note a backend failure: a transport failure marks the item as not done."""
        if error.transport and self.transport is None:
            self.transport = error

    def drop(self, reason: str, n: int = 1) -> None:
        if n:
            self.dropped[reason] += n

    def request(self, *, messages: list[dict[str, str]] | None = None, prompt: str | None = None,
                **overrides: Any) -> GenRequest:
        """A GenRequest with the stage's sampling settings (overridable) and a derived seed."""
        self._calls += 1
        fields = {"temperature": self.spec.temperature, "top_p": self.spec.top_p,
                  "max_tokens": self.spec.max_tokens,
                  "seed": derived_seed(self.ctx.seed, self.stage, self.item_id, self._calls)}
        fields.update(overrides)
        return GenRequest(messages=messages, prompt=prompt, **fields)

    async def generate(self, request: GenRequest, client: str | None = None) -> GenResult:
        try:
            result = await self.ctx.llm(client or self.spec.client).generate(request)
        except LLMError as e:
            self.failed(e)
            raise
        self.tokens += result.prompt_tokens + result.completion_tokens
        return result

    async def ask(self, text: str, client: str | None = None, **overrides: Any) -> str | None:
        """One user message -> the reply text, or None (drop reason counted) when the backend fails."""
        try:
            result = await self.generate(self.request(messages=[{"role": "user", "content": text}], **overrides),
                                         client)
        except LLMError as e:
            self.drop(e.reason)
            return None
        return result.text

    async def ask_messages(self, messages: list[dict[str, str]], client: str | None = None,
                           **overrides: Any) -> str | None:
        """The assistant's reply to a conversation; None (reason counted) on failure or emptiness."""
        try:
            result = await self.generate(self.request(messages=messages, **overrides), client)
        except LLMError as e:
            self.drop(e.reason)
            return None
        if not result.text.strip():
            self.drop("empty_response")
            return None
        return result.text

    async def score(self, messages: list[dict[str, str]]) -> dict[str, float] | None:
        reward = self.ctx.reward
        if reward is None:
            raise LLMError("this stage needs a reward model: set reward.type in the pipeline", "no_reward")
        try:
            return await reward.score(messages)
        except LLMError as e:
            self.failed(e)
            self.drop(e.reason)
            return None

    def template(self, name: str, **fields: Any) -> str:
        from nemojax.sdg.templates import render

        return render(name, self.ctx.templates, **fields)


class Stage:
    """A stage kind. `mode` "map": `process(item, work)` per input record, resumable per item;
    "global": `run_global(items, ctx)` over all records at once (dedup, Genetic Instruct)."""

    kind: ClassVar[str] = ""
    Spec: ClassVar[type[StageSpec]] = StageSpec
    needs_input: ClassVar[bool] = True
    mode: ClassVar[str] = "map"

    def __init__(self, name: str, spec: Any, ctx: Any) -> None:
        self.name = name
        self.spec = spec
        self.ctx = ctx

    def source_items(self) -> list[dict[str, Any]]:
        """Input records of a stage that reads none (needs_input False)."""
        raise NotImplementedError

    async def process(self, item: dict[str, Any], work: Work) -> list[dict[str, Any]]:
        raise NotImplementedError

    async def run_global(self, items: list[dict[str, Any]], work: Work
                         ) -> list[dict[str, Any]]:
        raise NotImplementedError


def prompt_text(item: dict[str, Any]) -> str:
    """The prompt of a record: its `prompt`, else the content of its last user message."""
    if isinstance(item.get("prompt"), str):
        return item["prompt"]
    for m in reversed(item.get("messages") or []):
        if m.get("role") == "user":
            return m.get("content", "")
    return ""


def counter_dict(c: collections.Counter[str]) -> dict[str, int]:
    return {k: int(v) for k, v in sorted(c.items()) if v}


__all__ = ["Stage", "StageSpec", "Work", "counter_dict", "derived_seed", "field", "prompt_text", "stable_id"]
