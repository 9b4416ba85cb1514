"""`nemojax reward score` end to end: every input form, bad lines, resume after a torn write."""

from __future__ import annotations

import dataclasses
import json

import pytest

from nemojax.checkpoint import save_model
from nemojax.cli import main
from nemojax.config import ModelConfig, RewardConfig
from nemojax.data.tokenizer import load_tokenizer
from nemojax.inference.reward import RewardScorer
from nemojax.model.reward import make_model

CFG = ModelConfig(vocab_size=4096, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                  ffn_hidden_size=64, init_std=0.05, max_seq_len=64, scan_layers=False,
                  reward=RewardConfig(enabled=True, attributes=["helpfulness", "verbosity"],
                                      weights={"helpfulness": 1.0, "verbosity": -0.5}))
USER = [{"role": "user", "content": "Name a colour."}]
LINES = [
    {"id": "hs2", "prompt": "Name a colour.", "response": "Blue.", "helpfulness": 3},
    {"messages": USER + [{"role": "assistant", "content": "Red, of course."}]},
    "not json",
    {"prompt": "Name a colour.", "chosen": "Green.", "rejected": "I cannot.", "chosen_reward": 9},
    {"id": "no-answer", "messages": USER},
    {"id": 5, "prompt": "x " * 100, "response": "long prompt"},
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("rm") / "reward"
    save_model(make_model(CFG, seed=4), CFG, path)
    return path


def _run(ckpt, inp, out, *extra):
    return main(["reward", "score", "--checkpoint", str(ckpt), "--input", str(inp), "--output", str(out),
                 "--batch-size", "2", "--chunk", "2", "--no-progress", *extra])


def test_reward_score_forms_bad_lines_and_resume(ckpt, tmp_path, capsys) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in LINES))
    assert _run(ckpt, inp, out, "--on-bad-line", "fail") == 1
    err = capsys.readouterr().err
    assert "in.jsonl:3: not valid JSON" in err and "in.jsonl:5: " in err and "assistant" in err
    assert not out.exists()

    assert _run(ckpt, inp, out) == 0
    assert json.loads(capsys.readouterr().err.strip().splitlines()[-1])["truncated"] == 1
    recs = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(recs) == {"hs2", 2, 4, 5}
    scorer = RewardScorer.from_checkpoint(ckpt, tokenizer=load_tokenizer("builtin"), batch_size=2)
    want = scorer.score([USER + [{"role": "assistant", "content": t}] for t in ("Blue.", "Red, of course.",
                                                                                 "Green.", "I cannot.")])
    for got, w in ((recs["hs2"], want[0]), (recs[2], want[1])):
        assert got["scores"] == pytest.approx({k: w[k] for k in ("helpfulness", "verbosity")}, abs=1e-5)
        assert got["reward"] == pytest.approx(w["reward"], abs=1e-5)
        assert got["reward"] == pytest.approx(got["scores"]["helpfulness"] - 0.5 * got["scores"]["verbosity"], abs=1e-5)
    pair = recs[4]
    assert pair["chosen_reward"] == pytest.approx(want[2]["reward"], abs=1e-5)  # replaces the input's 9
    assert pair["rejected_reward"] == pytest.approx(want[3]["reward"], abs=1e-5)
    assert set(pair["chosen_scores"]) == {"helpfulness", "verbosity"}
    assert recs["hs2"]["helpfulness"] == 3  # input fields kept

    # Resume: keep two finished lines and a torn third, as after a kill mid-write.
    full = out.read_text().splitlines()
    out.write_text(full[0] + "\n" + full[1] + "\n" + full[2][:15])
    assert _run(ckpt, inp, out) == 0
    again = out.read_text().splitlines()
    assert len(again) == 4 and sorted(again) == sorted(full)
    assert _run(ckpt, inp, out) == 0 and len(out.read_text().splitlines()) == 4  # nothing left to do


def test_reward_score_refuses_a_language_model(tmp_path, capsys) -> None:
    lm_cfg = dataclasses.replace(CFG, reward=RewardConfig())
    save_model(make_model(lm_cfg), lm_cfg, tmp_path / "lm")
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps(LINES[0]) + "\n")
    assert _run(tmp_path / "lm", inp, tmp_path / "out.jsonl") == 2
    assert "reward model" in capsys.readouterr().err
    assert _run(tmp_path / "lm", tmp_path / "missing.jsonl", tmp_path / "out.jsonl") == 2
