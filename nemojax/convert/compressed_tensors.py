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
weights with nemojax's.
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

