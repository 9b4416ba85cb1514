"""Ground truth by program: responses checked by a Python verifier, and records selected by field.

`verify_filter` keeps the responses a verifier accepts (rejection sampling: several samples per
prompt, the correct ones become SFT data); `preference` with `judge: verifier` pairs an accepted
response (chosen) with a rejected one. A verifier is named `module:function` and called as
`function(item, [response texts]) -> [bool]` on all of an item's responses at once, so a costly
check (running code in a sandbox) is paid once per item; `nemojax.align.tasks:verify_record`
checks the toy world's tasks. `select` keeps records whose field has one of the given values
(e.g. the code family, for the code SFT stage).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import importlib
from dataclasses import dataclass
from typing import Any, Callable

from nemojax.config import ConfigError
from nemojax.sdg.stages.base import Stage, StageSpec, Work

Verifier = Callable[[dict[str, Any], list[str]], list[bool]]


@functools.lru_cache(maxsize=None)
def load_verifier(name: str) -> Verifier:
    """`module:function` -> the function; ConfigError naming what is wrong otherwise."""
    module, sep, attr = name.partition(":")
    if not sep or not module or not attr:
        raise ConfigError(f"verifier {name!r} must look like package.module:function")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"verifier {name!r} cannot be loaded: {e}") from None
    if not callable(fn):
        raise ConfigError(f"verifier {name!r} is not a function")
    return fn


def final_texts(item: dict[str, Any]) -> list[str]:
    return [r["messages"][-1]["content"] for r in item.get("responses", []) if r.get("messages")]


async def verdicts(verifier: str, item: dict[str, Any], texts: list[str]) -> list[bool]:
    """Run the verifier off the event loop (it may block, e.g. on a sandbox subprocess)."""
    if not texts:
        return []
    out = await asyncio.to_thread(load_verifier(verifier), item, texts)
    if len(out) != len(texts):
        raise ConfigError(f"verifier {verifier} returned {len(out)} verdicts for {len(texts)} responses")
    return [bool(v) for v in out]


@dataclass
class VerifyFilterSpec(StageSpec):
    verifier: str = ""  # package.module:function(item, [texts]) -> [bool]
    max_kept: int = 0  # keep at most this many accepted responses per record (0 = all)

    uses_client = False

    def validate(self, key: str, cfg: Any) -> None:
        super().validate(key, cfg)
        if not self.verifier:
            raise ConfigError(f"{key}.verifier is required, e.g. nemojax.align.tasks:verify_record")
        load_verifier(self.verifier)
        if self.max_kept < 0:
            raise ConfigError(f"{key}.max_kept must be >= 0")


class VerifyFilter(Stage):
    """Keeps the responses the verifier accepts, with each record's pass rate under `verified`."""

    kind = "verify_filter"
    Spec = VerifyFilterSpec

    async def process(self, item: dict[str, Any], work: Work) -> list[dict[str, Any]]:
        responses = [r for r in item.get("responses", []) if r.get("messages")]
        if not responses:
            work.drop("no_responses")
            return []
        ok = await verdicts(self.spec.verifier, item, [r["messages"][-1]["content"] for r in responses])
        kept = [r for r, v in zip(responses, ok) if v]
        work.drop("verifier_rejected", len(responses) - len(kept))
        if self.spec.max_kept and len(kept) > self.spec.max_kept:
            work.drop("over_max_kept", len(kept) - self.spec.max_kept)
            kept = kept[: self.spec.max_kept]
        if not kept:
            return []
        return [{**item, "responses": kept, "verified": {"passed": sum(ok), "total": len(ok)}}]


@dataclass
class SelectSpec(StageSpec):
    field: str = ""  # the record field to look at
    values: list[Any] = dataclasses.field(default_factory=list)  # keep records whose field is one of these
    exclude: bool = False  # keep the others instead

    uses_client = False

    def validate(self, key: str, cfg: Any) -> None:
        super().validate(key, cfg)
        if not self.field or not self.values:
            raise ConfigError(f"{key}: select needs field and a non-empty values list")


class Select(Stage):
    kind = "select"
    Spec = SelectSpec

    async def process(self, item: dict[str, Any], work: Work) -> list[dict[str, Any]]:
        hit = item.get(self.spec.field) in self.spec.values
        if hit != self.spec.exclude:
            return [item]
        work.drop("not_selected")
        return []
