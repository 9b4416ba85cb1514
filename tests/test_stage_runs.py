"""Post-training stages run in-process (nemojax.train.stages.run_stage): LoRA, RPO rounds, reward scoring.

- RPO, 2 rounds, LoRA rank 4, rewards from a reward checkpoint's scoring pass: only the
  adapters change and only they have optimizer state; round 2 starts from round 1's merged
  weights and its reference is round 1's checkpoint, by value (the cached reference log-probs
  of each round equal an independent forward of the previous round's weights, round 1's of the
  base); finished rounds are skipped on rerun;
  `nemojax.load` of the result is a plain (merged) language model;
- the scoring pass writes the reward model's scores, and resumes after a torn line;
- stage configs fail early, naming the key or file, on a missing file or missing rewards;
- the held-out metrics equal values computed by hand.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from nemojax.config import ConfigError, load_config
from nemojax.data.sources import DataError

REPO = Path(__file__).resolve().parent.parent
SMALL = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", "model.head_dim=16",
         "model.ffn_hidden_size=128", "model.max_seq_len=256"]


def head(src: str, n: int, out: Path) -> str:
    out.write_text("".join((REPO / src).read_text().splitlines(keepends=True)[:n]))
    return str(out)


def flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    """A tiny LM base, a tiny reward checkpoint (same trunk) and a few shipped example pairs."""
    from nemojax.checkpoint import save_model
    from nemojax.model.reward import make_model

    d = tmp_path_factory.mktemp("stage_runs")
    lm = load_config("configs/tiny.yaml", SMALL).model
    rm = load_config("configs/tiny.yaml", SMALL + ["model.reward.enabled=true"]).model
    save_model(make_model(lm, seed=0), lm, d / "base")
    save_model(make_model(rm, seed=1), rm, d / "reward")
    return {"base": str(d / "base"), "reward": str(d / "reward"), "dir": str(d),
            "train": head("configs/data/preference_train.jsonl", 12, d / "train.jsonl"),
            "val": head("configs/data/preference_val.jsonl", 4, d / "val.jsonl")}


def rpo_config(world: dict[str, str], run_dir: Path):
    return load_config("configs/rpo.yaml", SMALL + [
        f"run_dir={run_dir}", f"init_from={world['base']}", f"stage.train={world['train']}",
        f"stage.validation={world['val']}", f"stage.reward_model={world['reward']}", "stage.rounds=2", "steps=2",
        "stage.epochs=0", "model.lora.rank=4", "data.global_batch_size=4", "log_every=1", "eval_every=2",
        "eval_batches=1", "checkpoint_every=2", "optimizer.warmup_steps=0", "optimizer.learning_rate=5e-2"])


def restore(params_dir: Path) -> dict:
    with ocp.StandardCheckpointer() as c:
        return c.restore(params_dir)


def assert_reference_is(round_dir: Path, cfg, weights: dict) -> None:
    """The round's cached reference log-probs equal a float64 numpy forward of `weights` (LoRA
    adapters, if any, merged) over the round's training pairs."""
    import independent_forward as ind
    from nemojax.data.chat_rows import PreferenceDataset
    from nemojax.data.chat_records import load_examples
    from nemojax.data.tokenizer import load_tokenizer

    examples, _ = load_examples(str(round_dir / "rewards" / "train.jsonl"), "preference")
    ds = PreferenceDataset(examples, load_tokenizer("builtin"), max_len=cfg.data.seq_len, shuffle=False)
    with np.load(round_dir / "reference" / "train.npz") as f:
        cached = f["ref_logps"]
    p, model_cfg = ind.as_numpy(weights), cfg.model
    if not any("_lora_" in k for k in p["blocks"]):
        model_cfg = dataclasses.replace(model_cfg, lora=dataclasses.replace(model_cfg.lora, rank=0))
    for rows in ds.eval_batches(4):
        real = rows["example_mask"] > 0
        for j, side in enumerate(("chosen", "rejected")):
            want = ind.response_log_probs(p, model_cfg, rows, side, average=cfg.stage.average_log_probs)[real]
            np.testing.assert_allclose(cached[rows["example_index"][real], j], want, rtol=2e-6,
                                       err_msg=f"{round_dir.name} reference log-probs ({side})")


def read_params(step_dir: Path) -> dict[str, np.ndarray]:
    with ocp.StandardCheckpointer() as c:
        return flat(c.restore(step_dir / "params"))


def opt_state_paths(step_dir: Path) -> list[str]:
    with ocp.StandardCheckpointer() as c:
        meta = c.metadata(step_dir / "opt_state")
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


@pytest.mark.heavy
def test_lora_rpo_rounds_with_scored_rewards(world: dict[str, str], tmp_path: Path) -> None:
    """Kills the mutant "round r's reference is not round r-1's weights" (`round_config` passing
    the stage's init_from as round 2's reference): checked by value, not by the cache's path."""
    from nemojax import load
    from nemojax.inference.reward import RewardScorer
    from nemojax.model.lora import merge_lora
    from nemojax.train.stages import final_run_dir, run_stage

    cfg = rpo_config(world, tmp_path / "rpo")
    lines: list[str] = []
    result = run_stage(cfg, log=lines.append, devices=jax.devices()[:1])
    assert result.exit_code == 0 and result.reason == "completed", lines[-5:]
    r1, r2 = tmp_path / "rpo" / "round_1", tmp_path / "rpo" / "round_2"
    assert final_run_dir(cfg) == r2 and (r1 / "COMPLETED").is_file() and (r2 / "COMPLETED").is_file()

    # rewards: both responses of every pair scored by the reward checkpoint
    scored = [json.loads(x) for x in (r1 / "rewards" / "train.jsonl").read_text().splitlines()]
    assert len(scored) == 12
    scorer = RewardScorer.from_checkpoint(world["reward"], tokenizer="builtin", max_len=cfg.data.seq_len)
    want = scorer.score([[*scored[0]["prompt"], {"role": "assistant", "content": scored[0][s]}]
                         for s in ("chosen", "rejected")])
    assert scored[0]["chosen_reward"] == pytest.approx(want[0]["reward"], abs=1e-5)
    assert scored[0]["rejected_reward"] == pytest.approx(want[1]["reward"], abs=1e-5)

    # LoRA: optimizer state for adapters only; base weights frozen, adapters trained
    paths = opt_state_paths(r1 / "checkpoints" / "2")
    assert any("_lora_" in p for p in paths)
    assert all("_lora_" in p for p in paths if "['value']" in p), [p for p in paths if "_lora_" not in p][:5]
    base = read_params(Path(world["base"]))
    after1 = read_params(r1 / "checkpoints" / "2")
    for k, v in base.items():
        np.testing.assert_array_equal(after1[k], v, err_msg=f"frozen base weight {k} changed")
    assert any(np.abs(v).max() > 0 for k, v in after1.items() if "_lora_b" in k), "adapters did not train"

    # round 2: starts from round 1 merged, referenced to round 1
    merged1 = flat(nnx.to_pure_dict(nnx.state(merge_lora(load(str(r1), merge_lora=False)), nnx.Param)))
    after2 = read_params(r2 / "checkpoints" / "2")
    for k, v in merged1.items():
        np.testing.assert_allclose(after2[k], v, rtol=0, atol=1e-6, err_msg=f"round 2 base {k} != round 1 merged")
    assert json.loads((r2 / "reference" / "train.json").read_text())["reference"].endswith(
        str(r1 / "checkpoints" / "2" / "params"))
    # ...by value: each round's cached reference log-probs are an independent forward of the
    # previous round's final weights (round 1: the base), adapters folded in
    for rd, ref_weights in ((r1, Path(world["base"]) / "params"), (r2, r1 / "checkpoints" / "2" / "params")):
        assert_reference_is(rd, cfg, restore(ref_weights))
    assert not np.array_equal(merged1["['blocks']['q']"], base["['blocks']['q']"])

    # rerun: both rounds skipped; the result loads as a merged plain language model
    again: list[str] = []
    assert run_stage(cfg, log=again.append, devices=jax.devices()[:1]).exit_code == 0
    assert sum(x.startswith("round") and "already completed" in x for x in again) == 2
    model = load(str(final_run_dir(cfg)))
    assert type(model).__name__ == "NemotronLM" and model.cfg.lora.rank == 0


def test_scoring_pass_resumes_after_a_torn_line(world: dict[str, str], tmp_path: Path) -> None:
    from nemojax.train.stages import score_pairs

    cfg = rpo_config(world, tmp_path / "x")
    out = tmp_path / "scored.jsonl"
    score_pairs(world["reward"], world["train"], out, cfg, log=lambda s: None)
    full = out.read_text()
    lines = full.splitlines(keepends=True)
    out.write_text("".join(lines[:5]) + lines[5][:17])  # killed mid-write
    meta = json.loads(out.with_name(out.name + ".json").read_text())
    out.with_name(out.name + ".json").write_text(json.dumps({**meta, "complete": False}))
    said: list[str] = []
    score_pairs(world["reward"], world["train"], out, cfg, log=said.append)
    assert out.read_text() == full
    assert any("5 of 12 pairs already scored" in s for s in said)


def test_stage_config_errors_name_what_to_fix(world: dict[str, str], tmp_path: Path) -> None:
    from nemojax.data.tokenizer import load_tokenizer
    from nemojax.data.stage_data import load_stage_data

    tok = load_tokenizer("builtin")
    cfg = load_config("configs/dpo.yaml", SMALL + [f"stage.train={tmp_path}/missing.jsonl"])
    with pytest.raises(ConfigError, match="stage.train=.*missing.jsonl"):
        load_stage_data(cfg, tok)
    cfg = load_config("configs/rpo.yaml", SMALL + [f"stage.train={world['train']}"])
    unrewarded = tmp_path / "pairs.jsonl"
    unrewarded.write_text(json.dumps({"prompt": "Hi", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(DataError, match="no chosen_reward/rejected_reward.*reward model"):
        load_stage_data(dataclasses.replace(cfg, stage=dataclasses.replace(cfg.stage, train=str(unrewarded))), tok)
    with pytest.raises(ConfigError, match="model.reward.enabled=true"):
        load_config("configs/reward.yaml", ["model.reward.enabled=false"])
    with pytest.raises(ConfigError, match="stage.round_train lists 1 file"):
        load_config("configs/rpo.yaml", ["stage.round_train=[a.jsonl]"])
    with pytest.raises(ConfigError, match="did you mean 'dpo'"):
        load_config("configs/dpo.yaml", ["stage.kind=dpp"])


def test_held_out_metrics_by_hand() -> None:
    from nemojax.train.validation import aggregate_pearson, preference_metrics

    cfg = load_config("configs/dpo.yaml", ["stage.beta=0.5", "stage.sft_weight=0.1"])
    c, r = np.array([-10.0, -12.0, -8.0]), np.array([-11.0, -9.0, -8.5])
    rc, rr = np.array([-10.5, -11.0, -8.0]), np.array([-10.0, -10.0, -9.0])
    delta = (c - rc) - (r - rr)  # [1.5, -2.0, 0.0]
    loss = -np.log(1 / (1 + np.exp(-0.5 * delta))) + 0.1 * -c
    m = preference_metrics(c, r, rc, rr, None, cfg)
    assert m["val_loss"] == pytest.approx(loss.mean(), rel=1e-5)
    assert m["val_accuracy"] == pytest.approx(1 / 3) and m["val_pref_accuracy"] == pytest.approx(2 / 3)
    assert m["val_margin"] == pytest.approx(0.5 * delta.mean(), rel=1e-5)
    rng = np.random.default_rng(0)
    pred, lab = rng.normal(size=(50, 3)), rng.normal(size=(50, 3))
    mask = np.ones((50, 3))
    mask[3, 1] = 0  # a missing weighted label drops the example from the aggregate
    w = np.array([0.5, -1.0, 0.0])
    keep = np.arange(50) != 3
    assert aggregate_pearson(pred, lab, mask, w) == pytest.approx(np.corrcoef(pred[keep] @ w, lab[keep] @ w)[0, 1])
    mask[:, 2] = 0  # an unweighted attribute may be missing everywhere
    assert np.isfinite(aggregate_pearson(pred, lab, mask, w))
