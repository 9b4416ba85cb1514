"""`nemojax sdg run` killed with SIGKILL mid-stage (twice: in a map stage and inside Genetic
Instruct) and rerun: nothing lost, nothing duplicated, and every output byte-identical to an
uninterrupted run. Also: a torn last ledger line, a changed stage config, config errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from nemojax.config import ConfigError
from nemojax.sdg.config import load_pipeline

N = 40


def pipeline(tmp_path: Path, run_dir: Path) -> Path:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Question {i}: tell me a fact."}) + "\n"
                               for i in range(N)))
    cfg = {
        "run_dir": str(run_dir), "seed": 3, "max_in_flight": 4, "progress": False,
        "clients": {
            "a": {"type": "scripted", "delay_s": 0.03,
                  "rules": [["Question (\\d+)", "Fact \\1, with a comma."],
                            ["Here is a programming problem:\\n\\n(.*?)\\n\\nWrite", "\\1 but harder"],
                            ["Here are some programming problems", "A brand new problem"],
                            ["Solve the programming problem", "```python\nassert True\n```"],
                            ["Rate how correct", "7"]], "default": "A"},
            "b": {"type": "scripted", "delay_s": 0.03, "rules": [["Question (\\d+)", "Fact \\1 without commas"]],
                  "default": "B"},
        },
        "stages": {
            "prompts": {"kind": "read", "path": str(prompts)},
            "answers": {"kind": "respond", "clients": ["a", "b"]},
            "pairs": {"kind": "preference", "judge": "llm", "client": "a"},
            "dpo": {"kind": "export_preference"},
            "gi": {"kind": "genetic_instruct", "input": "prompts", "colonies": 2, "generations": 3, "offspring": 4,
                   "target_size": 100, "client": "a"},
        },
    }
    path = tmp_path / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def cli(path: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, "-m", "nemojax.cli", "sdg", "run", str(path), *extra, "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def kill_when(proc: subprocess.Popen, path: Path, n: int) -> None:
    deadline = time.time() + 120
    while lines(path) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def outputs(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run_dir.glob("*.jsonl"))}


def test_sigkill_twice_then_resume_equals_an_uninterrupted_run(tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref = cli(pipeline(tmp_path, ref_dir))
    assert ref.wait(timeout=300) == 0, ref.communicate()

    path = pipeline(tmp_path, run_dir)
    ledger = run_dir / ".work" / "answers.ledger.jsonl"
    kill_when(cli(path), ledger, 15)  # mid-way through the respond stage
    done_before = lines(ledger) - 1
    assert 0 < done_before < N and not (run_dir / "answers.jsonl").exists()
    with ledger.open("ab") as f:  # a write torn by the kill
        f.write(b'{"in": "q39", "out": [{"prompt": "trunc')
    kill_when(cli(path), run_dir / ".work" / "gi" / "candidates.ledger.jsonl", 6)  # inside Genetic Instruct
    assert (run_dir / "dpo.jsonl").exists() and not (run_dir / "gi.jsonl").exists()
    last = cli(path)
    out, err = last.communicate(timeout=300)
    assert last.returncode == 0, err

    assert outputs(run_dir) == outputs(ref_dir)
    answers = [json.loads(l) for l in (run_dir / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == N and len({a["id"] for a in answers}) == N
    entries = [json.loads(l) for l in ledger.read_text().splitlines()[1:]]
    prompt_ids = [json.loads(l)["id"] for l in (run_dir / "prompts.jsonl").read_text().splitlines()]
    assert sorted(e["in"] for e in entries) == sorted(prompt_ids)  # each item recorded exactly once
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["answers"]["items_in"] == N and summary["answers"]["kept"] == N
    assert summary["answers"]["resumed_items"] >= done_before
    assert summary["pairs"]["kept"] + sum(summary["pairs"]["dropped"].values()) == N
    stage_lines = [json.loads(l) for l in err.decode().splitlines() if l.startswith("{")]
    assert [s["stage"] for s in stage_lines] == ["prompts", "answers", "pairs", "dpo", "gi"]
    assert all(s.get("skipped") for s in stage_lines[:4]) and not stage_lines[4].get("skipped")


def test_changed_stage_config_is_refused_and_config_errors_name_the_key(tmp_path):
    run_dir = tmp_path / "run"
    path = pipeline(tmp_path, run_dir)
    kill_when(cli(path), run_dir / ".work" / "answers.ledger.jsonl", 3)
    changed = cli(path, "stages.answers.n=2")
    _, err = changed.communicate(timeout=120)
    assert changed.returncode == 1 and b"started with a different configuration" in err

    with pytest.raises(ConfigError, match="did you mean stages.answers.clients"):
        load_pipeline(path, ["stages.answers.client_list=[a]"])
    with pytest.raises(ConfigError, match="kind='respnd' is unknown; did you mean respond"):
        load_pipeline(path, ["stages.answers.kind=respnd"])
    with pytest.raises(ConfigError, match="input='nope' is not an earlier stage"):
        load_pipeline(path, ["stages.pairs.input=nope"])
    with pytest.raises(ConfigError, match="judge='vibes'"):
        load_pipeline(path, ["stages.pairs.judge=vibes"])
    with pytest.raises(ConfigError, match="'c' is not declared"):
        load_pipeline(path, ["stages.answers.clients=[a, c]"])
    served = load_pipeline("configs/sdg/served.yaml")
    assert served.clients["gen"].type == "openai" and list(served.stages) == list(load_pipeline(
        "configs/sdg/tiny.yaml").stages)
    from nemojax.cli import main

    assert main(["sdg", "run", str(path), f"run_dir={tmp_path / 'other'}", "clients.b.type=engine",
                 "clients.b.checkpoint=/nonexistent", "--no-progress"]) == 2
    assert main(["sdg", "run", str(path), "--only", "nope", "--no-progress"]) == 2


def test_sigterm_stops_like_train_and_a_rerun_resumes(tmp_path):
    """SIGTERM mid-stage: exit 0 (as `nemojax train` on SIGTERM) with "received SIGTERM ... Rerun
    the same command to resume", the finished items kept in the ledger, no stage output; the
    rerun completes the stage with the bytes of an uninterrupted run. Mutants killed: a SIGTERM
    handler that does not stop the stage, or that exits non-zero / silently."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Question {i}"}) + "\n" for i in range(N)))

    def small(run_dir: Path) -> Path:
        cfg = {"run_dir": str(run_dir), "seed": 3, "max_in_flight": 2, "progress": False,
               "clients": {"a": {"type": "scripted", "delay_s": 0.05, "rules": [["Question (\\d+)", "Fact \\1"]]}},
               "stages": {"prompts": {"kind": "read", "path": str(prompts)}, "answers": {"kind": "respond"}}}
        path = tmp_path / f"{run_dir.name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    from nemojax.cli import main

    assert main(["sdg", "run", str(small(tmp_path / "ref")), "--no-progress"]) == 0
    run_dir = tmp_path / "run"
    path = small(run_dir)
    ledger = run_dir / ".work" / "answers.ledger.jsonl"
    proc = cli(path)
    deadline = time.time() + 120
    while lines(ledger) < 4:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    message = err.decode().strip().splitlines()[-1]
    assert message.startswith("nemojax sdg: received SIGTERM: stopped in stage 'answers' with ")
    assert message.endswith(f"of {N} items done (what finished is kept on disk); exiting. Rerun the same command "
                            f"to resume.")
    done = int(message.split(" with ")[1].split(" of ")[0])
    assert 3 <= done < N and lines(ledger) == done + 1 and not (run_dir / "answers.jsonl").exists()
    assert main(["sdg", "run", str(path), "--no-progress"]) == 0
    assert outputs(run_dir) == outputs(tmp_path / "ref")
