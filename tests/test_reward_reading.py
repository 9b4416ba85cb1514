"""One reward reading everywhere: every path that scores a conversation gives the same numbers.

For the same conversations and one reward checkpoint (random weights the test wrote, the head's
bias included), these must all equal an independent float64 numpy forward read at the
`<extra_id_2>` that closes the response (tests/independent_forward.py):

* the reward stage's train step (`Training.gradients`: with every label 0 and one real row,
  d loss / d head bias = 2 * scores / number of labels, so the step's scores come out signed);
* the stage's validation (`StageValidator`: val_mse/<attr> with labels 0 is the mean squared score);
* `RewardScorer`, `nemojax reward score` and the served `POST /v1/reward`;
* `NemotronRewardModel` on padded input, right- or left-padded (attention_mask).

One conversation is longer than the sequence length: every path cuts it the same way (prompt
tokens from the left, bos kept).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import independent_forward as ind
from nemojax.checkpoint import save_model
from nemojax.cli import main
from nemojax.config import load_config
from nemojax.data.chat import encode_reward_input
from nemojax.data.stage_data import load_stage_data
from nemojax.data.tokenizer import load_tokenizer
from nemojax.inference.reward import RewardScorer
from nemojax.model.reward import make_abstract_model
from nemojax.parallel.mesh import make_mesh
from nemojax.train.build import build_training
from nemojax.train.reference import reference_params
from nemojax.train.tasks import stage_task
from nemojax.train.validation import StageValidator

SEQ = 64
SMALL = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
         "model.head_dim=8", "model.ffn_hidden_size=64", f"model.max_seq_len={SEQ}", f"data.seq_len={SEQ}",
         "data.global_batch_size=4", "stage.preference_validation=", "seed=0"]
CONVERSATIONS = [
    [{"role": "user", "content": "Compute 98 - 70."}, {"role": "assistant", "content": "98 - 70 = 28."}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
     {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"},
     {"role": "assistant", "content": "Rome, which is also the largest city of Italy."}],
]
ATOL = 2e-5  # fp32 paths vs float64 numpy; scores are O(1)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("reward_reading")
    tok = load_tokenizer("builtin")
    records = d / "records.jsonl"
    cfg = load_config("configs/reward.yaml", SMALL + [f"run_dir={d / 'run'}", f"init_from={d / 'rm'}",
                                                      f"stage.train={records}", f"stage.validation={records}"])
    attrs = list(cfg.model.reward.attributes)
    records.write_text("".join(json.dumps({"messages": c, **{a: 0 for a in attrs}}) + "\n" for c in CONVERSATIONS))
    rng = np.random.default_rng(9)
    abstract = nnx.to_pure_dict(nnx.state(make_abstract_model(cfg.model), nnx.Param))
    weights = jax.tree.map(lambda x: (0.1 * rng.standard_normal(x.shape)).astype(np.float32), abstract)
    save_model(weights, cfg.model, d / "rm")
    # Over-length input loses prompt tokens from the left, bos kept (the last conversation does).
    ids = [x if len(x) <= SEQ else [x[0], *x[len(x) - SEQ + 1:]] for x in (encode_reward_input(tok, c)
                                                                            for c in CONVERSATIONS)]
    assert len(encode_reward_input(tok, CONVERSATIONS[-1])) > SEQ
    end = tok.special_id("<extra_id_2>")
    assert all(x[-1] == end for x in ids)
    scores = np.stack([ind.reward_scores(ind.as_numpy(weights), cfg.model, np.asarray([x]), np.arange(len(x))[None],
                                         np.ones((1, len(x)), np.int64), np.asarray([len(x) - 1]))[0] for x in ids])
    reward = scores @ np.asarray(cfg.model.reward.weight_vector())
    return {"dir": d, "cfg": cfg, "tok": tok, "ids": ids, "scores": scores, "reward": reward, "attrs": attrs,
            "scorer": RewardScorer.from_checkpoint(d / "rm", tokenizer=tok, batch_size=2, max_len=SEQ)}


def test_the_train_step_and_the_validation_read_the_reward_token(world: dict[str, Any]) -> None:
    """The reward stage's rows are the scorer's tokens, and the train step's and the validation's
    scores are the independent forward's at `<extra_id_2>`.

    Kills the mutant "reward head reads the token before <extra_id_2>" in training and
    validation, wherever it is made: the rows' `last_index` or `reward_scores`."""
    cfg, tok = world["cfg"], world["tok"]
    data = load_stage_data(cfg, tok)
    training = build_training(cfg, make_mesh(cfg.mesh, jax.devices()[:1]), task=stage_task(cfg))
    params = reference_params(cfg, training, stage_task(cfg).load_weights)  # init_from, via the stage's load_weights
    rows = next(data.validation.eval_batches(4))
    assert list(rows["example_index"][:3]) == [0, 1, 2] and rows["example_mask"][3] == 0
    n_attr = len(world["attrs"])
    fields = list(training.task.batch_fields(cfg))
    grads = None
    for i, ids in enumerate(world["ids"]):
        assert list(rows["input_ids"][i, :rows["last_index"][i] + 1]) == ids  # the same tokens as scored
        one = {k: rows[k] for k in fields} | {"example_mask": (np.arange(4) == i).astype(np.float32)}
        batch = training.global_batch(one, 1, 4)
        if grads is None:
            grads = training.gradients.lower(params, batch).compile()
        g, sums = grads(params, batch)
        step_scores = np.asarray(g["reward_head"]["bias"]) * n_attr / 2.0
        np.testing.assert_allclose(step_scores, world["scores"][i], atol=ATOL, err_msg=f"conversation {i}")
        assert float(sums["numerator"]) == pytest.approx(float(np.sum(world["scores"][i] ** 2)), rel=1e-4)

    metrics = StageValidator(cfg, data)(training, params)
    for j, a in enumerate(world["attrs"]):
        assert metrics[f"val_mse/{a}"] == pytest.approx(float(np.mean(world["scores"][:, j] ** 2)), rel=1e-4), a


def test_scorer_cli_and_server_give_the_same_numbers(world: dict[str, Any], tmp_path: Path, capsys) -> None:
    """`RewardScorer`, `nemojax reward score` and `POST /v1/reward` all give the independent
    forward's attribute scores and weighted reward for the same conversations."""
    from fastapi.testclient import TestClient

    from nemojax.serve.app import create_app

    got = world["scorer"].score(CONVERSATIONS)
    for g, s, r in zip(got, world["scores"], world["reward"]):
        np.testing.assert_allclose([g[a] for a in world["attrs"]], s, atol=ATOL)
        assert g["reward"] == pytest.approx(r, abs=ATOL)

    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "messages": c}) + "\n" for i, c in enumerate(CONVERSATIONS)))
    assert main(["reward", "score", "--checkpoint", str(world["dir"] / "rm"), "--input", str(inp), "--output",
                 str(out), "--max-len", str(SEQ), "--no-progress"]) == 0
    capsys.readouterr()
    for rec in map(json.loads, out.read_text().splitlines()):
        np.testing.assert_allclose([rec["scores"][a] for a in world["attrs"]], world["scores"][rec["id"]], atol=ATOL)
        assert rec["reward"] == pytest.approx(world["reward"][rec["id"]], abs=ATOL)

    with TestClient(create_app(None, world["tok"], model_name="rm", reward=world["scorer"])) as client:
        resp = client.post("/v1/reward", json={"conversations": CONVERSATIONS})
        assert resp.status_code == 200, resp.text
        for item in resp.json()["data"]:
            i = item["index"]
            np.testing.assert_allclose([item["attributes"][a] for a in world["attrs"]], world["scores"][i], atol=ATOL)
            assert item["reward"] == pytest.approx(world["reward"][i], abs=ATOL)


def test_padded_input_to_the_reward_model_reads_the_last_real_token(world: dict[str, Any]) -> None:
    """`NemotronRewardModel(ids, attention_mask=...)` gives the unpadded scores whether the rows are
    padded on the right or on the left (a left-padded row used to be read at a padding
    position, silently)."""
    from nemojax import load

    model = load(str(world["dir"] / "rm"))
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda st, ids, mask: nnx.merge(graphdef, st)(ids, attention_mask=mask))
    width = max(len(x) for x in world["ids"])
    for side in ("right", "left"):
        ids = np.zeros((len(world["ids"]), width), np.int32)
        mask = np.zeros_like(ids)
        for i, x in enumerate(world["ids"]):
            cols = slice(0, len(x)) if side == "right" else slice(width - len(x), width)
            ids[i, cols], mask[i, cols] = x, 1
        got = np.asarray(forward(state, jnp.asarray(ids), jnp.asarray(mask)))
        np.testing.assert_allclose(got, world["scores"], atol=ATOL, err_msg=f"{side}-padded")
