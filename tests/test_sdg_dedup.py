"""Exact and MinHash near-duplicate removal, n-gram decontamination, and the dedup stage."""

from __future__ import annotations

import json

from nemojax.sdg.dedup import Decontaminator, dedup_texts
from tests.sdg_helpers import read, run_pipeline

BASE = "the quick brown fox jumps over the lazy dog near the quiet river bank at dawn today"


def test_exact_near_and_threshold():
    texts = [BASE, BASE.upper() + "!!", BASE.replace("today", "tomorrow"), "a completely different sentence here"]
    kept, dropped = dedup_texts(texts, threshold=0.7)
    assert kept == [0, 3] and dropped == {"exact_duplicate": 1, "near_duplicate": 1}
    kept, dropped = dedup_texts(texts, near=False)
    assert kept == [0, 2, 3] and dropped == {"exact_duplicate": 1}
    kept, _ = dedup_texts(texts, threshold=0.95)  # one changed word: trigram Jaccard 14/16 < 0.95
    assert kept == [0, 2, 3]


def test_decontamination():
    d = Decontaminator(["What is the capital of France? Answer in one word please, thank you very much indeed.",
                        "2+2"], n=8)
    assert d.contaminated("Quiz: what is the capital of france answer in one word, now!")
    assert not d.contaminated("What is the capital of Spain? Answer briefly.")
    assert d.contaminated("compute 2 + 2 quickly")  # a short eval text counts when it occurs whole
    assert not d.contaminated("compute 22 quickly")


def test_dedup_stage(tmp_path):
    src = tmp_path / "p.jsonl"
    rows = [{"prompt": BASE}, {"prompt": BASE + "."}, {"prompt": "What is the capital of France? Tell me."},
            {"prompt": "Something new entirely, unlike the others."}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    evals = tmp_path / "eval.jsonl"
    evals.write_text(json.dumps({"prompt": "what is the capital of france"}) + "\n")
    run, summary = run_pipeline(tmp_path, {
        "prompts": {"kind": "read", "path": str(src)},
        "dd": {"kind": "dedup", "eval_file": str(evals), "ngram": 13},
    }, {})
    assert [r["prompt"] for r in read(run, "dd")] == [BASE, rows[3]["prompt"]]
    assert summary["dd"]["dropped"] == {"contaminated": 1, "exact_duplicate": 1}
