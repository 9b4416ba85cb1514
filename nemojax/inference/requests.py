"""What goes into the engine (a `Request`) and what comes out (one `Completion` per sample)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nemojax.inference.sampling import SamplingParams


@dataclass
class Request:
    """A tokenized prompt and how to sample it. `id` is the caller's, passed through untouched."""

    id: Any
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class Completion:
    """One finished sample of one request.

    output_ids: the generated tokens, without the stop token or the tokens that carry a stop
    string. text: their decoded text with any stop string and what follows removed (None when
    the engine has no tokenizer). finish_reason: "stop" (stop token / stop string) or "length"
    (max_tokens reached or the cache is full). logprobs: model log-prob of each output token,
    when the request asked for them.
    """

    request_id: Any
    sample_index: int
    prompt_tokens: int
    output_ids: list[int]
    finish_reason: str
    text: str | None = None
    logprobs: list[float] | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.output_ids)
