"""QLoRA: LoRA adapters on a frozen quantized base (model.quant + model.lora) in the post-training stages.

- the adapted forward on a quantized base equals a plain model holding dequantize(W) + (alpha/r) A B;
- a DPO stage from a full-precision base: the base is quantized at load (== the formula, and
  frozen through training: the stored int8 values and scales never change), only adapters train
  and have optimizer state, the reference pass runs the quantized base; the result loads as a
  plain merged model;
- a quantized config without adapters is refused before anything runs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemojax.config import ConfigError, LoraConfig, ModelConfig, QuantConfig, load_config
from nemojax.model import quant
from nemojax.model.lora import LoraParam, merge_lora
from nemojax.model.reward import make_model

BASE = ModelConfig(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                   ffn_hidden_size=64, init_std=0.1, max_seq_len=64)
IDS = jnp.asarray([[2, 5, 9, 33, 17, 100, 4, 8]], jnp.int32)
REPO = Path(__file__).resolve().parent.parent
SMALL = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", "model.head_dim=16",
         "model.ffn_hidden_size=128", "model.max_seq_len=256"]


def forward(model: nnx.Module, ids: jax.Array) -> jax.Array:
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, ids)


@pytest.mark.parametrize("mode,block", [("int8", 0), pytest.param("nf4", 8, marks=pytest.mark.heavy)])
def test_adapters_on_a_quantized_base_equal_dequantized_weights_plus_delta(mode, block):
    cfg = dataclasses.replace(BASE, quant=QuantConfig(mode=mode, block_size=block), lora=LoraConfig(rank=4, alpha=8.0))
    model = make_model(cfg, seed=1)
    state = nnx.state(model, LoraParam)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    nnx.update(model, jax.tree.unflatten(tree, [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]))
    blocks = nnx.to_pure_dict(nnx.state(model, nnx.Param))["blocks"]
    # the reference: numpy dequantization from the formula, plus the adapters' product
    plain = {}
    for t in quant.QUANT_TARGETS:
        v, s = np.asarray(blocks[t]), np.asarray(blocks[quant.scale_name(t)])
        if mode == "nf4":
            codes = np.stack([v & 0xF, v >> 4], axis=-1).reshape(*v.shape[:-1], -1)
            v = np.asarray(quant.NF4_LEVELS)[codes]
        w = v.astype(np.float32)
        for axis, (n, b) in enumerate(zip(w.shape, s.shape)):
            s = np.repeat(s, n // b, axis=axis)
        a, b_ = np.asarray(blocks[t + "_lora_a"]), np.asarray(blocks[t + "_lora_b"])
        delta = np.stack([np.tensordot(a[i], b_[i], axes=1) for i in range(a.shape[0])])  # per layer A @ B
        plain[t] = w * s + cfg.lora.scale * delta
    ref = make_model(BASE, seed=1)
    params = nnx.to_pure_dict(nnx.state(ref, nnx.Param))
    params["blocks"].update({t: jnp.asarray(x) for t, x in plain.items()})
    params["blocks"].update({k: blocks[k] for k in ("attn_norm_scale", "attn_norm_bias", "mlp_norm_scale",
                                                    "mlp_norm_bias")})
    params.update({k: nnx.to_pure_dict(nnx.state(model, nnx.Param))[k] for k in ("embed", "lm_head")})
    graphdef, st = nnx.split(ref)
    nnx.replace_by_pure_dict(st, params)
    ref = nnx.merge(graphdef, st)
    np.testing.assert_allclose(forward(model, IDS), forward(ref, IDS), rtol=1e-5, atol=1e-5)
    merged = merge_lora(model)  # QLoRA merged: a plain model of the dequantized weights + delta
    assert not merged.cfg.quant.enabled and merged.cfg.lora.rank == 0
    np.testing.assert_allclose(forward(merged, IDS), forward(ref, IDS), rtol=1e-5, atol=1e-5)


def test_a_quantized_run_is_a_post_training_stage_with_adapters():
    with pytest.raises(ConfigError, match="a quantized base is frozen.*model.lora.rank > 0"):
        load_config("configs/dpo.yaml", ["model.quant.mode=int8"])
    with pytest.raises(ConfigError, match="QLoRA.*a post-training stage: set stage.kind"):
        load_config("configs/tiny.yaml", ["model.quant.mode=int8", "model.lora.rank=4"])


@pytest.mark.heavy
def test_qlora_dpo_stage_keeps_the_quantized_base_frozen(tmp_path):
    import orbax.checkpoint as ocp

    from nemojax import load
    from nemojax.checkpoint import save_model
    from nemojax.convert.quantize import quantize_model
    from nemojax.train.stages import final_run_dir, run_stage

    lm = load_config("configs/tiny.yaml", SMALL).model
    base = make_model(lm, seed=0)
    save_model(base, lm, tmp_path / "base")
    train = tmp_path / "train.jsonl"
    train.write_text("".join((REPO / "configs/data/preference_train.jsonl").read_text().splitlines(True)[:8]))
    cfg = load_config("configs/dpo.yaml", SMALL + [
        f"run_dir={tmp_path / 'dpo'}", f"init_from={tmp_path / 'base'}", f"stage.train={train}",
        f"stage.validation={train}", "steps=2", "stage.epochs=0", "model.lora.rank=4", "model.quant.mode=int8",
        "data.global_batch_size=4", "log_every=1", "eval_every=2", "eval_batches=1", "checkpoint_every=2",
        "optimizer.warmup_steps=0", "optimizer.learning_rate=5e-2"])
    lines: list[str] = []
    result = run_stage(cfg, log=lines.append, devices=jax.devices()[:1])
    assert result.exit_code == 0, lines[-5:]
    with ocp.StandardCheckpointer() as c:
        after = c.restore(final_run_dir(cfg) / "checkpoints" / "2" / "params")
        meta = c.metadata(final_run_dir(cfg) / "checkpoints" / "2" / "opt_state")
    want = nnx.to_pure_dict(nnx.state(quantize_model(base, "int8"), nnx.Param))["blocks"]
    for t in quant.QUANT_TARGETS:  # quantized at load exactly as the formula, and frozen
        assert after["blocks"][t].dtype == jnp.int8
        np.testing.assert_array_equal(np.asarray(after["blocks"][t]), np.asarray(want[t]))
        np.testing.assert_array_equal(np.asarray(after["blocks"][quant.scale_name(t)]),
                                      np.asarray(want[quant.scale_name(t)]))
    assert any(np.abs(np.asarray(v)).max() > 0 for k, v in after["blocks"].items() if k.endswith("_lora_b"))
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", getattr(meta, "item_metadata", meta))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    assert paths and all("_lora_" in p for p in paths if "['value']" in p)
    model = load(str(final_run_dir(cfg)))
    assert type(model).__name__ == "NemotronLM" and not model.cfg.quant.enabled and model.cfg.lora.rank == 0
