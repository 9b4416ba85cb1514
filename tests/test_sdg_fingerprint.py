"""A stage whose configuration, client, model or data changed since it ran is refused with the
keys that changed, never silently reused; `--redo STAGE` runs it and the stages reading it again
(the old outputs set aside), and leaves the others alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from nemojax.cli import main
from nemojax.sdg.config import build_pipeline
from nemojax.sdg.fingerprint import describe_change, fingerprints


def write_pipeline(tmp: Path, **stage_overrides: dict) -> Path:
    src = tmp / "prompts.jsonl"
    if not src.exists():
        src.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Question {i}"}) + "\n" for i in range(3)))
    cfg = {"run_dir": str(tmp / "run"), "seed": 0, "progress": False,
           "clients": {"a": {"type": "scripted", "rules": [["Question (\\d+)", "Answer \\1"]]}},
           "stages": {"prompts": {"kind": "read", "path": str(src)},
                      "answers": {"kind": "respond"},
                      "sft": {"kind": "export_sft"},
                      "other": {"kind": "respond", "input": "prompts", "max_tokens": 9}}}
    path = tmp / "p.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def sdg(path: Path, *args: str) -> int:
    return main(["sdg", "run", str(path), *args, "--no-progress"])


def test_changed_stage_key_is_refused_by_name_and_redo_reruns_it_and_its_readers(tmp_path, capsys):
    """Mutants killed: a finished stage skipped without comparing its fingerprint (the issue:
    `stages.answers.n=3` kept the n=1 outputs with exit 0); --redo that leaves the stages reading
    the redone one stale, or redoes unrelated ones."""
    path = write_pipeline(tmp_path)
    run = tmp_path / "run"
    assert sdg(path) == 0
    before = {p.name: p.read_bytes() for p in run.glob("*.jsonl")}
    capsys.readouterr()

    assert sdg(path, "stages.answers.n=2") == 1
    err = capsys.readouterr().err
    assert "stage 'answers' was run with a different configuration: stages.answers.n (1 -> 2)" in err
    assert "--redo answers" in err
    assert {p.name: p.read_bytes() for p in run.glob("*.jsonl")} == before

    assert sdg(path, "stages.answers.n=2", "--redo", "answers") == 0
    err = capsys.readouterr().err
    assert "redo: set aside the previous outputs of answers, sft in" in err
    skipped = {json.loads(line)["stage"] for line in err.splitlines() if line.startswith("{") and '"skipped"' in line}
    assert skipped == {"prompts", "other"}
    answers = [json.loads(line) for line in (run / "answers.jsonl").read_text().splitlines()]
    assert [len(a["responses"]) for a in answers] == [2, 2, 2]
    assert len((run / "sft.jsonl").read_text().splitlines()) == 6  # the reader was redone too
    assert [p.name for p in (run / ".replaced").glob("*/answers.jsonl")] == ["answers.jsonl"]
    assert sdg(path, "stages.answers.n=2") == 0  # the new configuration is now the recorded one


@pytest.mark.parametrize("override, named", [
    ("clients.a.rules=[[Question, Other]]", "clients.a.rules"),
    ("seed=1", "seed (0 -> 1)"),
    ("stages.answers.temperature=0.7", "stages.answers.temperature (0.0 -> 0.7)"),
])
def test_changed_client_seed_or_sampling_is_refused(tmp_path, capsys, override, named):
    """Mutant killed: a fingerprint without the client (the issue: it left out client and model),
    the seed or the sampling parameters."""
    path = write_pipeline(tmp_path)
    assert sdg(path) == 0
    capsys.readouterr()
    assert sdg(path, override) == 1
    assert named in capsys.readouterr().err


def test_changed_input_file_is_refused(tmp_path, capsys):
    path = write_pipeline(tmp_path)
    assert sdg(path) == 0
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"id": "q0", "prompt": "Something else"}) + "\n")
    capsys.readouterr()
    assert sdg(path) == 1
    assert f"stage 'prompts' was run with a different configuration: files.path={tmp_path / 'prompts.jsonl'}" in \
        capsys.readouterr().err


def engine_pipeline(checkpoint: Path) -> dict:
    return {"clients": {"gen": {"type": "engine", "checkpoint": str(checkpoint)}},
            "stages": {"p": {"kind": "read", "path": "configs/sdg/seed_prompts.jsonl"},
                       "a": {"kind": "respond"}, "b": {"kind": "export_sft"}}}


def test_model_identity_weights_step_and_upstream(tmp_path):
    """An engine client's fingerprint holds the resolved checkpoint, its training step and a digest
    of the weights: new weights at the same path, or a newer step in a run directory, change it,
    and a stage reading a changed stage changes with it. Mutants killed: a model identity that is
    the path string only; a fingerprint that ignores the stages it reads."""
    lm = tmp_path / "lm"
    _save(lm, seed=0)
    first = fingerprints(build_pipeline(engine_pipeline(lm)), {})
    assert first["a"]["clients"]["gen"]["model"]["path"] == str((lm / "params").resolve())
    assert first["p"]["clients"] == {}  # read calls no model
    _save(lm, seed=1)  # other weights at the same path
    second = fingerprints(build_pipeline(engine_pipeline(lm)), {})
    assert describe_change("a", first["a"], second["a"]).startswith("clients.gen.model.weights (")
    assert describe_change("p", first["p"], second["p"]) == ""
    assert describe_change("b", first["b"], second["b"]) == "the stage it reads, 'a', changed"

    run = tmp_path / "train_run"
    _save(run / "checkpoints" / "10", seed=0)
    older = fingerprints(build_pipeline(engine_pipeline(run)), {})
    _save(run / "checkpoints" / "20", seed=2)
    newer = fingerprints(build_pipeline(engine_pipeline(run)), {})
    change = describe_change("a", older["a"], newer["a"])
    assert "clients.gen.model.step (10 -> 20)" in change and "clients.gen.model.weights" in change


def _save(path: Path, seed: int) -> None:
    """A checkpoint directory as the fingerprint sees it (config.yaml + params/ files): the
    identity reads files only, so random bytes stand in for orbax's array files."""
    import numpy as np

    (path / "params" / "d").mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text("model: {hidden_size: 64}\n")
    weights = np.random.default_rng(seed).bytes(3 << 20)  # over 2 MiB: its head and tail are read
    (path / "params" / "d" / "chunk").write_bytes(weights)
