"""`nemojax.load` / `nemojax.checkpoint`: every accepted checkpoint kind, overrides and errors."""

from __future__ import annotations

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import nemojax
from nemojax.checkpoint import CheckpointError, load_model, resolve_checkpoint, save_model
from nemojax.config import Config, ConfigError, ModelConfig, save_config
from nemojax.model.transformer import init_model

CFG = ModelConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                  ffn_hidden_size=256, max_seq_len=256, init_std=0.05)


def _params(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _assert_same_params(a, b) -> None:
    fa = jax.tree_util.tree_flatten_with_path(_params(a))[0]
    fb = dict(jax.tree_util.tree_flatten_with_path(_params(b))[0])
    assert len(fa) == len(fb) == 14
    for path, leaf in fa:
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(fb[path]), err_msg=str(path))


def _randomize_norms(model, seed: int) -> None:
    """init_model zeroes the LayerNorm1P params; random ones make the round trip meaningful."""
    key = jax.random.key(seed)
    for name in ("attn_norm_scale", "attn_norm_bias", "mlp_norm_scale", "mlp_norm_bias"):
        key, sub = jax.random.split(key)
        var = getattr(model.blocks, name)
        var[...] = 0.1 * jax.random.normal(sub, var[...].shape)


@pytest.fixture(scope="module")
def model():
    m = init_model(CFG, seed=1)
    _randomize_norms(m, 1)
    return m


def test_save_and_load_model_round_trip(model, tmp_path):
    out = save_model(model, CFG, tmp_path / "ckpt")
    assert (out / "config.yaml").is_file() and (out / "params").is_dir()
    loaded = nemojax.load(out)
    assert loaded.cfg == CFG
    _assert_same_params(model, loaded)
    ids = jnp.array([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0]])
    np.testing.assert_array_equal(np.asarray(loaded(ids, attention_mask=mask)),
                                  np.asarray(model(ids, attention_mask=mask)))
    with pytest.raises(FileExistsError, match="params"):
        save_model(model, CFG, out)
    save_model(init_model(CFG, seed=2), CFG, out, overwrite=True)
    assert not np.array_equal(np.asarray(nemojax.load(out).embed[...]), np.asarray(model.embed[...]))


def test_dtype_and_setting_overrides(model, tmp_path):
    out = save_model(model, CFG, tmp_path / "ckpt")
    bf = load_model(out, param_dtype="bfloat16", compute_dtype="bfloat16", attention_backend="dot_product")
    assert bf.cfg.param_dtype == "bfloat16" and bf.cfg.attention_backend == "dot_product"
    assert bf.blocks.q[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(bf.blocks.q[...]),
                                  np.asarray(model.blocks.q[...].astype(jnp.bfloat16)))
    with pytest.raises(ConfigError, match="num_layer"):
        load_model(out, num_layer=3)


def test_run_dir_loads_latest_step_and_step_dir_loads_that_step(tmp_path):
    run = tmp_path / "run"
    cfg = Config(model=CFG)
    save_config(cfg, tmp_path / "unused.yaml")  # the trainer writes the whole Config
    run.mkdir()
    shutil.copy(tmp_path / "unused.yaml", run / "config.yaml")
    models = {}
    for step in (10, 200):
        models[step] = init_model(CFG, seed=step)
        with ocp.StandardCheckpointer() as ck:
            ck.save((run / "checkpoints" / str(step) / "params").absolute(), _params(models[step]))
    (run / "checkpoints" / "300.orbax-checkpoint-tmp-1").mkdir()  # an unfinished save is ignored
    kind, params_dir, cfg_path = resolve_checkpoint(run)
    assert kind == "nemojax" and params_dir.parent.name == "200" and cfg_path == (run / "config.yaml").absolute()
    _assert_same_params(models[200], nemojax.load(run))
    _assert_same_params(models[10], nemojax.load(run / "checkpoints" / "10"))
    _assert_same_params(models[10], nemojax.load(run / "checkpoints" / "10" / "params"))


def test_nnx_state_saved_as_is_also_loads(model, tmp_path):
    """A trainer may hand orbax the nnx.State itself: leaves then sit under a 'value' key."""
    ckpt = tmp_path / "state_ckpt"
    ckpt.mkdir()
    (ckpt / "config.yaml").write_text(f"model: {dataclasses.asdict(CFG)}\n")
    with ocp.StandardCheckpointer() as ck:
        ck.save((ckpt / "params").absolute(), nnx.state(model, nnx.Param))
    _assert_same_params(model, nemojax.load(ckpt))


def test_hf_dir_and_converted_dir_load_to_the_same_model(tmp_path):
    pytest.importorskip("transformers")
    from hf_tiny import save_tiny_hf

    from nemojax.cli import main

    _, hf_dir = save_tiny_hf(tmp_path / "hf", seed=5)
    assert resolve_checkpoint(hf_dir)[0] == "hf"
    assert main(["convert", "from-hf", str(hf_dir), str(tmp_path / "nj"), "--quiet"]) == 0
    direct, converted = nemojax.load(hf_dir, progress=False), nemojax.load(tmp_path / "nj")
    assert direct.cfg == converted.cfg
    _assert_same_params(direct, converted)


def test_errors_name_what_is_missing_or_wrong(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        nemojax.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        nemojax.load(tmp_path / "empty")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no <step>/params"):
        nemojax.load(tmp_path / "run")
    # Weights without a config.
    out = save_model(model, CFG, tmp_path / "ckpt")
    (out / "config.yaml").unlink()
    with pytest.raises(FileNotFoundError, match="no config.yaml found"):
        nemojax.load(out)
    # A config that disagrees with the stored shapes.
    (out / "config.yaml").write_text(f"model: {dataclasses.asdict(dataclasses.replace(CFG, ffn_hidden_size=128))}\n")
    with pytest.raises(CheckpointError, match=r"blocks\.up has shape \[2, 64, 256\].*\[2, 64, 128\]"):
        nemojax.load(out)
    (out / "config.yaml").write_text("steps: 3\n")
    with pytest.raises(ConfigError, match="no 'model:' section"):
        nemojax.load(out)


def test_loading_a_training_checkpoint_does_not_warn_about_item_metadata(tmp_path, caplog):
    """Catches: orbax's "Metadata file does not exist" on every load of a run's checkpoint (the
    CheckpointManager writes that file per step directory, the loader reads the `params` item)."""
    run = tmp_path / "run"
    run.mkdir()
    save_config(Config(model=CFG), run / "config.yaml")
    model = init_model(CFG, seed=3)
    with ocp.CheckpointManager((run / "checkpoints").absolute()) as mgr:
        mgr.save(5, args=ocp.args.Composite(params=ocp.args.StandardSave(_params(model))))
    assert (run / "checkpoints" / "5" / "_CHECKPOINT_METADATA").exists()
    assert not (run / "checkpoints" / "5" / "params" / "_CHECKPOINT_METADATA").exists()
    with caplog.at_level("WARNING"):
        _assert_same_params(model, nemojax.load(run))
    assert not [r for r in caplog.records if "Metadata file does not exist" in r.getMessage()]
