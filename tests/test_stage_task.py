"""What `stage_task` builds besides the objective: a stage's `init_from` weights and its batch fields.

`init_from` (`nemojax.train.tasks.load_stage_weights`), by value: what the base checkpoint has comes from the base; what it lacks (a reward head, LoRA adapters) is
exactly what a run of the same config without `init_from` starts from (`Training.init_state(seed)`,
the public path, not the function under test), and lands with the sharding the caller asked for
(2-way fsdp, so a leaf's placement is not trivially the single device's).

Batch fields: the step (and `nemojax compile`, which lowers it from `Training.abstract_batch`)
takes exactly the rows the stage's data holds, per-row shape and dtype.

Written for the mutants `python scripts/mutation.py tasks` found alive (docs/TESTING.md); each
test names those it kills.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from nemojax.checkpoint import save_model
from nemojax.config import config_from_dict, load_config
from nemojax.data.stage_data import load_stage_data
from nemojax.data.tokenizer import load_tokenizer
from nemojax.model.reward import make_model
from nemojax.parallel.mesh import make_mesh
from nemojax.train.build import build_training
from nemojax.train.tasks import load_stage_weights, stage_task

MODEL = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
             ffn_hidden_size=64, max_seq_len=16, init_std=0.1)
LORA = dict(rank=2, alpha=4.0, targets=["q", "up"], init_std=0.3)


def config(kind: str, seed: int = 5, **model):
    return config_from_dict({"model": dict(MODEL, **model), "mesh": {"data": 1, "fsdp": 2}, "steps": 1, "seed": seed,
                             "stage": {"kind": kind, "train": "unused.jsonl"},
                             "data": dict(seq_len=16, global_batch_size=2, micro_batch_size=2)})


def flat(tree: dict, prefix: str = "") -> dict[str, jax.Array]:
    out = {}
    for k, v in tree.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


@pytest.mark.parametrize("kind, seed, extra, lacking", [
    ("reward", 5, dict(reward={"enabled": True}), {"reward_head.kernel", "reward_head.bias"}),
    ("dpo", 2**31 + 5, dict(lora=LORA), {"blocks.q_lora_a", "blocks.q_lora_b", "blocks.up_lora_a", "blocks.up_lora_b"}),
])
def test_base_weights_where_the_base_has_them_a_fresh_init_where_it_lacks_them(tmp_path, kind, seed, extra, lacking):
    """Kills: the fresh part not computed (`if not missing` inverted) or seeded otherwise, a fresh
    leaf put under the wrong name (`_put` / `_get` mutants), the requested shardings ignored (for
    the fresh leaves, and `sharding=None` or dropped for the base's), the seed's uint32 dtype dropped."""
    base_cfg = config("sft").model
    base = make_model(base_cfg, seed=11)  # another seed than the stage's: a base leaf is not a fresh one
    save_model(base, base_cfg, tmp_path / "base")
    cfg = config(kind, seed, **extra)  # a seed >= 2**31 is a uint32, not an int32, in both inits
    training = build_training(cfg, make_mesh(cfg.mesh, jax.devices()[:2]), task=stage_task(cfg))
    fresh = flat(nnx.to_pure_dict(training.init_state(cfg.seed).params))
    from_base = flat(nnx.to_pure_dict(nnx.state(base, nnx.Param)))
    shardings = training.state_shardings.params.to_pure_dict()
    got = flat(load_stage_weights(str(tmp_path / "base"), cfg, shardings))
    assert set(got) == set(fresh) and set(fresh) - set(from_base) == lacking
    for name, value in got.items():
        want = fresh[name] if name in lacking else from_base[name]
        np.testing.assert_array_equal(np.asarray(value), np.asarray(want), err_msg=name)
    # the fresh kernels are the seeded normal init (biases and LoRA B start at zero by design)
    assert all(np.abs(np.asarray(got[n])).max() > 0 for n in lacking if n.endswith(("kernel", "_a")))
    wanted = flat(shardings)
    for name in got:  # base and fresh leaves alike land where the caller asked
        assert got[name].sharding.is_equivalent_to(wanted[name], got[name].ndim), name
    assert any(len(wanted[n].device_set) == 2 and not wanted[n].is_fully_replicated for n in lacking)
    assert any(len(wanted[n].device_set) == 2 and not wanted[n].is_fully_replicated for n in set(got) - lacking)


def test_put_makes_the_nested_path():
    """`_put` at depth 3 (the model's own names are 2 deep, where `keys[:1]` and `keys[:-1]` agree):
    kills `keys[:+1]` and `keys[+1]`."""
    from nemojax.train.tasks import _put
    tree = {"a": {"x": 1}}
    _put(tree, ("a", "b", "c"), 2)
    _put(tree, ("d",), 3)
    assert tree == {"a": {"x": 1, "b": {"c": 2}}, "d": 3}


@pytest.mark.parametrize("config_name", ["sft_general", "reward", "dpo"])
def test_batch_fields_are_the_rows_the_stage_data_holds(config_name):
    """Every field a stage's step takes is in the rows its data yields, with the same per-row shape
    and dtype; the reference log-probs (added by the reference pass) are one fp32 per pair. Kills
    `BatchField(jnp.int32, L)` -> `BatchField(None, L)` / `BatchField(jnp.int32, None)` and the like."""
    cfg = load_config(f"configs/{config_name}.yaml", ["data.seq_len=64", "model.max_seq_len=64", "stage.validation="])
    rows = load_stage_data(cfg, load_tokenizer("builtin")).train.fields
    fields = stage_task(cfg).batch_fields(cfg)
    assert fields and set(fields) - set(rows) <= {"ref_chosen_logps", "ref_rejected_logps"}
    for name, f in fields.items():
        shape, dtype = rows.get(name, ((), np.float32))
        assert (f.trailing, np.dtype(f.dtype)) == (shape, np.dtype(dtype)), name


def _placed(seq: list[int], width: int, left: bool) -> dict[str, np.ndarray]:
    """One row holding `seq` at the start (right padding) or at the end (left padding): its
    positions restart at 0 where the sequence starts, padding is segment 0."""
    pad = width - len(seq)
    ids = [0] * pad + seq if left else seq + [0] * pad
    pos = [0] * pad + list(range(len(seq))) if left else list(range(len(seq))) + [0] * pad
    seg = [0] * pad + [1] * len(seq) if left else [1] * len(seq) + [0] * pad
    return {"input_ids": np.array([ids], np.int32), "positions": np.array([pos], np.int32),
            "segment_ids": np.array([seg], np.int32), "start": pad if left else 0}


def test_stage_objectives_read_a_sequence_wherever_it_sits_in_its_row():
    """The reward score and a pair's response log-probs of a sequence are the same whether its
    row is right- or left-padded: the step passes the rows' segment ids to the model, so padding
    is never attended. (With right padding only, dropping them changes nothing: causal attention
    at the last token never sees the padding after it.) Kills `segment_ids=` dropped or None in
    `reward_scores` and `pair_log_probs`. Dropping `positions=` is an equivalent mutant: RoPE
    sees only position differences within a segment, which a per-row shift leaves unchanged."""
    from nemojax.train.tasks import pair_log_probs, reward_scores, stage_model

    width, seq = 12, [5, 9, 17, 3, 22, 41, 7]
    rows = {left: _placed(seq, width, left) for left in (False, True)}
    cfg = config("reward", reward={"enabled": True})
    model = stage_model(cfg, nnx.Rngs(params=1))
    score = jax.jit(lambda mb: reward_scores(model, mb))  # one compile for both rows (eager: one per op)
    scores = {left: np.asarray(score({
        **{k: jax.numpy.asarray(v) for k, v in r.items() if k != "start"},
        "last_index": jax.numpy.asarray([r["start"] + len(seq) - 1])})) for left, r in rows.items()}
    np.testing.assert_allclose(scores[True], scores[False], rtol=1e-5, atol=1e-6)

    lm = stage_model(config("dpo"), nnx.Rngs(params=1))
    log_probs = jax.jit(lambda mb: pair_log_probs(lm, mb, average=False))
    logps = {}
    for left, r in rows.items():
        targets = np.roll(r["input_ids"], -1, axis=1)
        mask = np.zeros((1, width), np.float32)
        mask[0, r["start"] + 3:r["start"] + len(seq) - 1] = 1.0  # the "response": tokens 4.. of the sequence
        side = {"input_ids": r["input_ids"], "targets": targets, "positions": r["positions"],
                "segment_ids": r["segment_ids"], "loss_mask": mask}
        mb = {f"{s}_{k}": jax.numpy.asarray(v) for s in ("chosen", "rejected") for k, v in side.items()}
        logps[left] = np.asarray(log_probs(mb))
    np.testing.assert_allclose(logps[True], logps[False], rtol=1e-5, atol=1e-5)
    assert np.all(logps[False] < 0)


@pytest.mark.parametrize("kind, extra, trains", [
    ("sft", dict(lora=LORA), "adapters"),
    ("reward", dict(lora=LORA, reward={"enabled": True}), "adapters and head"),
    ("dpo", dict(lora=LORA), "adapters"),
    ("sft", {}, "everything"),
])
def test_each_stage_task_trains_what_its_config_says(kind, extra, trains):
    """The task a stage gets: its model class, and its trainable set by the config's meaning
    (LoRA: only adapters, plus a reward model's head). Kills `stage_task` returning a task
    without its `**common` part (an SFT LoRA run would train every weight), and a pretraining
    config not getting the pretraining task (`st.kind == "pretrain"` mutated)."""
    from nemojax.model.transformer import NemotronLM
    from nemojax.model.reward import NemotronRewardModel
    from nemojax.train.build import PRETRAIN

    cfg = config(kind, **extra)
    task = stage_task(cfg)
    model = nnx.eval_shape(lambda: task.make_model(cfg, nnx.Rngs(params=0)))
    assert type(model) is (NemotronRewardModel if kind == "reward" else NemotronLM)
    params = set(flat(nnx.to_pure_dict(nnx.state(model, nnx.Param))))
    trained = params if task.trainable is None else set(flat(nnx.to_pure_dict(nnx.state(model, task.trainable))))
    want = {n for n in params if trains == "everything" or "_lora_" in n
            or (trains == "adapters and head" and n.startswith("reward_head."))}
    assert trained == want and want
    assert stage_task(config("pretrain")) is PRETRAIN
