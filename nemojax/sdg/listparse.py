"""Turning a model's list answer into items, rejecting what the model did not actually say.

Two parsers:
- `rules`: numbered (`1.`, `2)`) or bulleted (`-`, `*`, `•`) lines of the answer;
- `llm`: a second request asks the model to re-emit the list as YAML (NeMo-Curator's approach);
  the reply must be a YAML list of strings.
Either way every item passes the hallucination guard: after whitespace is collapsed it must occur
verbatim (case-insensitively) in the original answer. Drops are counted by reason:
not_a_list, empty_item, hallucinated_item, duplicate_item.
"""

from __future__ import annotations

import collections
import re

import yaml

_ITEM = re.compile(r"^\s*(?:\d{1,3}\s*[.)]|[-*•])\s+(.*\S)\s*$")


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


def rule_items(answer: str) -> list[str]:
    """The text of each numbered / bulleted line (markers and wrapping quotes or ** removed)."""
    out = []
    for line in answer.splitlines():
        m = _ITEM.match(line)
        if m:
            item = m.group(1).strip()
            for a, b in (('"', '"'), ("**", "**"), ("'", "'")):
                if len(item) > len(a) + len(b) and item.startswith(a) and item.endswith(b):
                    item = item[len(a):-len(b)].strip()
            out.append(item)
    return out


def yaml_items(reply: str) -> list[str] | None:
    """A YAML list of strings from a reply (a ```yaml fence is allowed), else None."""
    body = reply.strip()
    fence = re.match(r"^```(?:ya?ml)?\s*\n(.*?)\n?```\s*$", body, re.DOTALL)
    if fence:
        body = fence.group(1)
    try:
        data = yaml.safe_load(body)
    except yaml.YAMLError:
        return None
    if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
        return None
    return [x.strip() for x in data]


def guard(items: list[str], answer: str, limit: int | None = None
          ) -> tuple[list[str], collections.Counter[str]]:
    """Keep items that occur verbatim in `answer`; the first `limit` kept at most."""
    source = _norm(answer)
    kept: list[str] = []
    seen: set[str] = set()
    dropped: collections.Counter[str] = collections.Counter()
    for item in items:
        key = _norm(item)
        if not key:
            dropped["empty_item"] += 1
        elif key not in source:
            dropped["hallucinated_item"] += 1
        elif key in seen:
            dropped["duplicate_item"] += 1
        elif limit is not None and len(kept) >= limit:
            dropped["over_limit"] += 1
        else:
            seen.add(key)
            kept.append(" ".join(item.split()))
    return kept, dropped
