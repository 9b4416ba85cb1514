"""Reward scoring over HTTP, two ways (the app routes here when it has a reward model).

- Native: `POST /v1/reward` with {"messages": [...]} (one conversation) or {"conversations":
  [[...], ...]}, each ending with the assistant response to score. Answer:
  {"object": "list", "model", "data": [{"object": "reward", "index", "attributes": {name: score},
  "reward": weighted sum}]}.
- NVIDIA's reward model API: `POST /v1/chat/completions` with the reward model's name and
  messages [..., user, assistant]. Answer: a chat completion whose `choices[0].message.content`
  is "helpfulness:3.1,correctness:...", and whose `choices[0].logprobs.content` holds one entry
  per attribute, {"token": name, "logprob": score}, as Nemotron-4-340B-Reward's endpoint
  answers, so clients written for it (the SDG pipeline's HTTP reward client) work unchanged.

Scoring runs on a worker thread (one call at a time: the scorer is not re-entrant) so the event
loop keeps serving generation meanwhile.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

from nemojax.data.chat_template import ChatFormatError
from nemojax.serve.protocol import APIError, bad, normalize_messages

MAX_CONVERSATIONS = 256
_lock = threading.Lock()


def _score(scorer: Any, conversations: list[list[dict[str, str]]]) -> list[dict[str, float]]:
    with _lock:
        return scorer.score(conversations)


async def _score_async(server: Any, conversations: list[list[dict[str, str]]], param: str) -> list[dict[str, float]]:
    try:
        return await asyncio.to_thread(_score, server.reward, conversations)
    except ChatFormatError as e:
        raise APIError(400, f"{param}: {e}", param=param) from None


def _check_model(server: Any, body: dict[str, Any]) -> None:
    model = body.get("model")
    if model is not None and model != server.reward_name:
        raise APIError(404, f"model {model!r} does not exist; the reward model is {server.reward_name!r}",
                       param="model", code="model_not_found")


async def native_reward(server: Any, body: dict[str, Any]) -> dict[str, Any]:
    for name in body:
        if name not in ("model", "messages", "conversations"):
            raise bad(name, "unrecognized request argument (give messages or conversations)")
    _check_model(server, body)
    if ("messages" in body) == ("conversations" in body):
        raise bad("messages", "give exactly one of messages (one conversation) or conversations (a list)")
    if "messages" in body:
        convs, param = [normalize_messages(body["messages"])], "messages"
    else:
        raw = body["conversations"]
        if not isinstance(raw, list) or not raw:
            raise bad("conversations", "must be a non-empty list of conversations")
        if len(raw) > MAX_CONVERSATIONS:
            raise bad("conversations", f"at most {MAX_CONVERSATIONS} per request")
        convs, param = [], "conversations"
        for i, c in enumerate(raw):
            try:
                convs.append(normalize_messages(c))
            except APIError as e:
                raise APIError(400, f"conversations[{i}]: {e.message}", param="conversations") from None
    scores = await _score_async(server, convs, param)
    attrs = list(server.reward.attributes)
    return {"object": "list", "model": server.reward_name,
            "data": [{"object": "reward", "index": i, "attributes": {a: s[a] for a in attrs}, "reward": s["reward"]}
                     for i, s in enumerate(scores)]}


async def chat_reward(server: Any, body: dict[str, Any]) -> dict[str, Any]:
    """NVIDIA's reward shape through chat completions (see the module docstring)."""
    _check_model(server, body)
    allowed = {"model", "messages", "stream", "n", "max_tokens", "temperature", "top_p", "user"}
    for name in body:
        if name not in allowed:
            raise bad(name, "unrecognized request argument for a reward model")
    if body.get("stream"):
        raise bad("stream", "a reward model's answer is not streamed")
    messages = normalize_messages(body.get("messages"))
    if messages[-1]["role"] != "assistant":
        raise bad("messages", "a reward request ends with the assistant response to score")
    [scores] = await _score_async(server, [messages], "messages")
    attrs = list(server.reward.attributes)
    encode = getattr(server.reward, "encode", None)
    prompt_tokens = len(encode(messages)[0]) if encode is not None else 0
    content = ",".join(f"{a}:{scores[a]}" for a in attrs)
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": server.reward_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "logprobs": {"content": [{"token": a, "logprob": scores[a], "bytes": list(a.encode()),
                                                   "top_logprobs": []} for a in attrs]},
                         "finish_reason": "length"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(attrs),
                      "total_tokens": prompt_tokens + len(attrs)}}
