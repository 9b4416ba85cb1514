"""`nemojax generate` end to end on a tiny HF checkpoint with the shipped 4096-piece tokenizer."""

from __future__ import annotations

import json

import pytest
from hf_tiny import save_tiny_hf

from nemojax.cli import main
from nemojax.data.tokenizer import load_tokenizer

LINES = [
    {"id": "greedy", "prompt": "The quick brown fox", "temperature": 0, "max_tokens": 6},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
     "n": 2, "logprobs": True},
    {"prompt_ids": [2, 100, 200, 300], "temperature": 0.7, "seed": 5},
    "this line is not JSON",
    {"prompt": "bad temperature", "temperature": -1},
    {"id": "both", "prompt": "x", "prompt_ids": [1]},
    {"id": 7, "prompt": "numeric id", "top_k": 3, "top_p": 0.9, "min_p": 0.05, "metadata": {"src": "a"}},
    {"id": "typo", "prompt": "x", "temprature": 0.5},  # a misspelt key is named, never ignored
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    _, path = save_tiny_hf(tmp_path_factory.mktemp("hf") / "tiny", seed=1, vocab_size=4096)
    return path


def write_input(path, lines):
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))


def run(ckpt, inp, out, *extra):
    return main(["generate", "--checkpoint", str(ckpt), "--input", str(inp), "--output", str(out),
                 "--max-len", "64", "--max-tokens", "8", "--batch-slots", "2", "--decode-steps", "4",
                 "--no-progress", *extra])


def read(out):
    return [json.loads(l) for l in out.read_text().splitlines()]


def test_generate_outputs_resume_and_bad_lines(ckpt, tmp_path, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, LINES)
    # fail mode: the three bad lines are reported with their line numbers and nothing runs
    assert run(ckpt, inp, out, "--on-bad-line", "fail") == 1
    err = capsys.readouterr().err
    for n in (4, 5, 6, 8):
        assert f"in.jsonl:{n}:" in err
    assert "temperature" in err and "exactly one of" in err and not out.exists()
    assert "unknown key(s) 'temprature' (did you mean temperature?)" in err

    assert run(ckpt, inp, out) == 0  # skip mode
    recs = {r["id"]: r for r in read(out)}
    assert set(recs) == {"greedy", 2, 3, 7}  # missing ids become line numbers
    tok = load_tokenizer("builtin")
    g = recs["greedy"]
    assert g["prompt_tokens"] == len(tok.encode("The quick brown fox", bos=True))
    assert g["completion_tokens"] == len(g["output_ids"]) <= 6
    assert g["finish_reason"] in ("stop", "length") and g["text"] == tok.decode(g["output_ids"])
    chat = recs[2]
    assert len(chat["text"]) == len(chat["output_ids"]) == len(chat["logprobs"]) == 2
    assert all(len(lp) == len(ids) for lp, ids in zip(chat["logprobs"], chat["output_ids"]))
    turn = tok.special_id("<extra_id_1>")
    assert all(turn not in ids for ids in chat["output_ids"])  # generation stops at <extra_id_1>
    assert recs[3]["prompt_tokens"] == 4 and "logprobs" not in recs[3]
    assert recs[7]["metadata"] == {"src": "a"}

    # Resume: keep two finished lines and a torn third, as after a kill mid-write.
    lines = out.read_text().splitlines()
    out.write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][: len(lines[2]) // 2])
    assert run(ckpt, inp, out) == 0
    again = read(out)
    assert sorted(map(str, (r["id"] for r in again))) == sorted(map(str, recs))  # nothing lost or twice
    for r in again:  # per-line seeds derive from (--seed, id): reruns sample the same tokens
        assert r["output_ids"] == recs[r["id"]]["output_ids"]
    assert run(ckpt, inp, out) == 0 and len(read(out)) == 4  # all done: nothing appended


def test_generate_rejects_missing_input(ckpt, tmp_path, capsys):
    assert run(ckpt, tmp_path / "nope.jsonl", tmp_path / "o.jsonl") == 2
    assert "not found" in capsys.readouterr().err


def test_generate_rejects_a_missing_checkpoint_in_one_line(tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    write_input(inp, LINES[:1])
    assert run(tmp_path / "no-such-ckpt", inp, tmp_path / "o.jsonl") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "checkpoint not found" in err and "Traceback" not in err


def test_summary_reports_programs_and_the_help_shows_defaults(ckpt, tmp_path, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, [{"id": i, "prompt": f"Prompt number {i}", "temperature": 0} for i in range(3)])
    assert run(ckpt, inp, out) == 0
    summary = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert summary["written"] == 3 and summary["completion_tokens"] > 0
    programs = summary["programs"]
    assert programs["compiled"] + programs["loaded"] >= 3 and programs["seconds"] >= 0  # weights, prefill, decode
    assert summary["startup_seconds"] >= 0 and summary["prompt_tokens"] > 0
    for command, shown in ((["generate"], "(default: 32)"), (["serve"], "(default: 8000)"),
                           (["convert", "to-hf"], "default 5GB")):
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert shown in text, (command, text[-400:])
