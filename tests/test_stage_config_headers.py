"""The numbers each post-training stage config states in its header are the committed measurement's
(docs/results/stage_configs_from_tiny.json, written by benchmarks/stage_configs_cpu.py): a rerun
that updates the results file but not the headers, or the reverse, fails here."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = json.loads((ROOT / "docs/results/stage_configs_from_tiny.json").read_text())
# the checkpoint whose held-out preference accuracy each header reports as "before -> after"
BEFORE_AFTER = {"sft_code": ("tiny", "sft_code"), "sft_general": ("sft_code", "sft_general"),
                "dpo": ("sft_general", "dpo"), "rpo": ("dpo", "rpo/round_3")}


def header(stage: str) -> str:
    lines = (ROOT / f"configs/{stage}.yaml").read_text().splitlines()
    return " ".join(ln.lstrip("# ") for ln in lines if ln.startswith("#"))


@pytest.mark.parametrize("stage", ["sft_code", "sft_general", "reward", "dpo", "rpo"])
def test_header_names_the_measured_commit(stage: str) -> None:
    assert f"commit {RESULTS['commit']}," in header(stage)
    assert RESULTS["example_records_leak_audit"]["hits"] == 0


@pytest.mark.parametrize("stage", sorted(BEFORE_AFTER))
def test_header_states_the_measured_preference_accuracy(stage: str) -> None:
    acc = RESULTS["same_held_out_data"]["preference_accuracy"]
    before, after = BEFORE_AFTER[stage]
    assert f"{acc[before]:.3f} -> " in header(stage)
    assert f"{acc[after]:.3f}" in header(stage).split(f"{acc[before]:.3f} -> ", 1)[1]


def test_reward_header_states_the_measured_pairwise_accuracy_and_r() -> None:
    final = RESULTS["final_validation_metrics"]["reward"]
    text = header("reward")
    assert f"pairwise accuracy {final['val_pairwise_accuracy']:.3f}" in text
    assert f"weighted reward {final['val_pearson/reward']:.2f}" in text
