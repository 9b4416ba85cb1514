"""`dedup` stage: exact + MinHash near-duplicate removal and n-gram decontamination (dedup.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nemojax.config import ConfigError
from nemojax.sdg.dedup import Decontaminator, dedup_texts
from nemojax.sdg.stages.base import Stage, StageSpec, Work
from nemojax.sdg.store import read_jsonl


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
    eval_fields: list[str] = field(default_factory=lambda: ["prompt"])
    ngram: int = 13  # decontamination n-gram size (words)

    uses_client = False

    def validate(self, key: str, cfg: Any) -> None:
        super().validate(key, cfg)
        if not 0 < self.threshold <= 1:
            raise ConfigError(f"{key}.threshold must be in (0, 1]")


class Dedup(Stage):
    kind = "dedup"
    Spec = DedupSpec
    mode = "global"

    async def run_global(self, items: list[dict[str, Any]], work: Work) -> list[dict[str, Any]]:
        s = self.spec
        decon = None
        if s.eval_file:
            texts = ["\n".join(str(r.get(f, "")) for f in s.eval_fields) for r in read_jsonl(s.eval_file)]
            decon = Decontaminator(texts, n=s.ngram)
        kept, dropped = dedup_texts([record_text(r, s.fields) for r in items], decontaminate=decon, exact=s.exact,
                                    near=s.near, threshold=s.threshold, num_perm=s.num_perm, shingle=s.shingle,
                                    seed=work.ctx.seed + 1)
        for reason, n in dropped.items():
            work.drop(reason, n)
        return [items[i] for i in kept]
