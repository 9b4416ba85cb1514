"""Checkpoint conversion between nemojax and other ecosystems (Hugging Face `transformers`).

Heavy imports (jax, safetensors) happen inside the functions, so importing this package is cheap.
"""

from nemojax.convert.hf import (
    CheckpointError,
    convert_from_hf,
    convert_to_hf,
    hf_config_to_model_config,
    load_hf_model,
    model_config_to_hf_config,
    save_hf,
)

__all__ = ["CheckpointError", "convert_from_hf", "convert_to_hf", "hf_config_to_model_config",
           "load_hf_model", "model_config_to_hf_config", "save_hf"]
