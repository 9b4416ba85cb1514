"""The Nemotron-4 reward model: the decoder trunk plus a linear regression head (model.reward).

As in Nemotron-4-340B-Reward, the LM head is replaced by one linear layer with bias on the
final hidden state of the last token of the scored response, the `<extra_id_2>` that ends it
(`nemojax.data.chat.encode_reward_input`). It predicts one score per attribute (default the
five HelpSteer2 ones); the scalar reward is their weighted sum with `model.reward.weights`.

The trunk's parameters have the same names and shapes as `NemotronLM`'s (embed, blocks,
final_norm_*), so a language-model checkpoint initialises it (`checkpoint.load_base_params`)
and LoRA adapters apply unchanged. `make_model` / `make_abstract_model` build the right class
for any ModelConfig: a reward model when `model.reward.enabled`, else the language model.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nemojax.config import ModelConfig
from nemojax.model.transformer import DTYPES, Blocks, NemotronLM, _const, _param


class RewardHead(nnx.Module):
    """Linear layer with bias: hidden [.., D] -> attribute scores [.., N] (fp32)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        n, dt = len(cfg.reward.attributes), DTYPES[cfg.param_dtype]
        self.kernel = _param(rngs, (cfg.hidden_size, n), cfg.init_std, ("embed", None), dt)
        self.bias = _const((n,), (None,), dt)

    def __call__(self, h: jax.Array) -> jax.Array:
        h = h.astype(jnp.float32)
        return h @ self.kernel[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)


class NemotronRewardModel(nnx.Module):
    """Decoder trunk + `RewardHead`; `model(ids, attention_mask=...)` returns scores [batch, N]."""

    # The trunk's forward is the language model's, unchanged (embeddings, blocks, final norm).
    hidden = NemotronLM.hidden

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt = DTYPES[cfg.param_dtype]
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), cfg.init_std, ("vocab", "embed"), dt)
        self.blocks = Blocks(cfg, rngs)
        self.final_norm_scale = _const((cfg.hidden_size,), ("norm",), dt)
        self.final_norm_bias = _const((cfg.hidden_size,), ("norm",), dt)
        self.reward_head = RewardHead(cfg, rngs)

    @property
    def attributes(self) -> list[str]:
        return list(self.cfg.reward.attributes)

    def __call__(self, input_ids: jax.Array, *, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, attention_mask: jax.Array | None = None,
                 last_index: jax.Array | None = None) -> jax.Array:
        """Attribute scores [batch, N] in fp32, read at each row's last token.

        Rows may be padded on either side. The scored position is `last_index` [batch] when
        given, else the last real token (the last 1 of attention_mask, or the last segment_ids
        > 0), else the last position. Real tokens never attend to padding and RoPE depends only
        on relative positions, so a left-padded row scores like the row without its padding.
        """
        if attention_mask is not None and segment_ids is None:
            segment_ids = (attention_mask > 0).astype(jnp.int32)
        if last_index is None:
            if segment_ids is not None:
                last_index = last_true(segment_ids > 0)
            else:
                last_index = jnp.full((input_ids.shape[0],), input_ids.shape[1] - 1)
        h, _ = self.hidden(input_ids, positions=positions, segment_ids=segment_ids)
        return self.scores_from_hidden(h, last_index)

    def scores_from_hidden(self, h: jax.Array, last_index: jax.Array) -> jax.Array:
        """Head applied to the hidden state at `last_index` of each row: [batch, N]."""
        last = jnp.take_along_axis(h, last_index.astype(jnp.int32)[:, None, None], axis=1)[:, 0]
        return self.reward_head(last)

    def reward(self, scores: jax.Array) -> jax.Array:
        """The scalar reward [batch]: scores weighted by `model.reward.weights`."""
        return aggregate(scores, self.cfg)


def last_true(mask: jax.Array) -> jax.Array:
    """Index of the last True of each row of `mask` [batch, seq] (the last position if none)."""
    seq = mask.shape[-1]
    return (seq - 1 - jnp.argmax(mask[:, ::-1], axis=-1)).astype(jnp.int32)


def aggregate(scores: jax.Array, cfg: ModelConfig) -> jax.Array:
    """sum_i weight_i * score_i over the last axis, with the config's attribute weights."""
    return scores @ jnp.asarray(cfg.reward.weight_vector(), scores.dtype)


def model_class(cfg: ModelConfig) -> type:
    return NemotronRewardModel if cfg.reward.enabled else NemotronLM


def make_model(cfg: ModelConfig, seed: int = 0) -> Any:
    """A freshly initialised model of the class `cfg` describes (reward or language model)."""
    return model_class(cfg)(cfg, rngs=nnx.Rngs(params=seed))


def make_abstract_model(cfg: ModelConfig) -> Any:
    """`make_model` with ShapeDtypeStruct leaves: shapes and metadata without allocating."""
    return nnx.eval_shape(lambda: make_model(cfg))
