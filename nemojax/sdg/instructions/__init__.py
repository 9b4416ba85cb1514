"""Verifiable instructions (IFEval's 25 ids), offline and deterministic.

    from nemojax.sdg.instructions import check, evaluate
    check("punctuation:no_comma", "No commas here.")                          # True
    check("keywords:frequency", text, keyword="river", frequency=2, relation="at least")
    evaluate([{"instruction_id_list": [...], "kwargs": [...], "response": "..."}])
    # -> prompt_level_strict, instruction_level_strict, prompt_level_loose, instruction_level_loose

Modules: `checkers` (one function per id, behaviour equal to IFEval's reference), `registry`
(ids, kwargs, description templates, samplers, conflict table), `evaluate` (strict / loose,
prompt- and instruction-level), `builders` (single-turn, multi-turn, revision prompts), `text`
(word / sentence / token counting and language detection without downloads).
"""

from nemojax.sdg.instructions.builders import multi_turn, revision, single_turn
from nemojax.sdg.instructions.evaluate import check, evaluate, follows, follows_all, loose_variants
from nemojax.sdg.instructions.registry import (CONFLICTS, INSTRUCTION_IDS, INSTRUCTIONS, InstructionSpec,
                                               sample_instructions, spec)

__all__ = ["CONFLICTS", "INSTRUCTION_IDS", "INSTRUCTIONS", "InstructionSpec", "check", "evaluate", "follows",
           "follows_all", "loose_variants", "multi_turn", "revision", "sample_instructions", "single_turn", "spec"]
