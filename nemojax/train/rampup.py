"""Batch-size ramp-up by consumed tokens, as in the Nemotron-4 run (768 -> 1536 -> 2304).

`data.rampup` is a list of stages `{batch_size, until_tokens}`: stage i's batch size is used
while fewer than `until_tokens` tokens have been consumed; after the last stage the run uses
`data.global_batch_size`. Tokens are counted as `batch_size * seq_len` per step (padding
included), so the whole schedule -- batch size and token count at every step -- is a pure
function of the step number. That is what makes exact resume across a stage boundary trivial:
a restored step number is enough to know the batch size of every later step.

The micro-batch (`data.micro_batch_size`) stays fixed across stages and the number of
accumulation steps varies, so the jitted step sees one distinct input shape per stage and
compiles at most once per stage, never per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nemojax.config import ConfigError, DataConfig


@dataclass(frozen=True)
class Stage:
    """Batch size `batch_size` while consumed tokens < `until_tokens` (None: forever)."""

    batch_size: int
    until_tokens: int | None


class BatchSchedule:
    """Global batch size, micro-batch split and consumed tokens as functions of the step."""

    def __init__(self, data: DataConfig):
        self.seq_len = data.seq_len
        stages: list[Stage] = []
        last_until = 0
        for i, raw in enumerate(data.rampup):
            key = f"data.rampup[{i}]"
            if not isinstance(raw, dict) or set(raw) - {"batch_size", "until_tokens"} \
                    or "batch_size" not in raw or "until_tokens" not in raw:
                raise ConfigError(f"{key} must be a mapping with exactly the keys batch_size and "
                                  f"until_tokens, got {raw!r}")
            bs, until = raw["batch_size"], raw["until_tokens"]
            if isinstance(until, float) and until.is_integer():
                until = int(until)
            if not isinstance(bs, int) or isinstance(bs, bool) or bs <= 0:
                raise ConfigError(f"{key}.batch_size must be a positive integer, got {bs!r}")
            if not isinstance(until, int) or isinstance(until, bool) or until <= last_until:
                raise ConfigError(f"{key}.until_tokens must be an integer greater than the previous "
                                  f"stage's ({last_until}), got {until!r}")
            stages.append(Stage(bs, until))
            last_until = until
        if data.global_batch_size <= 0:
            raise ConfigError(f"data.global_batch_size must be positive, got {data.global_batch_size}")
        stages.append(Stage(data.global_batch_size, None))
        self.stages = tuple(stages)
        if data.micro_batch_size < 0:
            raise ConfigError(f"data.micro_batch_size must be >= 0, got {data.micro_batch_size}")
        self.fixed_micro = data.micro_batch_size or 0
        for i, st in enumerate(self.stages):
            key = f"data.rampup[{i}].batch_size" if st.until_tokens is not None else "data.global_batch_size"
            if self.fixed_micro and st.batch_size % self.fixed_micro:
                raise ConfigError(f"{key}={st.batch_size} is not a multiple of data.micro_batch_size="
                                  f"{self.fixed_micro}; gradient accumulation needs whole micro-batches")
        # First step of each stage, so lookups are O(stages) closed form, not a replay.
        self._start_steps: list[int] = []
        self._start_tokens: list[int] = []
        step = tokens = 0
        for st in self.stages:
            self._start_steps.append(step)
            self._start_tokens.append(tokens)
            if st.until_tokens is not None:
                n = max(0, math.ceil((st.until_tokens - tokens) / (st.batch_size * self.seq_len)))
                step += n
                tokens += n * st.batch_size * self.seq_len

    def stage_index(self, step: int) -> int:
        """Index of the stage that step `step` (0-based: the step about to run) belongs to."""
        idx = 0
        for i, start in enumerate(self._start_steps):
            if step >= start and (i == len(self.stages) - 1 or self._start_steps[i + 1] > start):
                idx = i
        return idx

    def batch_size(self, step: int) -> int:
        """Global batch size (sequences) of 0-based step `step`."""
        return self.stages[self.stage_index(step)].batch_size

    def tokens_before(self, step: int) -> int:
        """Tokens consumed by steps 0..step-1 (i.e. after `step` completed steps)."""
        i = self.stage_index(step)
        return self._start_tokens[i] + (step - self._start_steps[i]) * self.stages[i].batch_size * self.seq_len

    def micro_batch(self, step: int) -> int:
        return self.fixed_micro or self.batch_size(step)

    def accum_steps(self, step: int) -> int:
        return self.batch_size(step) // self.micro_batch(step)

    def distinct_shapes(self) -> set[tuple[int, int]]:
        """(accum, micro) shapes the step will be compiled for: one per distinct batch size."""
        return {(st.batch_size // (self.fixed_micro or st.batch_size), self.fixed_micro or st.batch_size)
                for st in self.stages}
