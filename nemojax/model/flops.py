"""Parameter counts and training FLOPs, derived without allocating any weights."""

from __future__ import annotations

import jax
from flax import nnx

from nemojax.config import ModelConfig
from nemojax.model.lora import LoraParam
from nemojax.model.reward import make_abstract_model


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    """Counted from the abstract model's shapes, so the count can never drift from the code.

    "adapters" counts LoRA adapters (model.lora) and "trainable" what a post-training stage
    updates: the adapters alone with LoRA, every parameter without.
    """
    state = nnx.state(make_abstract_model(cfg), nnx.Param)
    flat = nnx.to_flat_state(state)
    total = embedding = adapters = 0
    for path, var in flat:
        n = int(var.get_value().size) if hasattr(var, "get_value") else int(var.value.size)
        total += n
        if path[0] in ("embed", "lm_head"):
            embedding += n
        if isinstance(var, LoraParam):
            adapters += n
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding,
            "adapters": adapters, "trainable": adapters or total}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token (forward + backward = 3 x forward), PaLM / Megatron convention.

    Matmul FLOPs are 2 per weight per token (the embedding lookup is free; the LM head is a
    matmul), attention scores and values add 2 * 2 * seq * heads * head_dim per layer, counted
    over the full (not causally halved) score matrix as MaxText and Megatron report MFU.
    Remat recomputation is not counted: MFU measures useful work.
    """
    d, h, kv, hd, f, L = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                          cfg.ffn_hidden_size, cfg.num_layers)
    per_layer_weights = d * h * hd + 2 * d * kv * hd + h * hd * d + 2 * d * f
    head = d * len(cfg.reward.attributes) if cfg.reward.enabled else d * cfg.vocab_size  # reward head: tiny
    matmul_fwd = 2 * (L * per_layer_weights + head)
    attn_fwd = 2 * 2 * seq_len * h * hd * L
    fwd = matmul_fwd + attn_fwd
    return {"forward": float(fwd), "train": float(3 * fwd)}


def info(cfg: ModelConfig, seq_len: int) -> dict:
    counts = parameter_counts(cfg)
    fl = flops_per_token(cfg, seq_len)
    return {
        "parameters": {**counts, "total_billions": round(counts["total"] / 1e9, 3),
                       "non_embedding_billions": round(counts["non_embedding"] / 1e9, 3)},
        "seq_len": seq_len,
        "flops_per_token": {"train": fl["train"], "forward": fl["forward"]},
        "jax_backend": jax.default_backend(),
    }
