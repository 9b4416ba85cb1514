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

Reward requests share generation's admission, timeout and drain (`Server.admit`): each
conversation takes one place in the server's one bounded queue (429 with Retry-After when it is
full), a request past the request timeout gets 504 and a request whose client disconnects is
dropped, and while draining new ones get 503. Scoring runs on one thread of its own
(`ScoringQueue`: the scorer is not re-entrant, and the event loop keeps serving meanwhile), a
batch at a time, so dropped work stops at the next batch and never starts if still queued.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
import uuid
from typing import Any

from nemojax.data.chat_template import ChatFormatError
from nemojax.serve.protocol import APIError, bad, normalize_messages

MAX_CONVERSATIONS = 256
Conversations = list[list[dict[str, str]]]


class _Dropped(Exception):
    """The request was dropped (timeout, client gone) before its scoring finished."""


class ScoringQueue:
    """Scores conversations on one thread, first come first served, a batch at a time."""

    def __init__(self, scorer: Any) -> None:
        self.scorer = scorer
        self.batch = max(1, int(getattr(scorer, "batch_size", 8)))
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nemojax-reward")

    def _run(self, conversations: Conversations, dropped: threading.Event) -> list[dict[str, float]]:
        # Similar lengths batched together (the scorer pads each batch to its longest).
        order = sorted(range(len(conversations)), key=lambda i: sum(len(m["content"]) for m in conversations[i]))
        out: list[Any] = [None] * len(conversations)
        for start in range(0, len(order), self.batch):
            if dropped.is_set():
                raise _Dropped()
            idx = order[start:start + self.batch]
            try:
                scores = self.scorer.score([conversations[i] for i in idx])
            except ChatFormatError as e:  # name the conversation in the request, not in the batch
                at = str(e).split(":", 1)
                if at[0].startswith("conversations[") and at[0].endswith("]"):
                    e = ChatFormatError(f"conversations[{idx[int(at[0][14:-1])]}]:{at[1]}")
                raise e from None
            for i, row in zip(idx, scores):
                out[i] = row
        return out

    async def score(self, server: Any, conversations: Conversations, param: str, http: Any) -> list[dict[str, float]]:
        """Scores in input order; 429 / 503 / 504 / client gone as the module docstring says."""
        ticket = server.admit(len(conversations), "conversations")
        dropped = threading.Event()
        future = self._pool.submit(self._run, conversations, dropped)
        loop = asyncio.get_running_loop()

        def stopped(_: Any) -> None:  # the places are given back when the work has stopped
            with contextlib.suppress(RuntimeError):  # the app (and its loop) ended meanwhile
                loop.call_soon_threadsafe(ticket.release)

        future.add_done_callback(stopped)
        try:
            return await server.until_done(asyncio.wrap_future(future), http)
        except ChatFormatError as e:
            raise APIError(400, f"{param}: {e}", param=param) from None
        finally:
            if not future.done():
                future.cancel()  # still queued: never runs
                dropped.set()  # running: stops after its current batch

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _check_model(server: Any, body: dict[str, Any]) -> None:
    model = body.get("model")
    if model is not None and model != server.reward_name:
        raise APIError(404, f"model {model!r} does not exist; the reward model is {server.reward_name!r}",
                       param="model", code="model_not_found")


async def native_reward(server: Any, body: dict[str, Any], http: Any = None) -> dict[str, Any]:
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
    scores = await server.scoring.score(server, convs, param, http)
    attrs = list(server.reward.attributes)
    return {"object": "list", "model": server.reward_name,
            "data": [{"object": "reward", "index": i, "attributes": {a: s[a] for a in attrs}, "reward": s["reward"]}
                     for i, s in enumerate(scores)]}


async def chat_reward(server: Any, body: dict[str, Any], http: Any = None) -> dict[str, Any]:
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
    [scores] = await server.scoring.score(server, [messages], "messages", http)
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
