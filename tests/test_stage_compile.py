"""`nemojax compile` compiles a post-training stage's step (stage.kind) for a TPU topology.

Tiny model on v5p-8 (slow; needs libtpu, skipped without it): the DPO step (pairs with cached
reference log-probs in the batch) and the reward step (no LM head) compile, report their
stage, and differ from the pretraining step the way they must. docs/SCALING.md has the 340B figures.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from nemojax.cli import main

pytestmark = [pytest.mark.slow,  # three TPU compiles: minutes on a shared 2-core host
              pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                 reason="libtpu not installed: pip install 'nemojax[tpu]'")]

TINY = ["model.vocab_size=4096", "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4",
        "model.num_kv_heads=2", "model.head_dim=16", "model.ffn_hidden_size=128", "model.max_seq_len=64",
        "data.seq_len=64", "data.global_batch_size=8", "mesh.tensor=2", "mesh.data=-1"]


def compile_json(capsys, *over: str) -> dict:
    rc = main(["compile", "tiny", "--topology", "v5p-8", *TINY, *over])
    out = capsys.readouterr().out
    assert rc == 0, out
    return json.loads(out)


def test_dpo_and_reward_steps_compile_for_v5p(capsys) -> None:
    pre = compile_json(capsys)
    dpo = compile_json(capsys, "stage.kind=dpo", "stage.train=unused.jsonl")
    reward = compile_json(capsys, "stage.kind=reward", "stage.train=unused.jsonl", "model.reward.enabled=true")
    assert (pre["stage"], dpo["stage"], reward["stage"]) == ("pretrain", "dpo", "reward")
    for r in (dpo, reward):
        assert r["fits"] is True and r["memory_per_device"]["temp_bytes"] > 0
    # same weights as pretraining for DPO; the reward model drops the vocab-sized LM head
    assert dpo["state_bytes_per_device"]["params"] == pre["state_bytes_per_device"]["params"]
    assert reward["state_bytes_per_device"]["params"] < pre["state_bytes_per_device"]["params"]
    # a pair row is two sequences: the DPO step's activations exceed the pretraining step's
    assert dpo["memory_per_device"]["temp_bytes"] > pre["memory_per_device"]["temp_bytes"]
