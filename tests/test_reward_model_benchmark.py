"""benchmarks/reward_model_cpu.py's data and protocol: the validation and test splits are distinct
held-out tasks (no twins, within or across splits) that no training file holds in any form (the
leak audit finds 0 hits), the labels are the generator's, its reward config loads with the
overrides the benchmark passes, and the test split is measured once, for one recipe."""

import importlib.util
import json
from pathlib import Path

import pytest

from nemojax.align.leaks import task_keys
from nemojax.config import load_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("reward_model_cpu", ROOT / "benchmarks/reward_model_cpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rows(path: str) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def test_splits_are_distinct_and_in_no_training_file(bench, tmp_path):
    data = bench.build_data(tmp_path, "lists", prompts=200, seed=3, validation=40, test=40,
                            world_families=("lists", "strings"), solver_conversations=300, pretrain_documents=300,
                            others_held_out=20)
    val, test = _rows(data["reward_validation"]), _rows(data["reward_test"])
    assert len(val) == len(test) == 40
    keys = [frozenset(task_keys(r["prompt"])) for r in val + test]
    assert all(keys) and len(set().union(*keys)) == 80  # 80 different tasks, none a reordered twin of another
    assert [r["prompt"] for r in _rows(data["pref_validation"])] == [r["prompt"] for r in val]
    train = _rows(data["reward_train"])
    assert len(train) == 400 and sum(r["correctness"] == 4 for r in train) == 200  # one right, one wrong per prompt
    assert not set().union(*keys) & set().union(*(task_keys(r["prompt"]) for r in train))
    audit = bench.leak_audit(data)
    assert audit["hits"] == 0 and audit["eval_items"] == 100, audit["examples"]
    assert set(audit["files"]) == {data["corpus"], data["solver_sft"], data["reward_train"]}

    cfg = load_config("configs/align/toy_reward.yaml", [f"stage.train={data['reward_train']}",
                                                        f"stage.validation={data['reward_validation']}",
                                                        f"data.tokenizer={data['tokenizer']}"])
    assert cfg.model.reward.enabled and cfg.stage.kind == "reward"


def test_test_split_is_measured_once_for_one_recipe(bench, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    args = ["--out", str(out), "--prompts", "100"]
    rec = bench.recipe(bench.parse_args(args))
    assert rec == bench.recipe(bench.parse_args([*args, "--test"]))  # --test and --out are not the recipe
    assert rec != bench.recipe(bench.parse_args([*args, "--layers", "8"]))
    (out / "results.json").write_text(json.dumps({"recipe": rec, "test": {"pearson/reward": 0.5, "commit": "abc"}}))
    assert bench.main([*args, "--test"]) == 2
    assert "already used" in capsys.readouterr().err
    assert bench.main(["--out", str(out), "--prompts", "101"]) == 2  # another recipe in the same directory
    assert "another recipe" in capsys.readouterr().err
