"""The reward-model judge in the loop (nemojax.align.judge): each iteration trains a reward model
from its base on the world's scored responses before its SDG step, the SDG step filters with it
(its pipeline, its checkpoint; data made with another judge is other data), and the audit's
numbers are the oracle's verdicts on the judge's decisions, checked here against hand counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nemojax.align import judge as judge_mod
from nemojax.align.config import load_align_config
from nemojax.align.judge import auc, judge_audit
from nemojax.align.loop import AlignError, AlignLoop
from nemojax.align.tasks import Task
from nemojax.config import ConfigError
from nemojax.sdg.config import load_pipeline
from tests.test_align_controls import BASES, Recorder

STAGE = ("stages.reward_model={config: configs/align/toy_reward.yaml, overrides: [\"stage.train={world}/reward/train.jsonl\"]}")
JUDGE = ["judge={kind: reward_model, stage: reward_model, init: base, sdg_config: configs/align/toy_sdg_reward.yaml, "
         "sdg_overrides: [\"reward.checkpoint={reward_model}\", \"reward.tokenizer={tokenizer}\"]}", STAGE]
WORLD = ("world.spec={seed: 1, families: [strings, lists], train_levels: [1, 2], eval_levels: [1, 2], "
         "pretrain_documents: 120, seed_conversations: 40, eval_per_family: 8, prompts_per_pool: 30, pools: 2, "
         "reward_records: 8}")


def run(tmp_path: Path, *extra: str, rerun_changed: bool = False) -> dict:
    cfg = load_align_config("configs/align/toy.yaml", [f"run_dir={tmp_path / 'run'}", WORLD, BASES, *JUDGE,
                                                       "iterations=[{base: strong}, {base: stronger}]",
                                                       "pipeline=[general_sft]", *extra])
    return AlignLoop(cfg, log=lambda s: None, rerun_changed=rerun_changed).run()


def test_each_iteration_trains_its_judge_and_filters_with_it(tmp_path, monkeypatch):
    rec = Recorder(monkeypatch)
    audited = []
    monkeypatch.setattr(judge_mod, "pairwise_accuracy", lambda ckpt, tok, pairs: {"accuracy": 0.75, "n": 16})
    monkeypatch.setattr(judge_mod, "judge_audit", lambda sdg, ckpt, tok, pipe: audited.append((sdg, ckpt)) or {"summary": {}})
    summary = run(tmp_path)
    run_dir = tmp_path / "run"
    names = [w for w, _ in rec.ran]
    assert names == ["base weak", "generator seed_sft", "base strong", "iteration 1 reward model", "iteration 1 SDG",
                     "iteration 1 general_sft", "base stronger", "iteration 2 reward model", "iteration 2 SDG",
                     "iteration 2 general_sft"]
    args = dict(rec.ran)
    rm = args["iteration 1 reward model"]
    assert f"init_from={run_dir / 'bases/strong'}" in rm and f"stage.train={run_dir / 'world/reward/train.jsonl'}" in rm
    assert f"init_from={run_dir / 'bases/stronger'}" in args["iteration 2 reward model"]
    sdg = args["iteration 2 SDG"]
    assert sdg[2] == "configs/align/toy_sdg_reward.yaml" and f"reward.checkpoint={run_dir / 'iter_2/reward_model'}" in sdg
    assert audited == [(run_dir / "iter_1/sdg", run_dir / "iter_1/reward_model"),
                       (run_dir / "iter_2/sdg", run_dir / "iter_2/reward_model")]
    assert summary["iterations"][0]["judge"]["judge_eval"]["accuracy"] == 0.75
    # a judge trained otherwise made other data: the SDG steps after it are named, not reused
    with pytest.raises(AlignError) as e:
        run(tmp_path, STAGE.replace('"]}', '", stage.epochs=2]}'))
    assert "iteration 1 reward model" in str(e.value) and "iteration 1 SDG" in str(e.value)
    rec.ran.clear()
    run(tmp_path, "judge.init=generator", rerun_changed=True)
    assert f"init_from={run_dir / 'generator/seed_sft'}" in dict(rec.ran)["iteration 1 reward model"]


def test_judge_settings_are_checked():
    with pytest.raises(ConfigError, match="judge.stage"):
        load_align_config("configs/align/toy.yaml", ["judge.kind=reward_model"])
    with pytest.raises(ConfigError, match="judge.kind='oracle'"):
        load_align_config("configs/align/toy.yaml", ["judge.kind=oracle"])


def test_auc_is_the_mann_whitney_statistic():
    assert auc([3, 2, 1], [True, False, False]) == 1.0
    assert auc([1, 2, 3], [True, False, False]) == 0.0
    assert auc([2, 2], [True, False]) == 0.5
    assert auc([1.0], [True]) is None


def test_audit_counts_the_oracles_verdicts_on_the_judges_decisions(tmp_path, monkeypatch):
    tasks = [Task("lists", 1, "What is the largest number of 3, 5?", "The largest number is 5. The answer is 5.",
                  {"kind": "number", "value": 5}),
             Task("strings", 1, 'Reverse the string "cat".', "tac", {"kind": "text", "value": "tac"}),
             Task("strings", 1, 'Repeat the word "dog".', "dog", {"kind": "text", "value": "dog"})]
    wrong = ["The largest number is 3. The answer is 3.", "cat", "dogg"]
    conv = lambda t, r: {"messages": [{"role": "user", "content": t.prompt}, {"role": "assistant", "content": r}]}  # noqa: E731
    (tmp_path / "responses.jsonl").write_text("".join(
        json.dumps({**t.to_json(), "responses": [conv(t, t.answer), conv(t, w)]}) + "\n" for t, w in zip(tasks, wrong)))
    seed = conv(tasks[0], tasks[0].answer)  # a seed conversation may ask a pool prompt too; it is no judged answer
    (tmp_path / "seeds.jsonl").write_text(json.dumps(seed) + "\n")
    # trained on: the seeds, the judge's one kept answer (task 2's wrong one), one pair (task 1, right order);
    # the SDG merge marks where each record came from
    sft = [{**seed, "merged_from": "seeds"}, {**conv(tasks[1], "cat"), "merged_from": "synthetic_sft"}]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    (tmp_path / "preference.jsonl").write_text(json.dumps({"prompt": tasks[0].prompt, "chosen": tasks[0].answer,
                                                           "rejected": wrong[0]}) + "\n")
    liked = {tasks[0].answer, "cat"}  # the scripted judge: task 1's right answer and task 2's wrong one

    class Scorer:
        def score(self, convs):
            return [{"reward": 6.0 if c[-1]["content"] in liked else 2.0} for c in convs]

    monkeypatch.setattr(judge_mod, "_scorer", lambda ckpt, tok: Scorer())
    pipe = load_pipeline("configs/align/toy_sdg_reward.yaml", [f"stages.{s}.path=x.jsonl" for s in ("pool", "seeds", "code_seeds")]
                         + ["clients.gen.checkpoint=x", "reward.checkpoint=y"])
    out = judge_audit(tmp_path, Path("rm"), "", pipe)
    s = out["summary"]
    # 6 responses, 3 right; kept (reward >= 4.5): task 1's right answer and task 2's wrong one
    assert (s["responses"], s["correct"], s["kept"]) == (6, 3, 2)
    assert s["precision"] == pytest.approx(1 / 2) and s["recall"] == pytest.approx(1 / 3)
    assert s["accuracy"] == pytest.approx(3 / 6)  # task 1: both decisions right; task 2: both wrong; task 3: one
    # AUC by hand: right answers score 6, 2, 2 and wrong ones 2, 6, 2: of 9 pairs, 2 won and 5 tied -> 4.5 / 9
    assert s["auc"] == pytest.approx(0.5)
    assert (s["sft_answers"], s["sft_answers_correct"]) == (1, 0.0)
    assert (s["pairs"], s["pairs_right_order"]) == (1, 1.0)
    assert s["oracle_would_keep_prompts"] == 3 and s["threshold"] == 4.5
    assert out["by_family"]["strings"]["precision"] == 0.0 and out["by_family"]["lists"]["precision"] == 1.0
    assert out["final_answer_precision"] == pytest.approx(1 / 2)


def test_a_stage_without_training_records_passes_its_model_on(tmp_path, monkeypatch):
    """A judge may keep no preference pair: the stage is recorded as skipped (the model it starts
    from goes on, with its evaluation), not a failed run after hours of work."""
    rec = Recorder(monkeypatch)
    real = rec._run

    def no_pairs(loop, what, args, step_dir):
        out = real(loop, what, args, step_dir)
        if args[0] == "sdg":
            (step_dir / "preference.jsonl").write_text("")
        return out

    monkeypatch.setattr(AlignLoop, "_run", lambda loop, *a: no_pairs(loop, *a))
    cfg = load_align_config("configs/align/toy.yaml", [f"run_dir={tmp_path / 'run'}", WORLD, BASES,
                                                       "iterations=[{base: strong}]", "pipeline=[general_sft, dpo]"])
    summary = AlignLoop(cfg, log=lambda s: None).run()
    sft, dpo = summary["iterations"][0]["stages"]
    assert "no training records" in dpo["skipped"] and dpo["checkpoint"] == sft["checkpoint"]
    assert dpo["eval"] == sft["eval"] and "iteration 1 dpo" not in [w for w, _ in rec.ran]
