"""`dedup` stage: exact + MinHash near-duplicate removal and decontamination (nemojax/sdg/dedup.py).

With `group_field` (e.g. `family`), kept / dropped counts per group go to
`<run_dir>/<stage>.by_group.json`, so a filter that removes one kind of prompt wholesale shows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from nemojax.config import ConfigError
from nemojax.sdg.dedup import Decontaminator, counts_by_group, dedup_verdicts
from nemojax.sdg.stages.base import Stage, StageSpec, Work
from nemojax.sdg.store import read_jsonl, write_json_atomic


def record_text(rec: dict[str, Any], fields: list[str]) -> str:
    """The text a record is compared on: the named fields, else its prompt / messages / instruction."""
    if fields:
        return "\n".join(str(rec.get(f, "")) for f in fields)
    for key in ("prompt", "instruction", "question", "topic"):
        if isinstance(rec.get(key), str):
            return rec[key]
    if isinstance(rec.get("prompt"), list):
        return "\n".join(m.get("content", "") for m in rec["prompt"])
    if isinstance(rec.get("messages"), list):
        return "\n".join(m.get("content", "") for m in rec["messages"] if m.get("role") == "user")
    return ""


@dataclass
class DedupSpec(StageSpec):
    fields: list[str] = field(default_factory=list)  # compare on these fields (default: the prompt)
    exact: bool = True
    near: bool = True
    threshold: float = 0.8  # MinHash LSH Jaccard threshold
    num_perm: int = 128
    shingle: int = 3  # words per shingle
    eval_file: str = ""  # JSONL evaluation set to decontaminate against (empty: no decontamination)
    eval_fields: list[str] = field(default_factory=lambda: ["prompt"])  # its prompt text(s): every check
    eval_answer_fields: list[str] = field(default_factory=list)  # its answers: distinctive n-gram overlap only
    ngram: int = 13  # decontamination n-gram size (words)
    template_fraction: float = 0.01  # an n-gram in more than this share of eval + pool texts is template
    overlap: float = 0.8  # share of an eval text's distinctive n-grams a record must hold to be contaminated
    span: int = 8  # ... or this many of them (a long verbatim passage of a long eval text)
    group_field: str = ""  # count kept / dropped per value of this record field (e.g. family)

    uses_client = False

    def validate(self, key: str, cfg: Any) -> None:
        super().validate(key, cfg)
        if not 0 < self.threshold <= 1:
            raise ConfigError(f"{key}.threshold must be in (0, 1]")
        if not 0 < self.template_fraction <= 1 or not 0 < self.overlap <= 1:
            raise ConfigError(f"{key}: template_fraction and overlap must be in (0, 1]")
        if self.ngram < 1 or self.span < 1:
            raise ConfigError(f"{key}: ngram and span must be >= 1")


class Dedup(Stage):
    kind = "dedup"
    Spec = DedupSpec
    mode = "global"

    async def run_global(self, items: list[dict[str, Any]], work: Work) -> list[dict[str, Any]]:
        s = self.spec
        texts = [record_text(r, s.fields) for r in items]
        decon = None
        if s.eval_file:
            evals = read_jsonl(s.eval_file)
            joined = lambda r, fs: "\n".join(str(r.get(f, "")) for f in fs)  # noqa: E731
            decon = Decontaminator([joined(r, s.eval_fields) for r in evals], n=s.ngram,
                                   answers=[joined(r, s.eval_answer_fields) for r in evals] if s.eval_answer_fields
                                   else (), template_fraction=s.template_fraction, overlap=s.overlap,
                                   span=s.span).fit_templates(texts)
        verdicts = dedup_verdicts(texts, decontaminate=decon, exact=s.exact, near=s.near, threshold=s.threshold,
                                  num_perm=s.num_perm, shingle=s.shingle, seed=work.ctx.seed + 1)
        for reason in verdicts:
            if reason:
                work.drop(reason)
        if s.group_field:
            groups = counts_by_group([r.get(s.group_field, "(none)") for r in items], verdicts)
            write_json_atomic(work.ctx.run_dir / f"{self.name}.by_group.json", groups)
        return [it for it, v in zip(items, verdicts) if v is None]
