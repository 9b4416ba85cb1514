"""`respond`: answers for every prompt from one or several generators (n samples each).

Input records hold a `prompt` or `messages` (ending with a user turn) and, for multi-turn
instruction prompts, `followups` (later user turns, answered in sequence). Each response keeps
the whole conversation, so SFT export and judges see exactly what was generated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nemojax.config import ConfigError
from nemojax.sdg.llm import LLMError
from nemojax.sdg.stages.base import Stage, StageSpec, Work


@dataclass
class RespondSpec(StageSpec):
    clients: list[str] = field(default_factory=list)  # generators (default: [client])
    n: int = 1  # samples per generator
    max_tokens: int = 512

    def validate(self, key: str, cfg: Any) -> None:
        super().validate(key, cfg)
        for c in self.clients:
            if c not in cfg.clients:
                raise ConfigError(f"{key}.clients: {c!r} is not declared; clients: {', '.join(cfg.clients)}")
        if self.n < 1:
            raise ConfigError(f"{key}.n must be >= 1")


def opening(item: dict[str, Any]) -> list[dict[str, str]] | None:
    if isinstance(item.get("messages"), list) and item["messages"]:
        return [dict(m) for m in item["messages"]]
    if isinstance(item.get("prompt"), str) and item["prompt"].strip():
        return [{"role": "user", "content": item["prompt"]}]
    if isinstance(item.get("prompt"), list) and item["prompt"]:
        return [dict(m) for m in item["prompt"]]
    return None


class Respond(Stage):
    kind = "respond"
    Spec = RespondSpec

    async def process(self, item: dict[str, Any], work: Work) -> list[dict[str, Any]]:
        start = opening(item)
        if start is None or start[-1]["role"] != "user":
            work.drop("no_prompt")
            return []
        responses = []
        for client in self.spec.clients or [self.spec.client or next(iter(work.ctx.clients), "")]:
            name = client
            try:
                first = await work.generate(work.request(messages=start, n=self.spec.n), client)
            except LLMError as e:
                work.drop(e.reason)
                continue
            for i, text in enumerate(first.texts):
                conv = start + [{"role": "assistant", "content": text}]
                try:
                    for follow in item.get("followups", []):
                        conv.append({"role": "user", "content": follow})
                        r = await work.generate(work.request(messages=conv), client)
                        conv.append({"role": "assistant", "content": r.text})
                except LLMError as e:
                    work.drop(e.reason)
                    continue
                if not conv[-1]["content"].strip():
                    work.drop("empty_response")
                    continue
                responses.append({"client": name, "sample": i, "messages": conv})
        if not responses:
            return []
        return [{**{k: v for k, v in item.items() if k != "id"}, "responses": responses}]
