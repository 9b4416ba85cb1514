"""Freeze IFEval's reference verdicts into tests/data/ifeval_reference.json for the default tests.

    pip install -e '.[reference]'          # lm-eval[ifeval]==0.4.13, the reference
    python scripts/ifeval_reference_table.py [--texts 100] [--seed 7] [--out tests/data/ifeval_reference.json]

The default suite must not need lm-eval, yet should compare our checkers with it: this script runs
the reference (lm-eval's copy of google-research's instruction_following_eval, offline, see
tests/ifeval_reference.py) once on hand cases (the sentence-splitting quirks, the `*`-stripped
loose variants, every id's pass / fail cases) and on `--texts` generated responses x all 25 ids
with fuzzed kwargs (edge values included), strict and loose, and writes each verdict with the
kwargs the reference drew when it replaced one at random. tests/test_sdg_instructions_reference.py
checks ours against the table in a few seconds; its slow test runs the live comparison on 3000
texts. Deterministic for a seed; regenerate when the reference version changes.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from nemojax.sdg.instructions import INSTRUCTION_IDS  # noqa: E402
from tests.ifeval_fuzz import fuzz_kwargs, fuzz_texts  # noqa: E402
from tests.ifeval_reference import load  # noqa: E402
from tests.sdg_responses import CASES  # noqa: E402

DEVANAGARI = "नदी उत्सव कल सुबह शुरू होगा"  # six words, each with vowel signs or a virama

# (instruction id, kwargs, response): sentence counting on doubled and spaced end punctuation, and
# responses that pass loose mode only through the `*`-stripped variants
HAND_CASES = [
    *[("length_constraints:number_sentences", {"num_sentences": n, "relation": rel}, text)
      for text in ("That is great!!", "Why??", "Why?? Because.", "He ran. . . She ran.", "Really?!",
                   "Wow!!! Yes?! No?!?", "Wait... what?", "Dr. Smith arrived. He sat.", "Hi . . . there. Ok.")
      for n, rel in ((2, "at least"), (2, "less than"), (4, "at least"))],
    ("startend:end_checker", {"end_phrase": "Bye."}, "**Bye.**"),
    ("startend:quotation", {}, '*"quoted"*'),
    ("detectable_format:json_format", {}, '**{"a": 1}**'),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a note."}, "**Write a note.** Here it is."),
    ("detectable_content:number_placeholders", {"num_placeholders": 0}, "No placeholders."),
    ("detectable_content:number_placeholders", {"num_placeholders": 0}, "[a] [b] [c] [d]"),
    ("keywords:existence", {"keywords": []}, "Anything at all."),
    ("keywords:forbidden_words", {"forbidden_words": []}, "Anything at all."),
    # NLTK's word tokenizer matches with the `regex` engine: a Devanagari word with vowel signs is one word
    *[("length_constraints:number_words", {"num_words": n, "relation": "less than"}, DEVANAGARI) for n in (6, 7)],
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--texts", type=int, default=100)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "data" / "ifeval_reference.json")
    args = ap.parse_args(argv)
    ref = load()
    cases = list(HAND_CASES)
    for instruction_id, (kwargs, passing, failing) in CASES.items():
        cases += [(instruction_id, kwargs, r) for r in passing + failing]
    rng = random.Random(args.seed)
    for text in fuzz_texts(args.texts, seed=args.seed):
        cases += [(i, fuzz_kwargs(rng, i, text), text) for i in INSTRUCTION_IDS]
    texts: dict[str, int] = {}
    rows, disagreements = [], 0
    for instruction_id, kwargs, text in cases:
        row = [texts.setdefault(text, len(texts)), instruction_id, kwargs]
        for loose in (False, True):
            outcome = ref.compare(instruction_id, kwargs, text, loose)
            disagreements += not outcome.agrees
            row += [outcome.reference, outcome.drawn]
        rows.append(row)
    given = argv if argv is not None else sys.argv[1:]
    meta = {"command": " ".join(["python scripts/ifeval_reference_table.py", *given]),
            "seed": args.seed, "texts": args.texts, "lm_eval": version("lm_eval"), "nltk": version("nltk"),
            "langdetect_seed": 0, "rows": len(rows),
            "row": "[text index, instruction id, kwargs, strict verdict, strict drawn kwargs, loose verdict, "
                   "loose drawn kwargs]; a verdict is the reference's bool or the exception it raised; drawn "
                   "kwargs are what the reference used after replacing some at random (null if it did not)"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write('{"meta": ' + json.dumps(meta) + ',\n"texts": [\n')
        f.write(",\n".join(json.dumps(t, ensure_ascii=False) for t in texts) + '\n],\n"rows": [\n')
        f.write(",\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n]}\n")
    print(json.dumps({"out": str(args.out), "rows": len(rows), "texts": len(texts),
                      "disagreements_with_ours": disagreements}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
