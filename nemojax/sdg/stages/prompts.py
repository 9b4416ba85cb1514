"""Prompt generation, following the Nemotron-4 pipeline: macro topics -> subtopics -> prompts.

Kinds: `topics` (model-generated macro topics plus user-supplied ones), `subtopics`, `open_qa`,
`writing` (topic x material type), `closed_qa` (grounded on user documents), `math` (topic x
school level), `python` (topic x difficulty). Open QA and writing prompts can be revised (each
revision is an extra, more detailed prompt). Every list answer is parsed by `listparse` with its
hallucination guard; drops are counted by reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nemojax.config import ConfigError
from nemojax.sdg import listparse
from nemojax.sdg.stages.base import Stage, StageSpec, Work
from nemojax.sdg.store import read_jsonl


@dataclass
class ListSpec(StageSpec):
    n: int = 5  # items to ask for per request
    list_parser: str = "rules"  # rules (numbered / bulleted lines) | llm (the model re-emits YAML)
    max_tokens: int = 512

    def validate(self, key: str, cfg: Any) -> None:
        super().validate(key, cfg)
        if self.list_parser not in ("rules", "llm"):
            raise ConfigError(f"{key}.list_parser={self.list_parser!r}: choose rules or llm")
        if self.n < 1:
            raise ConfigError(f"{key}.n must be >= 1")


def topic_of(item: dict[str, Any], work: Work) -> str | None:
    """The record's topic, or None (counted as no_topic) when it has none."""
    topic = item.get("topic")
    if not isinstance(topic, str) or not topic.strip():
        work.drop("no_topic")
        return None
    return topic


async def ask_list(work: Work, spec: ListSpec, text: str) -> list[str]:
    """Ask for a list; return the guarded items (drops counted on `work`)."""
    answer = await work.ask(text)
    if answer is None:
        return []
    if spec.list_parser == "llm":
        reply = await work.ask(work.template("list_to_yaml", text=answer))
        items = listparse.yaml_items(reply) if reply is not None else None
    else:
        items = listparse.rule_items(answer) or None
    if items is None:
        work.drop("not_a_list")
        return []
    kept, dropped = listparse.guard(items, answer, limit=spec.n)
    for reason, count in dropped.items():
        work.drop(reason, count)
    return kept


@dataclass
class TopicsSpec(ListSpec):
    user_topics: list[str] = field(default_factory=list)  # merged in as they are


class Topics(Stage):
    kind = "topics"
    Spec = TopicsSpec
    needs_input = False

    def source_items(self) -> list[dict[str, Any]]:
        return [{"id": "generated"}] + [{"id": f"user-{i}", "topic": t} for i, t in enumerate(self.spec.user_topics)]

    async def process(self, item: dict[str, Any], work: Work) -> list[dict[str, Any]]:
        if "topic" in item:
            return [{"topic": item["topic"], "source": "user"}]
        items = await ask_list(work, self.spec, work.template("macro_topics", n=self.spec.n))
        return [{"topic": t, "source": "generated"} for t in items]


class Subtopics(Stage):
    kind = "subtopics"
    Spec = ListSpec

    async def process(self, item: dict[str, Any], work: Work) -> list[dict[str, Any]]:
        if (topic := topic_of(item, work)) is None:
            return []
        items = await ask_list(work, self.spec, work.template("subtopics", n=self.spec.n, topic=topic))
        return [{"topic": t, "macro_topic": topic} for t in items]


@dataclass
class QuestionSpec(ListSpec):
    revisions: int = 0  # revised (more detailed) variants added per prompt


async def with_revisions(work: Work, spec: QuestionSpec, prompts: list[str], base: dict[str, Any]
                         ) -> list[dict[str, Any]]:
    out = []
    for p in prompts:
        out.append({**base, "prompt": p})
        for _ in range(spec.revisions):
            revised = await work.ask(work.template("revise", prompt=p))
            if revised is None or not revised.strip():
                work.drop("empty_revision")
                continue
            out.append({**base, "prompt": revised.strip(), "revised_from": p})
    return out


class OpenQA(Stage):
    kind = "open_qa"
    Spec = QuestionSpec

    async def process(self, item: dict[str, Any], work: Work) -> list[dict[str, Any]]:
        if (topic := topic_of(item, work)) is None:
            return []
        qs = await ask_list(work, self.spec, work.template("open_qa", n=self.spec.n, topic=topic))
        return await with_revisions(work, self.spec, qs, {"task": "open_qa", "topic": topic})


@dataclass
class WritingSpec(QuestionSpec):
    materials: list[str] = field(default_factory=lambda: ["essay", "poem", "short story", "email", "speech",
                                                          "blog post", "product description"])
    materials_per_topic: int = 2


class Writing(Stage):
    kind = "writing"
    Spec = WritingSpec

    async def process(self, item: dict[str, Any], work: Work) -> list[dict[str, Any]]:
        if topic_of(item, work) is None:
            return []
        out = []
        k = min(self.spec.materials_per_topic, len(self.spec.materials))
        for material in work.rng.sample(self.spec.materials, k):
            tasks = await ask_list(work, self.spec, work.template("writing", n=self.spec.n, topic=item["topic"],
                                                                   material=material))
            out += await with_revisions(work, self.spec, tasks,
                                        {"task": "writing", "topic": item["topic"], "material": material})
        return out


@dataclass
class ClosedQASpec(ListSpec):
    documents: str = ""  # JSONL of documents (field `text_field`); required
    text_field: str = "text"
    max_document_chars: int = 4000

    def validate(self, key: str, cfg: Any) -> None:
        super().validate(key, cfg)
        if not self.documents:
            raise ConfigError(f"{key}.documents: give a JSONL file of documents (one {{\"{self.text_field}\": ...}} "
                              f"per line)")


class ClosedQA(Stage):
    kind = "closed_qa"
    Spec = ClosedQASpec
    needs_input = False

    def source_items(self) -> list[dict[str, Any]]:
        from nemojax.sdg.stages.io import data_path

        docs = read_jsonl(data_path(self.spec.documents))
        out = []
        for n, d in enumerate(docs, start=1):
            text = d.get(self.spec.text_field)
            if not isinstance(text, str) or not text.strip():
                raise ConfigError(f"{self.spec.documents}:{n}: no string field {self.spec.text_field!r}")
            out.append({"id": str(d.get("id", n)), "document": text[:self.spec.max_document_chars]})
        return out

    async def process(self, item: dict[str, Any], work: Work) -> list[dict[str, Any]]:
        doc = item["document"]
        qs = await ask_list(work, self.spec, work.template("closed_qa", n=self.spec.n, document=doc))
        return [{"task": "closed_qa", "prompt": work.template("closed_qa_prompt", document=doc, question=q),
                 "question": q, "document_id": item["id"]} for q in qs]


@dataclass
class LevelSpec(ListSpec):
    levels: list[str] = field(default_factory=list)  # default per kind (school levels / difficulties)
    levels_per_topic: int = 1


class _Leveled(Stage):
    Spec = LevelSpec
    default_levels: tuple[str, ...] = ()

    async def process(self, item: dict[str, Any], work: Work) -> list[dict[str, Any]]:
        if topic_of(item, work) is None:
            return []
        levels = list(self.spec.levels or self.default_levels)
        out = []
        for level in work.rng.sample(levels, min(self.spec.levels_per_topic, len(levels))):
            problems = await ask_list(work, self.spec, work.template(self.kind, n=self.spec.n, topic=item["topic"],
                                                                      level=level))
            out += [{"task": self.kind, "prompt": p, "topic": item["topic"], "level": level} for p in problems]
        return out


class Math(_Leveled):
    kind = "math"
    default_levels = ("elementary school", "middle school", "high school", "university")


class Python(_Leveled):
    kind = "python"
    default_levels = ("beginner", "intermediate", "advanced")
