"""LoRA adapters: identity at init, merge == adapted forward, only adapters train, checkpoints, to-hf."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import nemojax
from nemojax.checkpoint import load_model, save_model
from nemojax.config import ConfigError, LoraConfig, ModelConfig, RewardConfig, load_config
from nemojax.model.lora import (LoraParam, adapters_disabled, merge_lora, parameter_counts, trainable_filter)
from nemojax.model.reward import make_model
from nemojax.model.transformer import NemotronLM, logical_axes

BASE = ModelConfig(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                   ffn_hidden_size=64, init_std=0.1, max_seq_len=64, scan_layers=False)  # eager: cheap
LCFG = dataclasses.replace(BASE, lora=LoraConfig(rank=4, alpha=8.0))
IDS = jnp.asarray([[2, 5, 9, 33, 17, 100, 4, 8]], jnp.int32)


def _randomize_adapters(model: nnx.Module, seed: int = 0) -> None:
    state = nnx.state(model, LoraParam)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(model, jax.tree.unflatten(tree, [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]))


@pytest.fixture(scope="module")
def adapted() -> NemotronLM:
    model = make_model(LCFG, seed=1)
    _randomize_adapters(model)
    return model


def test_fresh_adapters_leave_the_model_unchanged_and_carry_logical_axes() -> None:
    base, fresh = make_model(BASE, seed=1), make_model(LCFG, seed=1)
    np.testing.assert_array_equal(fresh(IDS), base(IDS))
    axes = logical_axes(fresh)["blocks"]
    assert axes["q_lora_a"] == ("layers", "embed", "lora_rank")
    assert axes["q_lora_b"] == ("layers", "lora_rank", "heads", "head_dim")
    assert axes["o_lora_a"] == ("layers", "heads", "head_dim", "lora_rank")
    assert axes["down_lora_b"] == ("layers", "lora_rank", "embed")
    counts = parameter_counts(fresh)
    L, D, H, KV, hd, F, r = 2, 32, 4, 2, 8, 64, 4
    per_layer = r * ((D + H * hd) + 2 * (D + KV * hd) + (H * hd + D) + (D + F) + (F + D))
    assert counts["adapters"] == L * per_layer and counts["base"] == parameter_counts(base)["total"]


def test_adapted_forward_equals_the_merged_weights(adapted) -> None:
    merged = merge_lora(adapted)
    assert type(merged) is NemotronLM and merged.cfg.lora.rank == 0 and not nnx.state(merged, LoraParam)
    np.testing.assert_allclose(merged(IDS), adapted(IDS), rtol=2e-5, atol=2e-5)
    # W + (alpha / rank) A @ B, by hand, for one layer of q and of o.
    b = adapted.blocks
    q = b.q[...][1] + 2.0 * jnp.einsum("dr,rhk->dhk", b.q_lora_a[...][1], b.q_lora_b[...][1])
    np.testing.assert_allclose(merged.blocks.q[...][1], q, rtol=1e-6, atol=1e-6)
    o = b.o[...][0] + 2.0 * jnp.einsum("hkr,rd->hkd", b.o_lora_a[...][0], b.o_lora_b[...][0])
    np.testing.assert_allclose(merged.blocks.o[...][0], o, rtol=1e-6, atol=1e-6)
    assert not np.allclose(adapted(IDS), make_model(BASE, seed=1)(IDS), atol=1e-3)  # adapters do something


def test_the_scanned_layer_stack_applies_adapters_too(adapted) -> None:
    scanned = make_model(dataclasses.replace(LCFG, scan_layers=True), seed=1)
    nnx.update(scanned, nnx.state(adapted, nnx.Param))
    np.testing.assert_allclose(scanned(IDS), adapted(IDS), rtol=2e-5, atol=2e-5)


def test_adapters_off_is_the_base_model(adapted) -> None:
    base = make_model(BASE, seed=1)
    with adapters_disabled(adapted):
        np.testing.assert_array_equal(adapted(IDS), base(IDS))
    assert adapted.blocks.lora_enabled
    assert not np.allclose(adapted(IDS), base(IDS), atol=1e-3)


def test_only_adapters_get_gradients_and_optimizer_state(adapted) -> None:
    graphdef, trainable, frozen = nnx.split(adapted, trainable_filter(LCFG), ...)
    assert trainable_filter(BASE) is nnx.Param
    flat = [v for v in jax.tree.leaves(trainable, is_leaf=lambda x: isinstance(x, nnx.Variable))]
    assert flat and all(isinstance(v, LoraParam) for v in flat)
    assert not any(isinstance(v, LoraParam) for v in jax.tree.leaves(frozen, is_leaf=lambda x: isinstance(x, nnx.Variable)))

    def loss(t, f):
        logits = nnx.merge(graphdef, t, f)(IDS)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, IDS[..., None], -1)[..., 0])

    # One compiled function: the gradient a stage takes (adapters only) and, for contrast, the
    # gradient the frozen base weights would get, which is non-zero: excluding them is a real choice.
    grads, base_grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(trainable, frozen)
    g = nnx.to_pure_dict(grads)["blocks"]
    assert set(g) == {f"{t}{s}" for t in LCFG.lora.targets for s in ("_lora_a", "_lora_b")}
    assert all(float(jnp.abs(v).max()) > 0 for v in g.values())
    assert float(jnp.abs(nnx.to_pure_dict(base_grads)["blocks"]["q"]).max()) > 0
    tx = optax.adamw(1e-3)
    opt_state = tx.init(trainable)
    n_opt = sum(x.size for x in jax.tree.leaves(opt_state) if hasattr(x, "size") and x.ndim > 0)
    assert n_opt == 2 * parameter_counts(adapted)["adapters"]  # Adam's two moments, adapters only


def test_checkpoints_load_merged_by_default(adapted, tmp_path) -> None:
    save_model(adapted, LCFG, tmp_path / "ckpt")
    merged = nemojax.load(str(tmp_path / "ckpt"))
    assert type(merged) is NemotronLM and merged.cfg.lora.rank == 0
    np.testing.assert_allclose(merged(IDS), adapted(IDS), rtol=2e-5, atol=2e-5)
    kept = load_model(tmp_path / "ckpt", merge_lora=False)
    assert parameter_counts(kept)["adapters"] == parameter_counts(adapted)["adapters"]
    np.testing.assert_array_equal(kept(IDS), adapted(IDS))


def test_convert_to_hf_writes_the_merged_weights(adapted, tmp_path) -> None:
    pytest.importorskip("safetensors")
    save_model(adapted, LCFG, tmp_path / "ckpt")
    out = subprocess.run([sys.executable, "-m", "nemojax.cli", "convert", "to-hf", str(tmp_path / "ckpt"),
                          str(tmp_path / "hf")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "lora" not in json.dumps(hf_cfg)
    from_hf = nemojax.load(str(tmp_path / "hf"), progress=False)
    np.testing.assert_allclose(from_hf(IDS), adapted(IDS), rtol=2e-5, atol=2e-5)


def test_reward_models_take_adapters_too() -> None:
    cfg = dataclasses.replace(LCFG, reward=RewardConfig(enabled=True))
    base = make_model(dataclasses.replace(BASE, reward=RewardConfig(enabled=True)), seed=2)
    rm = make_model(cfg, seed=2)
    np.testing.assert_array_equal(rm(IDS), base(IDS))
    _randomize_adapters(rm)
    merged = merge_lora(rm)
    np.testing.assert_allclose(merged(IDS), rm(IDS), rtol=2e-5, atol=2e-5)


def test_lora_config_is_validated_and_shown_by_info() -> None:
    with pytest.raises(ConfigError, match="model.lora.targets"):
        load_config("configs/models/tiny.yaml", ["model.lora.rank=4", "model.lora.targets=[q, gate]"])
    with pytest.raises(ConfigError, match="model.lora.rank"):
        load_config("configs/models/tiny.yaml", ["model.lora.rank=-1"])
    out = subprocess.run([sys.executable, "-m", "nemojax.cli", "info", "configs/models/tiny.yaml",
                          "model.lora.rank=8", "model.lora.targets=[q, v]"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    params = json.loads(out.stdout)["parameters"]
    cfg = load_config("configs/models/tiny.yaml").model
    per_layer = 8 * ((cfg.hidden_size + cfg.num_heads * cfg.head_dim) + (cfg.hidden_size + cfg.num_kv_heads * cfg.head_dim))
    assert params["adapters"] == params["trainable"] == cfg.num_layers * per_layer
    assert params["total"] > params["adapters"]
