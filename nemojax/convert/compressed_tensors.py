"""FP8 weights in the compressed-tensors format, the format vLLM documents for FP8 checkpoints.

A quantized nemojax model (model.quant.mode fp8) exports as a Hugging Face Nemotron directory
whose `config.json` carries a compressed-tensors `quantization_config` and whose quantized
linear layers hold, next to each other,

    <layer>.weight        F8_E4M3  [out, in]   the e4m3 values, as nemojax stores them
    <layer>.weight_scale  F32      [out, 1]    one scale per output channel ("channel")

with weight = weight_scale * values (symmetric, no zero point) and the weights alone quantized
(`input_activations: null`): vLLM's FP8 W8A16 scheme (CompressedTensorsW8A16Fp8: tensor, channel
or 2-D block scales; Marlin on GPUs without FP8 compute). nemojax's 1 x block_size blocks are
compressed-tensors' "group" strategy, which that scheme does not take, so only per-channel
models export. The format name is the one the library infers for a weight-only float scheme
(`naive-quantized`; vLLM treats it like `float-quantized`).
Embeddings and lm_head stay in the export dtype (`ignore: ["lm_head"]`; embeddings are not a
Linear). vLLM reads the same `config.json` keys; tests/test_quant_export.py loads the export with
the compressed-tensors library itself (and through transformers) and compares its dequantized
weights with nemojax's. nemojax reads such a directory back as an fp8 model
(`quant_from_hf_config`; the values and scales are taken as stored).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nemojax.config import ModelConfig

QUANT_METHOD = "compressed-tensors"
FORMAT = "naive-quantized"
SAFETENSORS_FP8 = "F8_E4M3"


def quantization_config(cfg: ModelConfig) -> dict[str, Any]:
    """config.json's `quantization_config` for a per-channel fp8 `cfg` (weights only)."""
    if cfg.quant.mode != "fp8" or cfg.quant.block_size:
        raise ValueError(f"compressed-tensors export takes fp8 with one scale per output channel, not "
                         f"{cfg.quant.mode} with block_size {cfg.quant.block_size}")
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": "channel",
               "group_size": None, "block_structure": None, "actorder": None, "observer": "minmax",
               "observer_kwargs": {}}
    return {"quant_method": QUANT_METHOD, "format": FORMAT, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None, "format": FORMAT}},
            "ignore": ["lm_head"], "kv_cache_scheme": None, "sparsity_config": {}}


def scale_to_hf(scale: np.ndarray, n_in: int) -> np.ndarray:
    """One layer's nemojax scale ([in blocks..., out dims...], same rank as the weight) as
    compressed-tensors' weight_scale [out, groups] (groups along the flattened input; 1 per channel)."""
    groups = int(np.prod(scale.shape[:n_in]))
    return np.asarray(scale, np.float32).reshape(groups, -1).T



def quant_from_hf_config(qc: Any) -> str:
    """The nemojax quantization mode of a config.json `quantization_config` nemojax can read:
    "fp8" for compressed-tensors FP8 weights with one scale per output channel (what `to-hf`
    writes); ConfigError naming the field for anything else."""
    from nemojax.config import ConfigError

    where = "config.json field 'quantization_config'"
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        method = qc.get("quant_method") if isinstance(qc, dict) else qc
        raise ConfigError(f"{where} has quant_method {method!r}; nemojax reads {QUANT_METHOD!r} FP8 checkpoints "
                          f"(per-channel weights) only")
    groups = qc.get("config_groups") or {}
    schemes = [g for g in groups.values() if isinstance(g, dict)]
    ok = len(schemes) == 1 and schemes[0].get("input_activations") is None and \
        set(schemes[0].get("targets") or []) == {"Linear"}
    w = schemes[0].get("weights") or {} if schemes else {}
    ok = ok and (w.get("type"), w.get("num_bits"), w.get("strategy"), w.get("symmetric", True),
                 bool(w.get("dynamic"))) == ("float", 8, "channel", True, False)
    ok = ok and qc.get("format") in ("naive-quantized", "float-quantized") and \
        set(qc.get("ignore") or []) <= {"lm_head", "re:.*lm_head"}
    if not ok:
        raise ConfigError(f"{where} describes a scheme nemojax does not compute ({_json_short(qc)}); it reads "
                          f"weight-only FP8 (float, 8 bits, symmetric, static, strategy 'channel', one group "
                          f"targeting Linear, no input activations)")
    return "fp8"


def _json_short(obj: Any, limit: int = 300) -> str:
    import json

    text = json.dumps(obj, sort_keys=True)
    return text if len(text) <= limit else text[:limit] + "..."
