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


def config(kind: str, **model):
    return config_from_dict({"model": dict(MODEL, **model), "mesh": {"data": 1, "fsdp": 2}, "steps": 1, "seed": 5,
                             "stage": {"kind": kind, "train": "unused.jsonl"},
                             "data": dict(seq_len=16, global_batch_size=2, micro_batch_size=2)})


def flat(tree: dict, prefix: str = "") -> dict[str, jax.Array]:
    out = {}
    for k, v in tree.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


@pytest.mark.parametrize("kind, extra, lacking", [
    ("reward", dict(reward={"enabled": True}), {"reward_head.kernel", "reward_head.bias"}),
    ("dpo", dict(lora=LORA), {"blocks.q_lora_a", "blocks.q_lora_b", "blocks.up_lora_a", "blocks.up_lora_b"}),
])
def test_base_weights_where_the_base_has_them_a_fresh_init_where_it_lacks_them(tmp_path, kind, extra, lacking):
    """Kills: the fresh part not computed (`if not missing` inverted) or seeded otherwise, a fresh
    leaf put under the wrong name (`_put` / `_get` mutants), the requested shardings ignored."""
    base_cfg = config("sft").model
    base = make_model(base_cfg, seed=11)  # another seed than the stage's: a base leaf is not a fresh one
    save_model(base, base_cfg, tmp_path / "base")
    cfg = config(kind, **extra)
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
    for name in lacking:
        assert got[name].sharding.is_equivalent_to(wanted[name], got[name].ndim), name
    assert any(len(wanted[n].device_set) == 2 and not wanted[n].is_fully_replicated for n in lacking)


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
