"""Config loading: presets, overrides, typo suggestions, impossible combinations, info JSON."""

import json

import pytest

from nemojax.cli import main as cli_main
from nemojax.config import ConfigError, load_config


def test_presets_load_with_published_hyperparameters():
    big = load_config("nemotron4-340b").model
    assert (big.num_layers, big.hidden_size, big.num_heads, big.num_kv_heads, big.head_dim) == (96, 18432, 96, 8, 192)
    assert (big.ffn_hidden_size, big.vocab_size, big.init_std, big.rotary_percentage) == (73728, 256000, 0.0063, 0.5)
    mid = load_config("nemotron4-15b").model
    assert (mid.num_layers, mid.hidden_size, mid.num_heads, mid.num_kv_heads, mid.init_std) == (32, 6144, 48, 8, 0.0134)
    assert load_config("tiny").model.hidden_size == 256
    assert load_config("nemotron4-1b").model.num_layers == 20


def test_dotted_overrides_are_typed():
    cfg = load_config("tiny", ["model.num_layers=2", "mesh.tensor=2", "optimizer.learning_rate=1e-3",
                               "steps=7", "model.compute_dtype=bfloat16"])
    assert cfg.model.num_layers == 2 and cfg.mesh.tensor == 2 and cfg.steps == 7
    assert cfg.optimizer.learning_rate == pytest.approx(1e-3)
    assert cfg.model.compute_dtype == "bfloat16"


def test_typo_names_key_and_closest_matches():
    with pytest.raises(ConfigError, match=r"model\.num_layrs.*model\.num_layers"):
        load_config("tiny", ["model.num_layrs=3"])
    with pytest.raises(ConfigError, match=r"'stpes'.*steps"):
        load_config("tiny", ["stpes=3"])


@pytest.mark.parametrize("override, fragment", [
    ("model.num_kv_heads=3", "not divisible by model.num_kv_heads=3"),
    ("model.head_dim=16", "does not equal model.hidden_size=256"),
    ("model.rotary_percentage=0.3", "even integer"),
    ("model.remat_policy=sometimes", "remat_policy"),
    ("model.attention_backend=flash9", "attention_backend"),
    ("model.attention_max_segments=1", "attention_max_segments must be >= 2"),
    ("model.num_layers=two", "must be an integer"),
    ("model.param_dtype=float16", "float32 or bfloat16"),
    ("mesh.fsdp=-1", "at most one axis"),
])
def test_impossible_combinations_fail_at_load(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config("tiny", [override])


def test_bad_override_syntax_and_missing_file():
    with pytest.raises(ConfigError, match="key=value"):
        load_config("tiny", ["model.num_layers"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("no/such/config.yaml")


def test_base_inheritance(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("base: models/tiny.yaml\nmodel:\n  num_layers: 3\nsteps: 5\n")
    cfg = load_config(child)
    assert cfg.model.num_layers == 3 and cfg.model.hidden_size == 256 and cfg.steps == 5


def _info(capsys, *argv):
    assert cli_main(["info", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_info_340b_and_15b_parameter_counts(capsys):
    big = _info(capsys, "nemotron4-340b")["parameters"]
    assert abs(big["total"] / 341.0e9 - 1) < 0.005
    assert abs(big["non_embedding"] / 331.6e9 - 1) < 0.005
    assert big["embedding"] == 2 * 256000 * 18432
    mid = _info(capsys, "nemotron4-15b")["parameters"]
    assert abs(mid["total"] / 15.6e9 - 1) < 0.005


def test_info_flops_match_hand_count(capsys):
    out = _info(capsys, "tiny", "--seq-len", "128")
    d, h, kv, hd, f, L, v, s = 256, 8, 2, 32, 1024, 4, 4096, 128
    fwd = 2 * (L * (2 * d * h * hd + 2 * d * kv * hd + 2 * d * f) + d * v) + 4 * s * h * hd * L
    assert out["flops_per_token"]["train"] == 3 * fwd


def test_info_reports_config_errors_cleanly(capsys):
    assert cli_main(["info", "tiny", "model.num_kv_heads=3"]) == 2
    assert "num_kv_heads" in capsys.readouterr().err


def test_distributed_section_feeds_jax_distributed_settings():
    from nemojax.parallel.distributed import resolve_settings

    cfg = load_config("tiny", ["distributed.coordinator_address=10.0.0.1:1234",
                               "distributed.num_processes=4", "distributed.process_id=0"])
    source, kwargs = resolve_settings(cfg.distributed.settings())
    assert kwargs == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 0}
    assert load_config("tiny").distributed.settings() == {}
    with pytest.raises(ConfigError, match="num_processes"):
        resolve_settings(load_config("tiny", ["distributed.process_id=1",
                                              "distributed.coordinator_address=h:1"]).distributed.settings())


def test_remat_policy_names_match_the_model():
    """config.py names the remat policies (it must not import the model); the model implements
    exactly those."""
    from nemojax.config import REMAT_POLICY_NAMES
    from nemojax.model.transformer import REMAT_POLICIES

    assert set(REMAT_POLICY_NAMES) == set(REMAT_POLICIES)


def test_moved_keys_name_their_new_place():
    for old, new in (("mesh.zero1=false", "sharding.zero1"), ("mesh.rules.kv_heads=null", "sharding.rules"),
                     ("mesh.sequence_parallel=true", "sharding.sequence_parallel"),
                     ("mesh.virtual_stages=2", "pipeline.virtual_stages"),
                     ("mesh.microbatches=4", "pipeline.microbatches")):
        with pytest.raises(ConfigError, match=f"has moved: write {new}"):
            load_config("tiny", [old])
