"""benchmarks/reward_model_cpu.py's data: held-out prompts never reach a training file, the labels
are the generator's, and its reward config loads with the overrides the benchmark passes."""

import importlib.util
import json
from pathlib import Path

from nemojax.config import load_config

ROOT = Path(__file__).resolve().parent.parent


def _benchmark():
    spec = importlib.util.spec_from_file_location("reward_model_cpu", ROOT / "benchmarks/reward_model_cpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rows(path: str) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def test_held_out_prompts_are_in_no_training_file(tmp_path):
    data = _benchmark().build_data(tmp_path, "lists", prompts=200, seed=3, world_families=("lists", "strings"))
    held_out = {r["prompt"] for r in _rows(data["reward_val"])}
    assert len(held_out) > 100
    train = _rows(data["reward_train"])
    assert len(train) == 400 and not held_out & {r["prompt"] for r in train}
    assert sum(r["correctness"] == 4 for r in train) == 200  # one right, one wrong response per prompt
    convs = _rows(data["solver_sft"])
    assert not held_out & {m["content"] for c in convs for m in c["messages"] if m["role"] == "user"}
    corpus = [json.loads(x)["text"] for x in Path(data["corpus"]).read_text().splitlines()]
    asked = {line[len("Question: "):] for doc in corpus for line in doc.split("\n") if line.startswith("Question: ")}
    assert asked and not held_out & asked  # the corpus may state facts, never a held-out question
    pairs = _rows(data["pref_val"])
    assert {p["prompt"] for p in pairs} <= held_out

    cfg = load_config("configs/align/toy_reward.yaml", [f"stage.train={data['reward_train']}",
                                                        f"stage.validation={data['reward_val']}",
                                                        f"data.tokenizer={data['tokenizer']}"])
    assert cfg.model.reward.enabled and cfg.stage.kind == "reward"
