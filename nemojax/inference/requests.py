"""What goes into the engine (a `Request`), what comes out (one `Completion` per sample), and the
per-token increments a streaming request gets while it runs (`TokenDelta`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nemojax.inference.sampling import SamplingParams

TopLogprobs = list[tuple[int, float]]  # (token id, log-prob), most likely first


@dataclass
class Request:
    """A tokenized prompt and how to sample it. `id` is the caller's, passed through untouched.

    stream: keep per-token increments for `Engine.take_deltas` while the request runs (servers
    streaming tokens to a client); off, the request only produces its `Completion`s.
    """

    id: Any
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    stream: bool = False


@dataclass
class Completion:
    """One finished sample of one request.

    output_ids: the generated tokens, without the stop token or the tokens that carry a stop
    string. text: their decoded text with any stop string and what follows removed (None when
    the engine has no tokenizer). finish_reason: "stop" (stop token / stop string) or "length"
    (max_tokens reached or the cache is full). logprobs: model log-prob of each output token,
    when the request asked for them; top_logprobs: per output token, the request's
    `top_logprobs` most likely (token, log-prob) pairs. prompt_logprobs: per prompt token, its
    log-prob given the tokens before it (None for the first), when asked; prompt_top_logprobs
    likewise. cached_tokens: prompt tokens whose keys/values were reused (prefix cache or a
    sibling sample) instead of computed. timing: when the sample passed each stage (Timing).
    """

    request_id: Any
    sample_index: int
    prompt_tokens: int
    output_ids: list[int]
    finish_reason: str
    text: str | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[TopLogprobs] | None = None
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[TopLogprobs | None] | None = None
    cached_tokens: int = 0
    timing: "Timing | None" = field(default=None, compare=False, repr=False)

    @property
    def completion_tokens(self) -> int:
        return len(self.output_ids)


@dataclass
class Timing:
    """When one sample passed each stage, in `time.monotonic()` seconds of the engine's process
    (what a server's queue / prefill / decode / inter-token latency metrics are made of).

    queued: submitted; scheduled: admitted into a slot; first_token: its first token reached
    the host (None when it generated none: prompt scoring); finished: its Completion was made.
    token_gaps: one (seconds per token, tokens) pair per decode call that gave the sample tokens
    after its first: the call's wall time since the sample's previous tokens (or, for the call
    that gave the first token, since the call started) split evenly over the tokens it gave,
    since one call produces several tokens per host round-trip.
    """

    queued: float
    scheduled: float
    first_token: float | None
    finished: float
    token_gaps: list[tuple[float, int]] = field(default_factory=list)


@dataclass
class TokenDelta:
    """One token a running sample of a streaming request generated (`Engine.take_deltas`).

    text: the output text that became final with this token. A token is released only once
    its text is certain: not an incomplete UTF-8 character, and not possibly the start of a
    stop string (those tokens are released later, or dropped with the stop string). So the
    deltas of a sample are always a prefix of its final `Completion` (which follows them), and
    their texts concatenate to a prefix of `Completion.text`; `text` may be "" (e.g. the first
    bytes of a multi-byte character, whose text comes with its last byte).
    """

    request_id: Any
    sample_index: int
    token_id: int
    logprob: float
    top_logprobs: TopLogprobs | None
    text: str
