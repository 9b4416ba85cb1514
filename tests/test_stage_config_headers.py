"""The numbers each post-training stage config states in its header are the committed measurements'
(docs/results/stage_configs_from_tiny.json, written by benchmarks/stage_configs_cpu.py, and in [ ] the
earlier run docs/results/stage_configs_from_tiny_09c1ecd.json): a rerun that updates a results file
but not the headers, or the reverse, fails here."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOW = json.loads((ROOT / "docs/results/stage_configs_from_tiny.json").read_text())
EARLIER = json.loads((ROOT / "docs/results/stage_configs_from_tiny_09c1ecd.json").read_text())
STAGES = ["sft_code", "sft_general", "reward", "dpo", "rpo"]


def header(stage: str) -> str:
    lines = (ROOT / f"configs/{stage}.yaml").read_text().splitlines()
    return " ".join(ln.lstrip("# ") for ln in lines if ln.startswith("#"))


def claims(r: dict) -> dict[str, list[str]]:
    """The figures each header states, formatted as it states them, from one results file."""
    acc, loss = r["same_held_out_data"]["preference_accuracy"], r["same_held_out_data"]["assistant_token_loss"]
    fin = r["final_validation_metrics"]
    rpo = [fin[f"rpo/round_{k}"]["val_pref_accuracy"] for k in (1, 2, 3)]
    return {
        "sft_code": [f"{acc['tiny']:.3f} -> {acc['sft_code']:.3f}", f"{loss['tiny']:.2f} -> {loss['sft_code']:.2f}"],
        "sft_general": [f"{acc['sft_code']:.3f} -> {acc['sft_general']:.3f}",
                        f"{loss['sft_code']:.2f} -> {loss['sft_general']:.2f}"],
        "dpo": [f"{acc['sft_general']:.3f} -> {acc['dpo']:.3f}", f"{loss['sft_general']:.2f} -> {loss['dpo']:.2f}",
                f"{fin['dpo']['val_accuracy']:.2f}"],
        "rpo": [f"{acc['dpo']:.3f} -> " + " / ".join(f"{a:.3f}" for a in rpo),
                f"{loss['dpo']:.2f} -> {loss['rpo/round_3']:.2f}"],
        "reward": [f"{fin['reward']['val_pairwise_accuracy']:.3f}", f"{fin['reward']['val_pearson/reward']:.2f}"],
    }


@pytest.mark.parametrize("stage", STAGES)
def test_header_names_the_measured_commit(stage: str) -> None:
    assert f"commit {NOW['commit']}," in header(stage) and EARLIER["commit"] in header(stage)
    assert NOW["example_records_leak_audit"]["hits"] == 0


@pytest.mark.parametrize("stage", STAGES)
def test_header_states_both_runs_figures(stage: str) -> None:
    text = header(stage)
    for now, earlier in zip(claims(NOW)[stage], claims(EARLIER)[stage]):  # "a -> b [c -> d]", "0.567 [0.613]"
        assert f"{now} [{earlier}]" in text, (now, earlier)


def test_reward_header_states_each_attribute() -> None:
    fin = NOW["final_validation_metrics"]["reward"]
    text = header("reward")
    for attr in ("coherence", "verbosity", "helpfulness", "complexity", "correctness"):
        assert f"{attr} {fin['val_pearson/' + attr]:.2f}" in text, attr
