"""Verifiable-instruction prompts: attach IFEval instructions to prompts (single-turn,
multi-turn, second-turn revision) and keep only responses that follow them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nemojax.config import ConfigError
from nemojax.sdg.instructions import builders, follows_all, sample_instructions
from nemojax.sdg.stages.base import Stage, StageSpec, Work, prompt_text

VARIANTS = ("single_turn", "multi_turn", "revision")


@dataclass
class InstructSpec(StageSpec):
    min_instructions: int = 1
    max_instructions: int = 3
    variants: list[str] = field(default_factory=lambda: ["single_turn"])  # drawn uniformly per prompt
    allowed: list[str] = field(default_factory=list)  # instruction ids to draw from (default: all 25)
    followups: int = 1  # multi_turn: later user turns, taken from the following input prompts

    def validate(self, key: str, cfg: Any) -> None:
        super().validate(key, cfg)
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad or not self.variants:
            raise ConfigError(f"{key}.variants: {bad or 'empty'}; choose from {VARIANTS}")
        if not 1 <= self.min_instructions <= self.max_instructions:
            raise ConfigError(f"{key}: need 1 <= min_instructions <= max_instructions")
        from nemojax.sdg.instructions import spec

        for i in self.allowed:
            try:
                spec(i)
            except ValueError as e:
                raise ConfigError(f"{key}.allowed: {e}") from None


class InstructionPrompts(Stage):
    kind = "instruction_prompts"
    Spec = InstructSpec

    def prepare(self, items: list[dict[str, Any]]) -> None:
        self._prompts = [prompt_text(it) for it in items]
        self._index = {it["id"]: i for i, it in enumerate(items)}

    async def process(self, item: dict[str, Any], work: Work) -> list[dict[str, Any]]:
        prompt = prompt_text(item)
        if not prompt.strip():
            work.drop("no_prompt")
            return []
        n = work.rng.randint(self.spec.min_instructions, self.spec.max_instructions)
        chosen = sample_instructions(work.rng, prompt, n, allowed=self.spec.allowed or None)
        variant = work.rng.choice(self.spec.variants)
        tmpl = {k: work.ctx.templates[k] for k in ("single_turn", "multi_turn", "revision") if k in work.ctx.templates}
        if variant == "single_turn":
            rec = builders.single_turn(prompt, chosen, templates=tmpl)
        elif variant == "multi_turn":
            i = self._index[item["id"]]
            later = [self._prompts[(i + k) % len(self._prompts)] for k in range(1, self.spec.followups + 1)]
            rec = builders.multi_turn([prompt] + later, chosen, templates=tmpl)
        else:
            first = await work.ask(prompt)
            if first is None:
                return []
            rec = builders.revision(prompt, first, chosen, templates=tmpl)
        rec["variant"] = variant
        for k in ("task", "topic"):
            if k in item:
                rec[k] = item[k]
        return [rec]


@dataclass
class InstructionFilterSpec(StageSpec):
    loose: bool = False  # IFEval's loose mode instead of strict

    uses_client = False


def judged_turns(item: dict[str, Any], conversation: list[dict[str, str]]) -> list[str]:
    """The assistant turns the instructions apply to: every turn after the rules were stated
    (multi-turn), else the final one."""
    answers = [m["content"] for m in conversation if m["role"] == "assistant"]
    if item.get("variant") == "multi_turn":
        return answers
    return answers[-1:]


class InstructionFilter(Stage):
    """Keeps the responses whose judged turns follow every instruction."""

    kind = "instruction_filter"
    Spec = InstructionFilterSpec

    async def process(self, item: dict[str, Any], work: Work) -> list[dict[str, Any]]:
        if "instruction_id_list" not in item:
            work.drop("no_instructions")
            return []
        kept = []
        for r in item.get("responses", []):
            turns = judged_turns(item, r["messages"])
            ok = bool(turns) and all(all(follows_all(item["instruction_id_list"], item["kwargs"], t,
                                                     loose=self.spec.loose)) for t in turns)
            if ok:
                kept.append(r)
            else:
                work.drop("failed_instructions")
        return [{**item, "responses": kept}] if kept else []
