"""`nemojax align` control arms (nemojax.align.controls), with the subprocess steps and the
evaluation replaced by recorders (tests/test_align_fingerprint.py's): each arm trains the base it
must from the data it must, an arm that another already trained is not trained again, the
random-gold data matches the SDG step's counts with gold answers to pool prompts, and a rerun
trains nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nemojax.align.config import load_align_config
from nemojax.align.controls import random_gold_data
from nemojax.align.loop import AlignLoop
from nemojax.align.tasks import Task, verify
from nemojax.config import ConfigError
from tests.test_align_fingerprint import CORPUS, WORLD

BASES = (f"bases={{weak: {{config: configs/align/toy_base.yaml, overrides: [model.num_layers=2, {CORPUS}]}}, "
         f"strong: {{config: configs/align/toy_base.yaml, overrides: [{CORPUS}]}}, "
         f"stronger: {{config: configs/align/toy_base.yaml, init_from: strong, overrides: [steps=3, {CORPUS}]}}}}")
CONFIG = [WORLD, "world.spec.pools=3", BASES, "iterations=[{base: strong}, {base: stronger}, {base: stronger}]",
          "pipeline=[general_sft, dpo]",
          "controls=[seed_only, random_gold, generator_base, same_base]", "control_stages=[general_sft]"]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


class Recorder:
    """Records (step, args) of every subprocess step; an SDG step writes what `nemojax sdg run`
    would: the deduplicated pool, the seeds it merged, 5 synthetic answers and 3 pairs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.ran: list[tuple[str, list[str]]] = []
        monkeypatch.setattr(AlignLoop, "_run", lambda loop, *a: self._run(loop, *a))
        monkeypatch.setattr(AlignLoop, "_evaluate", lambda loop, *a, **k: {"score": 0.5, "headline_suite": "tasks", "complete": True, "suites": {}})

    def _run(self, loop: AlignLoop, what: str, args: list[str], step_dir: Path) -> float:
        self.ran.append((what, args))
        step_dir.mkdir(parents=True, exist_ok=True)
        if args[0] == "sdg":
            w = loop.world
            pool = _jsonl(w / "prompts/pool_1.jsonl")[:20]
            seeds, code_seeds = _jsonl(w / "seed/sft.jsonl"), _jsonl(w / "seed/code_sft.jsonl")
            synthetic = [{"messages": [{"role": "user", "content": t["prompt"]},
                                       {"role": "assistant", "content": t["answer"]}], "merged_from": "synthetic_sft"}
                         for t in pool[:5]]
            merged = [{**r, "merged_from": "seeds"} for r in seeds]  # as the SDG merge stage marks them
            files = {"prompts": pool, "seeds": seeds, "code_seeds": code_seeds, "sft": merged + synthetic,
                     "code_sft": code_seeds, "preference": [{"prompt": t["prompt"], "chosen": t["answer"], "rejected": "x"}
                                                            for t in pool[5:8]]}
            for name, rows in files.items():
                (step_dir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return 0.0


def run(tmp_path: Path, *extra: str) -> dict:
    cfg = load_align_config("configs/align/toy.yaml", [f"run_dir={tmp_path / 'run'}", *CONFIG, *extra])
    return AlignLoop(cfg, log=lambda s: None).run()


def _arg(args: list[str], key: str) -> str:
    return next(a.split("=", 1)[1] for a in args if a.startswith(key + "="))


def test_control_arms_train_what_they_must_once(tmp_path, monkeypatch):
    rec = Recorder(monkeypatch)
    summary = run(tmp_path)
    run_dir = tmp_path / "run"
    ran = {what: args for what, args in rec.ran}
    controls = [w for w, _ in rec.ran if w.startswith("control")]
    assert controls == [
        "control seed_only 1 seed_sft", "control random_gold 1 general_sft", "control generator_base 1 general_sft",
        "control seed_only 2 seed_sft", "control random_gold 2 general_sft", "control generator_base 2 general_sft",
        # iteration 2's same_base is generator_base's model (iteration 1's base on iteration 2's data); iteration 3's
        # seed_only is iteration 2's (same base, same seed data); generator_base 3 would be stronger, the base itself
        "control random_gold 3 general_sft", "control same_base 3 SDG", "control same_base 3 general_sft"]
    init = {w: _arg(a, "init_from") for w, a in ran.items() if w.startswith(("control", "iteration")) and "SDG" not in w}
    assert init["control seed_only 1 seed_sft"] == str(run_dir / "bases/strong")
    assert init["control seed_only 2 seed_sft"] == str(run_dir / "bases/stronger")
    assert init["control generator_base 1 general_sft"] == str(run_dir / "bases/weak")
    assert init["control generator_base 2 general_sft"] == str(run_dir / "bases/strong")
    assert init["control same_base 3 general_sft"] == str(run_dir / "bases/strong")
    train = {w: _arg(a, "stage.train") for w, a in ran.items() if w.startswith("control")
             and "SDG" not in w}
    assert train["control seed_only 1 seed_sft"].endswith("world/seed/sft.jsonl")
    assert train["control generator_base 2 general_sft"] == str(run_dir / "iter_2/sdg/sft.jsonl")
    assert train["control random_gold 1 general_sft"] == str(run_dir / "controls/random_gold/iter_1/data/sft.jsonl")
    assert train["control same_base 3 general_sft"] == str(run_dir / "controls/same_base/iter_3/sdg/sft.jsonl")
    # same_base's own SDG in iteration 3 is generated by its own iteration-2 model (= generator_base 2's)
    assert _arg(ran["control same_base 3 SDG"], "clients.gen.checkpoint") == str(run_dir / "controls/generator_base/iter_2/general_sft")
    it2 = summary["iterations"][1]["controls"]
    assert it2["same_base"]["same_as"] == "generator_base, iteration 2"
    assert summary["iterations"][2]["controls"]["seed_only"]["same_as"] == "seed_only, iteration 2"
    assert "skipped" in summary["iterations"][0]["controls"]["same_base"]
    assert "skipped" in summary["iterations"][2]["controls"]["generator_base"]
    assert summary["leak_audit"]["hits"] == 0
    assert any("controls/random_gold/iter_1/data/sft.jsonl" in f for f in summary["leak_audit"]["files"])

    rec.ran.clear()
    run(tmp_path)
    assert rec.ran == []  # a rerun trains nothing, controls included


def test_random_gold_data_matches_the_sdg_counts_with_gold_answers(tmp_path, monkeypatch):
    rec = Recorder(monkeypatch)
    run(tmp_path, "iterations=[{base: strong}]")
    sdg, data = tmp_path / "run/iter_1/sdg", tmp_path / "run/controls/random_gold/iter_1/data"
    seeds, pool = _jsonl(sdg / "seeds.jsonl"), {t["prompt"]: Task.from_json(t) for t in _jsonl(sdg / "prompts.jsonl")}
    sft = _jsonl(data / "sft.jsonl")
    assert sft[:len(seeds)] == seeds and len(sft) == len(_jsonl(sdg / "sft.jsonl"))  # as many answers as the SDG kept
    assert len(sft) == len(seeds) + 5
    gold = sft[len(seeds):]
    assert all(verify(pool[r["messages"][0]["content"]], r["messages"][1]["content"]) for r in gold)
    pairs = _jsonl(data / "preference.jsonl")
    assert len(pairs) == 3 and all(verify(pool[p["prompt"]], p["chosen"]) and not verify(pool[p["prompt"]], p["rejected"])
                                   for p in pairs)
    counts = json.loads((data / "step.json").read_text())["counts"]
    assert counts["gold_answers"] == 5 and sum(counts["gold_by_family"].values()) == 5
    assert sum(counts["flywheel_by_family"].values()) == 5  # the SDG's 5 synthetic answers, by family
    # another seed draws other prompts; a pool too small for the counts is refused
    other = random_gold_data(sdg, tmp_path / "other", seed=7)
    assert _jsonl(tmp_path / "other/sft.jsonl") != sft and other["gold_answers"] == 5
    (sdg / "prompts.jsonl").write_text("".join(json.dumps(t.to_json()) + "\n" for t in list(pool.values())[:2]))
    with pytest.raises(ValueError, match="5 gold answers asked of a pool of 2"):
        random_gold_data(sdg, tmp_path / "small", seed=0)


def test_control_names_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="unknown 'seed'"):
        load_align_config("configs/align/toy.yaml", ["controls=[seed]"])
    # seed_only needs the generator's recipe: a checkpoint alone is refused, naming the fix, and
    # accepted with its stages beside it (configs/align/judge.yaml's header)
    with pytest.raises(ConfigError, match=r"generator=\{checkpoint: \.\.\., stages: \[seed_sft\]\}"):
        load_align_config("configs/align/judge.yaml", ["controls=[seed_only]", "generator={checkpoint: g}"])
    cfg = load_align_config("configs/align/judge.yaml",
                            ["controls=[seed_only]", "generator={checkpoint: g, stages: [seed_sft]}"])
    assert cfg.generator.stages == ["seed_sft"] and cfg.controls == ["seed_only"]
