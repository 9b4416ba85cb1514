"""`nemojax align` keeps results honest without training anything here (the subprocess steps and
the evaluation are replaced by recorders): a rerun with the same config runs nothing; another
seed or a changed stage is refused, naming exactly the finished steps it changes (that step and
every one built on it), and `rerun_changed` moves them aside and runs them again; changed
evaluation settings re-evaluate without retraining; an interrupted step whose config changed is
named; the leak audit counts every file trained on in summary.json and stops a run whose
training data holds an evaluation task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nemojax.align.config import load_align_config
from nemojax.align.loop import AlignError, AlignLoop

WORLD = ("world.spec={seed: 1, families: [strings, lists], train_levels: [1, 2], eval_levels: [1, 2], "
         "pretrain_documents: 120, seed_conversations: 40, eval_per_family: 8, prompts_per_pool: 30, pools: 2, "
         "reward_records: 8}")
CORPUS = "\"data.sources=[{path: '{world}/pretrain/corpus.jsonl', weight: 1.0}]\""
BASE = [WORLD, f"bases={{weak: {{config: configs/align/toy_base.yaml, overrides: [model.num_layers=2, {CORPUS}]}}}}",
        "iterations=[{base: weak}, {base: weak}]", "pipeline=[general_sft, dpo]"]


class Recorder:
    """Stands in for the subprocess steps and the evaluation; records what ran."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.ran: list[str] = []
        self.evaluated: list[str] = []
        monkeypatch.setattr(AlignLoop, "_run", lambda loop, *a: self._run(loop, *a))
        monkeypatch.setattr(AlignLoop, "_evaluate", lambda loop, *a, **k: self._evaluate(loop, *a, **k))

    def _run(self, loop: AlignLoop, what: str, args: list[str], step_dir: Path) -> float:
        self.ran.append(what)
        step_dir.mkdir(parents=True, exist_ok=True)
        if args[0] == "sdg":  # the files the stages train on: a copy of the (clean) seed conversations
            seeds = (loop.world / "seed/sft.jsonl").read_text()
            for name in ("sft.jsonl", "code_sft.jsonl", "preference.jsonl"):
                (step_dir / name).write_text(seeds)
        return 0.0

    def _evaluate(self, loop: AlignLoop, checkpoint: Path, step_dir: Path, **fill) -> dict:
        self.evaluated.append(str(checkpoint))
        return {"score": 0.5, "headline_suite": "tasks", "complete": True, "suites": {}}


def run(tmp_path: Path, *extra: str, rerun_changed: bool = False) -> dict:
    cfg = load_align_config("configs/align/toy.yaml", [f"run_dir={tmp_path / 'run'}", *BASE, *extra])
    return AlignLoop(cfg, rerun_changed=rerun_changed, log=lambda s: None).run()


STEPS = ["base weak", "generator seed_sft", "iteration 1 SDG", "iteration 1 general_sft", "iteration 1 dpo",
         "iteration 2 SDG", "iteration 2 general_sft", "iteration 2 dpo"]


def test_fingerprints_decide_what_runs_again(tmp_path, monkeypatch):
    rec = Recorder(monkeypatch)
    summary = run(tmp_path)
    assert rec.ran == STEPS
    audit = summary["leak_audit"]
    assert audit["hits"] == 0 and audit["files_audited"] >= 5  # corpus, seeds, pools, the SDG outputs
    assert any(f.endswith("pretrain/corpus.jsonl") for f in audit["files"])
    assert any(f.endswith("iter_2/sdg/preference.jsonl") for f in audit["files"])

    rec.ran.clear()
    run(tmp_path)
    assert rec.ran == []  # the same config: nothing runs again

    with pytest.raises(AlignError) as e:  # another seed changes every step
        run(tmp_path, "seed=1")
    assert all(s in str(e.value) for s in STEPS) and "--rerun-changed" in str(e.value)

    with pytest.raises(AlignError) as e:  # the base: every step starts from it or from data it made
        run(tmp_path, f"bases.weak.overrides=[model.num_layers=2, steps=7, {CORPUS}]")
    assert all(f"  {s} (" in str(e.value) for s in STEPS)

    with pytest.raises(AlignError) as e:  # a late stage: that stage and every step built on it
        run(tmp_path, "stages.dpo.overrides=[\"stage.train={sdg}/preference.jsonl\", stage.beta=0.2]")
    named = [s for s in STEPS if f"  {s} (" in str(e.value)]
    assert named == ["iteration 1 dpo", "iteration 2 SDG", "iteration 2 general_sft", "iteration 2 dpo"]

    rec.ran.clear()
    run(tmp_path, "stages.dpo.overrides=[\"stage.train={sdg}/preference.jsonl\", stage.beta=0.2]", rerun_changed=True)
    assert rec.ran == named
    moved = next((tmp_path / "run/replaced").iterdir())
    assert (moved / "iter_1/dpo/step.json").is_file() and (moved / "iter_2/sdg/step.json").is_file()

    rec.ran.clear()
    rec.evaluated.clear()
    run(tmp_path, "stages.dpo.overrides=[\"stage.train={sdg}/preference.jsonl\", stage.beta=0.2]", "eval.max_tokens=8")
    assert rec.ran == [] and len(set(rec.evaluated)) == 6  # every model (6, no SDG) evaluated again, none trained


def test_interrupted_step_with_another_config_is_named(tmp_path, monkeypatch):
    Recorder(monkeypatch)
    run(tmp_path)
    step = tmp_path / "run/iter_2/dpo"
    (step / "step.json").unlink()  # as if killed while training, with another configuration
    (step / "started.json").write_text(json.dumps({"train": "0000"}))
    with pytest.raises(AlignError, match=r"iteration 2 dpo \(iter_2/dpo\): interrupted"):
        run(tmp_path)


def test_leak_in_training_data_stops_the_run(tmp_path, monkeypatch):
    rec = Recorder(monkeypatch)
    cfg = load_align_config("configs/align/toy.yaml", [f"run_dir={tmp_path / 'run'}", *BASE])
    loop = AlignLoop(cfg, log=lambda s: None)
    loop.plan_world()
    loop.build_world()
    task = json.loads((loop.world / "eval/tasks.jsonl").read_text().splitlines()[0])
    with (loop.world / "seed/sft.jsonl").open("a") as f:  # one evaluation task in the seed conversations
        f.write(json.dumps({"messages": [{"role": "user", "content": task["prompt"]},
                                         {"role": "assistant", "content": task["answer"]}]}) + "\n")
    with pytest.raises(AlignError, match="leak audit: generator seed_sft trains on .*seed/sft.jsonl"):
        loop.run()
    assert rec.ran == ["base weak"]  # the base's corpus is clean; nothing trained on the leaked file
    summary = run(tmp_path, "leak_audit=warn")
    assert summary["leak_audit"]["hits"] >= 1
    # the SDG outputs copied the leaked seed file: the loop removed the leaked record from them
    assert summary["leak_audit"]["generated_records_removed"] >= 3
