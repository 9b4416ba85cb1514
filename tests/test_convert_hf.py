"""HF Nemotron <-> nemojax conversion, checked against transformers' own NemotronForCausalLM.

The reference is a tiny random HF model (tests/hf_tiny.py) with random LayerNorm1P weights, so
a wrong transpose, head split, norm offset or RoPE fraction shows up as a logits mismatch.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import nemojax  # noqa: E402
from hf_tiny import TINY_HF_KWARGS, hf_logits, save_tiny_hf  # noqa: E402
from nemojax.cli import main  # noqa: E402
from nemojax.config import ConfigError  # noqa: E402
from nemojax.convert.hf import (  # noqa: E402
    CheckpointError,
    convert_from_hf,
    hf_config_to_model_config,
    model_config_to_hf_config,
    parse_size,
)


def _batch() -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids of lengths 12, 7 and 3 (pad id 0), and their attention mask."""
    rng = np.random.RandomState(0)
    ids = rng.randint(4, TINY_HF_KWARGS["vocab_size"], size=(3, 12))
    mask = np.zeros_like(ids)
    for row, n in enumerate((12, 7, 3)):
        mask[row, :n] = 1
    return ids * mask, mask


def _nemojax_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))


def _hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(hf_model, hf_dir, nemojax_dir): the reference saved by HF, converted by the CLI."""
    root = tmp_path_factory.mktemp("convert")
    hf_model, hf_dir = save_tiny_hf(root / "hf", seed=0)
    assert main(["convert", "from-hf", str(hf_dir), str(root / "nj"), "--quiet"]) == 0
    return hf_model, hf_dir, root / "nj"


def test_from_hf_logits_match_transformers_on_right_padded_batch(converted):
    hf_model, _, nj_dir = converted
    ids, mask = _batch()
    ref = hf_logits(hf_model, ids, mask)
    model = nemojax.load(nj_dir)
    assert model.cfg.num_kv_heads == 2 and model.cfg.rotary_percentage == 0.5
    out = _nemojax_logits(model, ids, mask)
    real = mask.astype(bool)
    assert np.abs(ref[real]).max() > 0.5  # logits are not trivially tiny
    assert np.abs(out[real] - ref[real]).max() <= 1e-4


def test_to_hf_reproduces_every_tensor_and_loads_in_transformers(converted, tmp_path):
    hf_model, hf_dir, nj_dir = converted
    out_dir = tmp_path / "back"
    assert main(["convert", "to-hf", str(nj_dir), str(out_dir), "--quiet"]) == 0
    assert (out_dir / "model.safetensors").is_file() and not (out_dir / "model.safetensors.index.json").exists()
    orig, back = _hf_tensors(hf_dir), _hf_tensors(out_dir)
    assert set(back) == set(orig)
    for name, t in orig.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    cfg = json.loads((out_dir / "config.json").read_text())
    assert cfg["model_type"] == "nemotron" and cfg["architectures"] == ["NemotronForCausalLM"]
    assert cfg["dtype"] == "float32"

    reloaded = transformers.NemotronForCausalLM.from_pretrained(out_dir).eval()
    assert reloaded.config.rope_parameters["partial_rotary_factor"] == 0.5
    assert reloaded.config.head_dim == 16 and reloaded.config.num_key_value_heads == 2
    ids, mask = _batch()
    np.testing.assert_array_equal(hf_logits(reloaded, ids, mask), hf_logits(hf_model, ids, mask))


def test_to_hf_shards_above_max_shard_size(converted, tmp_path):
    _, hf_dir, nj_dir = converted
    out_dir = tmp_path / "sharded"
    assert main(["convert", "to-hf", str(nj_dir), str(out_dir), "--max-shard-size", "40KB", "--quiet"]) == 0
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    shards = sorted(out_dir.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (out_dir / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    for s in shards:  # each shard under the limit unless it holds one tensor that alone is bigger
        with safe_open(str(s), framework="pt") as f:
            assert s.stat().st_size <= 40_000 + 4096 or len(list(f.keys())) == 1
    orig = _hf_tensors(hf_dir)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in orig.values())
    reloaded = transformers.NemotronForCausalLM.from_pretrained(out_dir)
    sd = reloaded.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in orig.items())


def test_sharded_hf_input_converts_identically(converted, tmp_path):
    _, _, nj_dir = converted
    _, sharded_dir = save_tiny_hf(tmp_path / "hf_sharded", seed=0, max_shard_size="30KB")
    assert (sharded_dir / "model.safetensors.index.json").is_file()
    assert len(list(sharded_dir.glob("*.safetensors"))) > 2
    convert_from_hf(sharded_dir, tmp_path / "nj_sharded", progress=False)
    a = nemojax.checkpoint.load_params(nj_dir / "params", nemojax.checkpoint.read_model_config(nj_dir / "config.yaml"))
    b = nemojax.checkpoint.load_params(tmp_path / "nj_sharded" / "params",
                                       nemojax.checkpoint.read_model_config(tmp_path / "nj_sharded" / "config.yaml"))
    flat_a = {k: v for k, v in _flatten(a)}
    flat_b = {k: v for k, v in _flatten(b)}
    assert flat_a.keys() == flat_b.keys() and len(flat_a) == 14
    for k in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[k]), np.asarray(flat_b[k]), err_msg=k)


def _flatten(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def test_bfloat16_conversion_round_trips_bf16_tensors(converted, tmp_path):
    _, hf_dir, _ = converted
    assert main(["convert", "from-hf", str(hf_dir), str(tmp_path / "nj16"), "--dtype", "bfloat16", "--quiet"]) == 0
    model = nemojax.load(tmp_path / "nj16")
    assert model.cfg.param_dtype == "bfloat16" and model.blocks.q[...].dtype == jnp.bfloat16
    assert main(["convert", "to-hf", str(tmp_path / "nj16"), str(tmp_path / "hf16"), "--quiet"]) == 0
    assert json.loads((tmp_path / "hf16" / "config.json").read_text())["dtype"] == "bfloat16"
    back = _hf_tensors(tmp_path / "hf16")
    for name, t in _hf_tensors(hf_dir).items():
        assert back[name].dtype == torch.bfloat16
        assert torch.equal(back[name], t.to(torch.bfloat16)), name  # fp32 -> bf16 rounding, nothing else
    # A bf16 HF directory is read back as bf16 by both sides.
    again = nemojax.load(tmp_path / "hf16")
    assert again.cfg.param_dtype == "bfloat16"
    np.testing.assert_array_equal(np.asarray(again.blocks.up[...]), np.asarray(model.blocks.up[...]))


def test_tied_embeddings_fill_lm_head_from_embeddings(tmp_path):
    hf_model, hf_dir = save_tiny_hf(tmp_path / "tied", seed=3, tie_word_embeddings=True)
    assert "lm_head.weight" not in _hf_tensors(hf_dir)
    model = nemojax.load(hf_dir)
    np.testing.assert_array_equal(np.asarray(model.lm_head[...]), np.asarray(model.embed[...]).T)
    ids, mask = _batch()
    real = mask.astype(bool)
    diff = np.abs(_nemojax_logits(model, ids, mask) - hf_logits(hf_model, ids, mask))[real].max()
    assert diff <= 1e-4


# --------------------------------------------------------------------------- errors


def _copy_hf(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_files_are_named(converted, tmp_path, capsys):
    _, hf_dir, _ = converted
    # A shard listed in the index but absent.
    _, sharded = save_tiny_hf(tmp_path / "sharded", seed=0, max_shard_size="30KB")
    victim = sorted(sharded.glob("model-*-of-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        convert_from_hf(sharded, tmp_path / "out1", progress=False)
    assert main(["convert", "from-hf", str(sharded), str(tmp_path / "out2"), "--quiet"]) == 1
    assert victim.name in capsys.readouterr().err
    # No weights at all.
    empty = tmp_path / "noweights"
    empty.mkdir()
    (empty / "config.json").write_text((hf_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        convert_from_hf(empty, tmp_path / "out3", progress=False)
    # No config.json.
    noconf = _copy_hf(hf_dir, tmp_path / "noconf")
    (noconf / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        convert_from_hf(noconf, tmp_path / "out4", progress=False)


def test_wrong_architecture_is_rejected_naming_the_field(converted, tmp_path, capsys):
    _, hf_dir, _ = converted
    llama = _copy_hf(hf_dir, tmp_path / "llama")
    cfg = json.loads((llama / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "llama", ["LlamaForCausalLM"]
    (llama / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="model_type.*'llama'"):
        convert_from_hf(llama, tmp_path / "out", progress=False)
    assert main(["convert", "from-hf", str(llama), str(tmp_path / "out"), "--quiet"]) == 2
    assert "model_type" in capsys.readouterr().err
    assert not (tmp_path / "out" / "params").exists()


def test_shape_mismatch_and_missing_tensor_are_named(converted, tmp_path):
    _, hf_dir, _ = converted
    bad = _copy_hf(hf_dir, tmp_path / "bad")
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["model.layers.1.self_attn.k_proj.weight"] = tensors["model.layers.1.self_attn.k_proj.weight"][:16]
    del tensors["model.layers.0.mlp.down_proj.weight"]
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        convert_from_hf(bad, tmp_path / "out", progress=False)
    msg = str(err.value)
    assert "model.layers.1.self_attn.k_proj.weight" in msg and "[16, 64]" in msg and "[32, 64]" in msg
    assert "model.safetensors" in msg
    assert "model.layers.0.mlp.down_proj.weight" in msg and "missing" in msg
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- configs


def test_hf_config_mapping_handles_old_and_new_rope_layouts():
    base = {"model_type": "nemotron", "architectures": ["NemotronForCausalLM"], "vocab_size": 128,
            "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4}
    new = hf_config_to_model_config({**base, "num_key_value_heads": 2, "head_dim": 16, "dtype": "bfloat16",
                                     "rope_parameters": {"rope_type": "default", "rope_theta": 5e5,
                                                         "partial_rotary_factor": 0.25}})
    assert (new.rope_base, new.rotary_percentage, new.num_kv_heads, new.head_dim) == (5e5, 0.25, 2, 16)
    assert new.param_dtype == new.compute_dtype == "bfloat16"
    old = hf_config_to_model_config({**base, "head_dim": None, "rope_theta": 20000.0, "rope_percent": 0.5,
                                     "torch_dtype": "float16", "eos_token_id": [3, 7]})
    assert (old.rope_base, old.rotary_percentage, old.head_dim, old.num_kv_heads) == (20000.0, 0.5, 16, 4)
    assert old.param_dtype == "float32" and old.eos_id == 3
    legacy = hf_config_to_model_config({**base, "partial_rotary_factor": 0.75, "head_dim": 16})
    assert legacy.rotary_percentage == 0.75 and legacy.rope_base == 10000.0
    assert hf_config_to_model_config(model_config_to_hf_config(new)) == new
    for field, value in (("hidden_act", "silu"), ("attention_bias", True),
                         ("architectures", ["NemotronForSequenceClassification"]),
                         ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})):
        with pytest.raises(ConfigError, match=field):
            hf_config_to_model_config({**base, field: value})
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        hf_config_to_model_config({k: v for k, v in base.items() if k != "num_hidden_layers"})


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size("100") == 100
    with pytest.raises(ConfigError, match="not understood"):
        parse_size("five gigs")


def test_to_hf_refuses_a_non_empty_directory_without_force(converted, tmp_path, capsys):
    _, _, nj_dir = converted
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["convert", "to-hf", str(nj_dir), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--force" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # nothing written
    assert main(["convert", "to-hf", str(nj_dir), str(out), "--quiet", "--force"]) == 0
    assert (out / "model.safetensors").is_file() and (out / "notes.txt").read_text() == "mine"


def test_to_hf_exports_a_tokenizer_autotokenizer_loads_offline(tmp_path, monkeypatch):
    """tokenizer.model + tokenizer_config.json (with the chat template): transformers tokenizes,
    templates and stops exactly as nemojax does."""
    from nemojax.data.chat import prompt_ids
    from nemojax.data.chat_template import format_chat
    from nemojax.data.tokenizer import load_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, hf_dir = save_tiny_hf(tmp_path / "hf", seed=2, vocab_size=4096)
    assert main(["convert", "from-hf", str(hf_dir), str(tmp_path / "nj"), "--quiet"]) == 0
    assert main(["convert", "to-hf", str(tmp_path / "nj"), str(tmp_path / "out"), "--quiet"]) == 0
    ours = load_tokenizer("builtin")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    for text in ["Hello world", "def f(x):\n    return x  # é", "naïve café 日本語 🙂", " two  spaces", "a\n\nb"]:
        assert hf.encode(text) == ours.encode(text, bos=True), text
        assert hf.decode(ours.encode(text), skip_special_tokens=True) == text
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye?"}]
    for conv, gen in ((msgs, True), (msgs[1:2], True), (msgs[:3], False)):
        assert hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen) == \
            "<s>" + format_chat(conv, add_generation_prompt=gen)
    ids = hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(ids) == prompt_ids(ours, msgs)
    with pytest.raises(Exception, match="unknown role"):
        hf.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)
    gen_cfg = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert gen_cfg["eos_token_id"] == [ours.eos_id, ours.special_id("<extra_id_1>")]
    # and the weights still load next to it
    transformers.NemotronForCausalLM.from_pretrained(tmp_path / "out")
