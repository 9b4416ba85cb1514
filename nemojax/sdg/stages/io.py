"""Records in and datasets out: `read` (a user JSONL as a stage), `export_sft`, `export_preference`.

Exports write exactly the post-training input schemas (docs/DATA.md):
SFT `{"messages": [{"role", "content"}, ...]}`; preference `{"prompt", "chosen", "rejected",
"chosen_reward"?, "rejected_reward"?}` plus the judge's evidence under "judge".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nemojax.config import ConfigError
from nemojax.sdg.stages.base import Stage, StageSpec, Work
from nemojax.sdg.store import read_jsonl


def data_path(path: str) -> str:
    """A data file as given, else relative to the repository root (so shipped examples such as
    configs/sdg/seed_prompts.jsonl work from any directory)."""
    from pathlib import Path

    from nemojax.config import CONFIG_DIR

    if Path(path).exists() or Path(path).is_absolute():
        return path
    alt = CONFIG_DIR.parent / path
    return str(alt) if alt.exists() else path


@dataclass
class ReadSpec(StageSpec):
    path: str = ""  # JSONL file; each object becomes a record (its "id" kept, else the line number)

    uses_client = False

    def validate(self, key: str, cfg: Any) -> None:
        super().validate(key, cfg)
        if not self.path:
            raise ConfigError(f"{key}.path: give the JSONL file to read")


class Read(Stage):
    kind = "read"
    Spec = ReadSpec
    needs_input = False

    def source_items(self) -> list[dict[str, Any]]:
        out = []
        for n, rec in enumerate(read_jsonl(data_path(self.spec.path)), start=1):
            rec.setdefault("id", n)
            out.append(rec)
        return out

    async def process(self, item: dict[str, Any], work: Work) -> list[dict[str, Any]]:
        rec = dict(item)
        rec["source_id"] = rec.pop("id")
        return [rec]


@dataclass
class MergeSpec(StageSpec):
    inputs: list[str] = field(default_factory=list)  # earlier stages whose records are concatenated, in order

    uses_client = False

    def validate(self, key: str, cfg: Any) -> None:
        super().validate(key, cfg)
        missing = [i for i in self.inputs if i not in cfg.stages]
        if not self.inputs or missing:
            raise ConfigError(f"{key}.inputs: name earlier stages to merge ({missing or 'none given'} "
                              f"not among {', '.join(cfg.stages)})")


class Merge(Stage):
    kind = "merge"
    Spec = MergeSpec
    needs_input = False

    def source_items(self) -> list[dict[str, Any]]:
        out = []
        for name in self.spec.inputs:
            done = self.ctx.work_dir / f"{name}.done.json"
            if not done.exists():
                raise ConfigError(f"merge: stage {name!r} has not finished")
            for rec in read_jsonl(self.ctx.run_dir / f"{name}.jsonl"):
                out.append({**rec, "id": f"{name}/{rec.get('id', len(out))}", "merged_from": name})
        return out

    async def process(self, item: dict[str, Any], work: Work) -> list[dict[str, Any]]:
        return [{k: v for k, v in item.items() if k != "id"}]


def conversations(item: dict[str, Any]) -> list[list[dict[str, str]]]:
    """Complete conversations held by a record: its responses' `messages`, else its own."""
    if item.get("responses"):
        return [r["messages"] for r in item["responses"] if r.get("messages")]
    msgs = item.get("messages")
    if msgs and msgs[-1].get("role") == "assistant":
        return [msgs]
    return []


@dataclass
class ExportSpec(StageSpec):
    system: str = ""  # a system message put first in every SFT conversation (empty: none)
    keep_fields: list[str] = field(default_factory=list)  # extra record fields copied into each line

    uses_client = False


class ExportSFT(Stage):
    kind = "export_sft"
    Spec = ExportSpec

    async def process(self, item: dict[str, Any], work: Work) -> list[dict[str, Any]]:
        convs = conversations(item)
        if not convs:
            work.drop("no_conversation")
        out = []
        for conv in convs:
            msgs = [{"role": m["role"], "content": m["content"]} for m in conv]
            if self.spec.system and msgs[0]["role"] != "system":
                msgs = [{"role": "system", "content": self.spec.system}] + msgs
            if any(not m["content"].strip() for m in msgs if m["role"] == "assistant"):
                work.drop("empty_assistant_turn")
                continue
            out.append({"messages": msgs, **{k: item[k] for k in self.spec.keep_fields if k in item}})
        return out


class ExportPreference(Stage):
    kind = "export_preference"
    Spec = ExportSpec

    async def process(self, item: dict[str, Any], work: Work) -> list[dict[str, Any]]:
        if not all(isinstance(item.get(k), str) for k in ("chosen", "rejected")) or "prompt" not in item:
            work.drop("not_a_preference_record")
            return []
        rec = {"prompt": item["prompt"], "chosen": item["chosen"], "rejected": item["rejected"]}
        for k in ("chosen_reward", "rejected_reward", "judge"):
            if k in item:
                rec[k] = item[k]
        rec.update({k: item[k] for k in self.spec.keep_fields if k in item})
        return [rec]
