"""Nemotron-4 and its post-training objectives in float64 numpy, written from the formulas.

What the objective tests compare nemojax's train step with. It shares no code with nemojax:
the architecture is read off /work/shared/NEMOTRON_FACTS.md (pre-LN, LayerNorm1P, NeoX RoPE on
the first `rotary_dim` dims of each head, GQA, squared-ReLU MLP, untied LM head; the reward
model's linear head on the last token; LoRA as W + (alpha / rank) A @ B) and the losses off
NeMo-Aligner's conventions there (Delta without beta, beta applied once, dr = eta * reward gap,
SFT term = -log pi(chosen)). Only sizes and constants come from the `ModelConfig`.

Parameters are nemojax's pure-dict layout converted to numpy (`as_numpy`): `embed` [V, D],
`blocks` with a leading layers axis (q [L, D, H, hd], k / v [L, D, KV, hd], o [L, H, hd, D],
up [L, D, F], down [L, F, D], the four norms [L, D], adapters `{t}_lora_a` / `{t}_lora_b`),
`final_norm_scale` / `_bias`, and `lm_head` [D, V] or `reward_head` {kernel [D, N], bias [N]}.
Other test modules import it (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

from typing import Any

import numpy as np

BLOCK_WEIGHTS = ("q", "k", "v", "o", "up", "down")
# Input dims of each block weight (the rest are output dims): what A @ B contracts over.
INPUT_DIMS = {"q": 1, "k": 1, "v": 1, "o": 2, "up": 1, "down": 1}


def as_numpy(tree: Any) -> Any:
    """A nested dict of arrays (e.g. `nnx.to_pure_dict(state)`) as float64 numpy."""
    if isinstance(tree, dict):
        return {k: as_numpy(v) for k, v in tree.items()}
    return np.asarray(tree, np.float64)


def layernorm1p(x: np.ndarray, scale: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * (1.0 + scale) + bias


def rotary(x: np.ndarray, positions: np.ndarray, rot: int, base: float) -> np.ndarray:
    """NeoX "rotate half" RoPE on the first `rot` dims of each head; x [B, S, H, hd]."""
    half = rot // 2
    freq = base ** (-np.arange(half) * 2.0 / rot)
    angle = positions[:, :, None, None] * freq  # [B, S, 1, half]
    cos, sin = np.cos(angle), np.sin(angle)
    x1, x2, rest = x[..., :half], x[..., half:rot], x[..., rot:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)


def layer_weights(cfg: Any, blocks: dict[str, np.ndarray], layer: int, adapters: bool) -> dict[str, np.ndarray]:
    """Layer `layer`'s weights, with its LoRA adapters folded in when `adapters`."""
    w = {k: v[layer] for k, v in blocks.items() if "_lora_" not in k}
    if adapters and cfg.lora.rank:
        for t in cfg.lora.targets:
            a, b = blocks[f"{t}_lora_a"][layer], blocks[f"{t}_lora_b"][layer]
            w[t] = w[t] + cfg.lora.alpha / cfg.lora.rank * np.tensordot(a, b, axes=1)
    return w


def hidden_states(p: dict, cfg: Any, ids: np.ndarray, positions: np.ndarray, segment_ids: np.ndarray,
                  *, adapters: bool = True) -> np.ndarray:
    """Final-normed hidden states [B, S, D]. A token attends to earlier-or-same slots of its own
    segment (segment 0 = padding, which only padding attends to)."""
    B, S = ids.shape
    H, KV, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    slot = np.arange(S)
    allowed = (slot[None, None, :] <= slot[None, :, None]) & (segment_ids[:, :, None] == segment_ids[:, None, :])
    x = p["embed"][ids]
    for layer in range(cfg.num_layers):
        w = layer_weights(cfg, p["blocks"], layer, adapters)
        h = layernorm1p(x, w["attn_norm_scale"], w["attn_norm_bias"], cfg.norm_eps)
        q = rotary(np.tensordot(h, w["q"], axes=1), positions, cfg.rotary_dim, cfg.rope_base)
        k = rotary(np.tensordot(h, w["k"], axes=1), positions, cfg.rotary_dim, cfg.rope_base)
        v = np.tensordot(h, w["v"], axes=1)
        k, v = np.repeat(k, H // KV, axis=2), np.repeat(v, H // KV, axis=2)  # query head i reads KV head i // (H/KV)
        scores = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(hd)
        scores = np.where(allowed[:, None], scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = np.einsum("bhqs,bshk->bqhk", probs, v)
        x = x + np.einsum("bqhk,hkd->bqd", attn, w["o"], optimize=True)
        h = layernorm1p(x, w["mlp_norm_scale"], w["mlp_norm_bias"], cfg.norm_eps)
        x = x + np.maximum(h @ w["up"], 0.0) ** 2 @ w["down"]
    return layernorm1p(x, p["final_norm_scale"], p["final_norm_bias"], cfg.norm_eps)


def token_log_probs(p: dict, cfg: Any, ids: np.ndarray, positions: np.ndarray, segment_ids: np.ndarray,
                    targets: np.ndarray, mask: np.ndarray, *, adapters: bool = True) -> np.ndarray:
    """log p(targets[b, s] | tokens up to s) [B, S] under the language model where mask > 0 (0
    elsewhere: the vocabulary projection is computed only where it is read)."""
    h = hidden_states(p, cfg, ids, positions, segment_ids, adapters=adapters)
    read = mask > 0
    logits = h[read] @ p["lm_head"]
    m = logits.max(-1, keepdims=True)
    logz = m[:, 0] + np.log(np.exp(logits - m).sum(-1))
    out = np.zeros(ids.shape)
    out[read] = logits[np.arange(len(logits)), targets[read]] - logz
    return out


def response_log_probs(p: dict, cfg: Any, rows: dict[str, np.ndarray], side: str, *, average: bool,
                       adapters: bool = True) -> np.ndarray:
    """Per pair row: log pi(response) of `side` (chosen / rejected), summed over its loss-mask
    tokens, or their mean with `average` (0 for a row without any)."""
    mask = rows[f"{side}_loss_mask"]
    lp = token_log_probs(p, cfg, rows[f"{side}_input_ids"], rows[f"{side}_positions"], rows[f"{side}_segment_ids"],
                         rows[f"{side}_targets"], mask, adapters=adapters)
    total = (lp * mask).sum(-1)
    return total / np.maximum(mask.sum(-1), 1.0) if average else total


def reward_scores(p: dict, cfg: Any, ids: np.ndarray, positions: np.ndarray, segment_ids: np.ndarray,
                  read_at: np.ndarray) -> np.ndarray:
    """Attribute scores [B, N]: the linear head (with bias) on the hidden state at `read_at` [B]."""
    h = hidden_states(p, cfg, ids, positions, segment_ids)
    last = h[np.arange(len(ids)), read_at]
    return last @ p["reward_head"]["kernel"] + p["reward_head"]["bias"]


# --------------------------------------------------------------------------- objectives


def log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return np.exp(log_sigmoid(x))


def preference_loss(kind: str, pi_c: np.ndarray, pi_r: np.ndarray, ref_c: np.ndarray, ref_r: np.ndarray, *,
                    beta: float, eta: float, reward_c: np.ndarray, reward_r: np.ndarray) -> np.ndarray:
    """Per pair, NEMOTRON_FACTS' "Preference losses": Delta = R(chosen) - R(rejected) with
    R = log pi - log ref, z = beta * Delta, dr = eta * (r_chosen - r_rejected)."""
    delta = (pi_c - ref_c) - (pi_r - ref_r)
    z, dr = beta * delta, eta * (reward_c - reward_r)

    def kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # KL(Bern(sig(a)) || Bern(sig(b)))
        return sigmoid(a) * (log_sigmoid(a) - log_sigmoid(b)) + sigmoid(-a) * (log_sigmoid(-a) - log_sigmoid(-b))

    return {"dpo": lambda: -log_sigmoid(z), "ipo": lambda: (delta - 1.0 / (2.0 * beta)) ** 2,
            "rpo_sq": lambda: (z - dr) ** 2, "rpo_bwd_kl": lambda: kl(dr, z),
            "rpo_fwd_kl": lambda: kl(z, dr)}[kind]()


def preference_objective(p: dict, cfg: Any, rows: dict[str, np.ndarray], st: Any) -> dict[str, float]:
    """The step's loss over pair rows [n, ...] (every microbatch flattened) and its parts:
    mean over real pairs of w_pref * loss + w_sft * (-log pi(chosen))."""
    c = response_log_probs(p, cfg, rows, "chosen", average=st.average_log_probs)
    r = response_log_probs(p, cfg, rows, "rejected", average=st.average_log_probs)
    pref = preference_loss(st.kind, c, r, rows["ref_chosen_logps"], rows["ref_rejected_logps"], beta=st.beta,
                           eta=st.eta, reward_c=rows["chosen_reward"], reward_r=rows["rejected_reward"])
    real = rows["example_mask"] > 0
    delta = (c - rows["ref_chosen_logps"]) - (r - rows["ref_rejected_logps"])
    return {"loss": float(np.mean(st.preference_weight * pref[real] - st.sft_weight * c[real])),
            "preference_loss": float(pref[real].mean()), "sft_loss": float(-c[real].mean()),
            "margin": float(st.beta * delta[real].mean()), "accuracy": float((delta[real] > 0).mean()),
            "chosen_logps": float(c[real].mean()), "rejected_logps": float(r[real].mean()),
            "logp_accuracy": float((c[real] > r[real]).mean())}


def sft_objective(p: dict, cfg: Any, rows: dict[str, np.ndarray]) -> float:
    """Mean next-token NLL over the loss-mask tokens of every row (assistant tokens)."""
    lp = token_log_probs(p, cfg, rows["input_ids"], rows["positions"], rows["segment_ids"], rows["targets"],
                         rows["loss_mask"])
    return float(-(lp * rows["loss_mask"]).sum() / rows["loss_mask"].sum())


def reward_objective(p: dict, cfg: Any, rows: dict[str, np.ndarray]) -> float:
    """Masked MSE over every present label of every real row, the head read at `last_index`."""
    s = reward_scores(p, cfg, rows["input_ids"], rows["positions"], rows["segment_ids"], rows["last_index"])
    m = rows["label_mask"] * rows["example_mask"][:, None]
    return float(((s - rows["labels"]) ** 2 * m).sum() / m.sum())
