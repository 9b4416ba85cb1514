"""A tiny random `transformers.NemotronForCausalLM` for tests that need a reference nobody here wrote.

Other test modules import this (`from hf_tiny import ...`; pytest puts tests/ on sys.path).
HF's own init sets every LayerNorm1P weight and bias to zero-ish constants, which would hide a
wrong norm mapping, so `make_tiny_hf_model` draws them at random too. Everything is float32 on
CPU and seeded, so two calls with the same arguments give identical weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The shape every nemojax test uses unless it needs otherwise: GQA (4 query / 2 KV heads) and
# partial RoPE (half of head_dim 16), so both mappings are exercised.
TINY_HF_KWARGS: dict[str, Any] = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    initializer_range=0.05,
    norm_eps=1e-5,
    rope_theta=10000.0,
    partial_rotary_factor=0.5,
    bos_token_id=2,
    eos_token_id=3,
    pad_token_id=0,
    tie_word_embeddings=False,
)


def tiny_hf_config(**overrides: Any) -> Any:
    """A `transformers.NemotronConfig` of TINY_HF_KWARGS updated with `overrides`."""
    from transformers import NemotronConfig

    return NemotronConfig(**{**TINY_HF_KWARGS, **overrides})


def make_tiny_hf_model(seed: int = 0, norm_std: float = 0.2, **overrides: Any) -> Any:
    """A seeded random fp32 NemotronForCausalLM in eval mode, with random LayerNorm1P params."""
    import torch
    from transformers import NemotronForCausalLM

    torch.manual_seed(seed)
    model = NemotronForCausalLM(tiny_hf_config(**overrides)).to(torch.float32).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # input_layernorm, post_attention_layernorm, model.norm
                p.copy_(torch.randn(p.shape, generator=gen) * norm_std)
    return model


def save_tiny_hf(out_dir: str | Path, seed: int = 0, max_shard_size: str | int | None = None,
                 **overrides: Any) -> tuple[Any, Path]:
    """Build `make_tiny_hf_model(seed, **overrides)`, save_pretrained it to out_dir (safetensors).

    max_shard_size (e.g. "20KB") makes save_pretrained write indexed shards.
    Returns (model, out_dir).
    """
    model = make_tiny_hf_model(seed, **overrides)
    out = Path(out_dir)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out, safe_serialization=True, **kwargs)
    return model, out


def hf_logits(model: Any, input_ids: Any, attention_mask: Any = None) -> Any:
    """fp32 numpy logits of the HF model for numpy/array-like ids (and optional mask)."""
    import numpy as np
    import torch

    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    mask = None if attention_mask is None else torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    return out.logits.float().numpy()
