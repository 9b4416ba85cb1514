"""FP8 Hugging Face export in the compressed-tensors format, checked by that format's own library.

`nemojax convert to-hf CKPT DIR --quantize fp8` writes F8_E4M3 weights with F32 weight_scales and
a compressed-tensors quantization_config. The library parses the config into its scheme and
decompresses every layer: the result equals nemojax's dequantized weights exactly; transformers,
loading the directory through the library (dequantize=True), gives the logits of nemojax's
quantized forward. Formats vLLM's FP8 path does not take are refused with a message.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemojax.checkpoint import load_model, save_model
from nemojax.config import ModelConfig
from nemojax.model import quant
from nemojax.model.reward import make_model

pytest.importorskip("compressed_tensors")
torch = pytest.importorskip("torch")

CFG = ModelConfig(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                  ffn_hidden_size=64, init_std=0.1, max_seq_len=64)
HF_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
            "up": "mlp.up_proj", "down": "mlp.down_proj"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from nemojax.cli import main

    d = tmp_path_factory.mktemp("ct")
    save_model(make_model(CFG, seed=4), CFG, d / "base")
    assert main(["convert", "to-hf", str(d / "base"), str(d / "hf"), "--quantize", "fp8", "--no-tokenizer",
                 "--quiet"]) == 0
    return d


def test_the_library_decompresses_nemojax_fp8_weights_exactly(exported):
    from compressed_tensors.compressors.naive_quantized.base import NaiveQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    hf = json.loads((exported / "hf/config.json").read_text())
    qcfg = QuantizationConfig.model_validate(hf["quantization_config"])
    scheme = qcfg.config_groups["group_0"]
    assert scheme.weights.strategy == "channel" and scheme.input_activations is None
    assert qcfg.format == "naive-quantized" and qcfg.ignore == ["lm_head"]
    tensors = load_file(str(exported / "hf/model.safetensors"))
    model = load_model(exported / "base", quantize="fp8")
    blocks = nnx.to_pure_dict(nnx.state(model, nnx.Param))["blocks"]
    for t, name in HF_NAMES.items():
        ours = np.asarray(quant.dequantize(quant.QArray(blocks[t], blocks[quant.scale_name(t)])))
        for layer in range(CFG.num_layers):
            prefix = f"model.layers.{layer}.{name}"
            assert tensors[prefix + ".weight"].dtype == torch.float8_e4m3fn
            assert tensors[prefix + ".weight_scale"].shape == (tensors[prefix + ".weight"].shape[0], 1)
            out = NaiveQuantizationCompressor.decompress(
                {"weight": tensors[prefix + ".weight"], "weight_scale": tensors[prefix + ".weight_scale"]}, scheme)
            n_in = quant.N_IN[t]
            want = ours[layer].reshape(int(np.prod(ours.shape[1:1 + n_in])), -1).T  # HF [out, in]
            np.testing.assert_array_equal(out["weight"].to(torch.float32).numpy(), want)
    assert tensors["lm_head.weight"].dtype == torch.float32  # not quantized, the checkpoint's dtype


def test_transformers_loads_the_export_with_nemojax_fp8_logits(exported):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    hf = AutoModelForCausalLM.from_pretrained(str(exported / "hf"), dtype=torch.float32,
                                              quantization_config=CompressedTensorsConfig(dequantize=True))
    ids = np.array([[2, 5, 9, 33, 17, 100, 4, 8]])
    with torch.no_grad():
        theirs = hf(input_ids=torch.as_tensor(ids)).logits.numpy()
    model = load_model(exported / "base", quantize="fp8")
    graphdef, state = nnx.split(model)
    ours = np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, jnp.asarray(ids)))
    np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=1e-4)


def test_formats_vllm_does_not_take_are_refused(exported, capsys):
    from nemojax.cli import main

    assert main(["convert", "quantize", str(exported / "base"), str(exported / "int8"), "--mode", "int8",
                 "--quiet"]) == 0
    assert main(["convert", "to-hf", str(exported / "int8"), str(exported / "hf_int8"), "--no-tokenizer",
                 "--quiet"]) == 1
    assert "FP8 with one scale per output channel" in capsys.readouterr().err


def test_nemojax_reads_the_fp8_export_back_exactly(exported, tmp_path):
    """The exported directory loads (and so serves) as the same fp8 model; other schemes are named."""
    from nemojax.config import ConfigError

    back = load_model(exported / "hf", progress=False)
    src = load_model(exported / "base", quantize="fp8")
    assert back.cfg.quant.mode == "fp8"
    a, b = (nnx.to_pure_dict(nnx.state(m, nnx.Param)) for m in (src, back))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x.astype(jnp.float32)), np.asarray(y.astype(jnp.float32)))
    hf = json.loads((exported / "hf/config.json").read_text())
    hf["quantization_config"]["config_groups"]["group_0"]["weights"]["strategy"] = "tensor"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(hf))
    (bad / "model.safetensors").symlink_to(exported / "hf/model.safetensors")
    with pytest.raises(ConfigError, match="quantization_config.*strategy 'channel'"):
        load_model(bad, progress=False)
