"""Stage kinds of the SDG pipeline, by the `kind:` name a pipeline YAML uses.

| kind | reads | writes |
|---|---|---|
| read | a JSONL file (`path`) | its records |
| merge | earlier stages (`inputs`) | their records, concatenated |
| topics | (nothing; `user_topics` merged in) | {topic} |
| subtopics | {topic} | {topic, macro_topic} |
| open_qa, writing, math, python | {topic} | {prompt, task, ...} |
| closed_qa | a JSONL of documents (`documents`) | {prompt, question, document_id} |
| instruction_prompts | {prompt} | {messages, instruction_id_list, kwargs, variant} |
| respond | {prompt} or {messages} | + responses [{client, sample, messages}] |
| instruction_filter | instruction records with responses | those with the passing responses |
| dialogue, two_turn | {prompt} | {messages, persona} |
| reward_filter | records with responses / messages | {messages, reward} at or above threshold |
| preference | records with >= 2 responses | {prompt, chosen, rejected, [*_reward], judge} |
| genetic_instruct | seed problems | {messages, instruction, genetic} |
| dedup | any records | the records kept |
| verify_filter | records with responses | those with the responses a Python verifier accepts |
| select | any records | those whose `field` is one of `values` |
| export_sft, export_preference | conversations / preference records | the post-training schemas |
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def stage_kinds() -> dict[str, type]:
    from nemojax.sdg.stages import dedup, dialogue, genetic, instruct, io, judges, prompts, respond, verify

    classes = [io.Read, io.Merge, io.ExportSFT, io.ExportPreference, prompts.Topics, prompts.Subtopics, prompts.OpenQA,
               prompts.Writing, prompts.ClosedQA, prompts.Math, prompts.Python, instruct.InstructionPrompts,
               instruct.InstructionFilter, respond.Respond, dialogue.Dialogue, dialogue.TwoTurn,
               judges.RewardFilter, judges.Preference, genetic.GeneticInstruct, dedup.Dedup,
               verify.VerifyFilter, verify.Select]
    return {c.kind: c for c in classes}
