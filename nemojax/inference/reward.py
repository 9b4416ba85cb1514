"""Scoring conversations with a reward model: the API the server and the SDG pipeline use.

    from nemojax.inference.reward import RewardScorer

    scorer = RewardScorer.from_checkpoint("runs/reward")          # or RewardScorer(model, tokenizer)
    scorer.attributes                                             # ["helpfulness", ..., "verbosity"]
    scorer.score([[{"role": "user", "content": "2+2?"},
                   {"role": "assistant", "content": "4"}]])
    # -> [{"helpfulness": 3.1, "correctness": 3.4, "coherence": 3.8, "complexity": 1.2,
    #      "verbosity": 0.9, "reward": 4.93}]

Contract (stable):
* `score(conversations)` takes a list of conversations, each a list of {"role", "content"}
  messages (optional leading system, then user/assistant turns) ENDING WITH the assistant
  response to score. It returns one dict per conversation, in input order: every attribute
  name -> its predicted score, plus "reward" -> the weighted sum with the checkpoint's
  `model.reward.weights` (Nemotron-4-340B-Reward's by default). Floats, JSON-ready.
* A malformed conversation raises `ChatFormatError` naming its index; nothing is scored.
* Inputs are tokenized exactly as reward training tokenizes them
  (`nemojax.data.chat.encode_reward_input`: bos, the chat template, content escaped, the
  response closed by `<extra_id_2>`). A conversation longer than `max_len` tokens loses
  tokens from the left (bos kept), so the response and `<extra_id_2>` are always scored;
  `stats["truncated"]` counts them.
* Batches have static shapes: conversations are sorted by length, grouped into length buckets
  (powers of two from 32 up to max_len, and max_len itself) and padded to `batch_size` rows,
  so each bucket compiles once (`compile_counts()` reports how often each did). Thread-safe
  for one caller at a time; the server serialises calls.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nemojax.data.chat_template import ChatFormatError

Conversation = Sequence[Mapping[str, str]]
MIN_BUCKET = 32


def length_buckets(max_len: int, smallest: int = MIN_BUCKET) -> list[int]:
    """Padded lengths used for batches: powers of two from `smallest` below max_len, then max_len."""
    out, n = [], smallest
    while n < max_len:
        out.append(n)
        n *= 2
    return out + [max_len]


class RewardScorer:
    """Batched, length-bucketed, jitted scoring with a `NemotronRewardModel` (see module docstring)."""

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 8, max_len: int | None = None) -> None:
        import jax
        from flax import nnx

        cfg = model.cfg
        if not cfg.reward.enabled:
            raise ValueError("RewardScorer needs a reward model (a checkpoint trained with model.reward.enabled: "
                             "true); this one is a language model")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.max_len = int(max_len or cfg.max_seq_len)
        if not 2 <= self.max_len <= cfg.max_seq_len:
            raise ValueError(f"max_len={self.max_len} must be in [2, model.max_seq_len={cfg.max_seq_len}]")
        self.attributes = list(cfg.reward.attributes)
        self.weights = np.asarray(cfg.reward.weight_vector(), np.float64)
        self.buckets = length_buckets(self.max_len)
        self.stats = {"scored": 0, "truncated": 0}
        self._compiles: dict[int, int] = {}
        self._lock = threading.Lock()
        graphdef, state = nnx.split(model)

        def forward(state: Any, ids: jax.Array, segment_ids: jax.Array, last: jax.Array) -> jax.Array:
            self._compiles[ids.shape[1]] = self._compiles.get(ids.shape[1], 0) + 1  # runs at trace time only
            return nnx.merge(graphdef, state)(ids, segment_ids=segment_ids, last_index=last)

        self._state = state
        self._forward = jax.jit(forward)

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, tokenizer: Any = None, batch_size: int = 8,
                        max_len: int | None = None, dtype: str | None = None) -> "RewardScorer":
        """Load a reward checkpoint (and its tokenizer.model if it has one, else the builtin one)."""
        from nemojax.checkpoint import load_model
        from nemojax.data.tokenizer import load_tokenizer

        kw = {} if dtype is None else {"param_dtype": dtype, "compute_dtype": dtype}
        model = load_model(path, **kw)
        if tokenizer is None:
            own = Path(path) / "tokenizer.model"
            tokenizer = load_tokenizer(own if own.is_file() else "builtin")
        elif isinstance(tokenizer, (str, Path)):
            tokenizer = load_tokenizer(tokenizer)
        return cls(model, tokenizer, batch_size=batch_size, max_len=max_len)

    # ------------------------------------------------------------------ tokens
    def encode(self, conversation: Conversation) -> tuple[list[int], bool]:
        """(ids scored for one conversation, whether it was truncated to max_len)."""
        from nemojax.data.chat import encode_reward_input

        ids = encode_reward_input(self.tokenizer, conversation)
        if len(ids) <= self.max_len:
            return ids, False
        return [ids[0]] + ids[len(ids) - self.max_len + 1:], True

    # ------------------------------------------------------------------ scoring
    def score(self, conversations: Sequence[Conversation]) -> list[dict[str, float]]:
        """Attribute scores and the weighted "reward" for each conversation, in input order."""
        encoded, truncated = [], 0
        for i, conv in enumerate(conversations):
            try:
                ids, cut = self.encode(conv)
            except ChatFormatError as e:
                raise ChatFormatError(f"conversations[{i}]: {e}") from None
            encoded.append(ids)
            truncated += cut
        scores = self.score_ids(encoded)
        with self._lock:
            self.stats["truncated"] += truncated
        return [self._as_dict(row) for row in scores]

    def score_ids(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        """Attribute scores [n, N] (float32) for token sequences that each end with `<extra_id_2>`."""
        import jax.numpy as jnp

        n = len(sequences)
        out = np.zeros((n, len(self.attributes)), np.float32)
        if n == 0:
            return out
        lengths = np.array([len(s) for s in sequences])
        if lengths.min() < 1 or lengths.max() > self.max_len:
            raise ValueError(f"token sequences must have 1..{self.max_len} tokens, got lengths "
                             f"{int(lengths.min())}..{int(lengths.max())}")
        order = np.argsort(lengths, kind="stable")
        B = self.batch_size
        with self._lock:
            for start in range(0, n, B):
                idx = order[start:start + B]
                width = next(b for b in self.buckets if b >= lengths[idx].max())
                ids = np.zeros((B, width), np.int32)
                seg = np.zeros((B, width), np.int32)
                last = np.zeros((B,), np.int32)
                for r, j in enumerate(idx):
                    L = lengths[j]
                    ids[r, :L] = sequences[j]
                    seg[r, :L] = 1
                    last[r] = L - 1
                got = self._forward(self._state, jnp.asarray(ids), jnp.asarray(seg), jnp.asarray(last))
                out[idx] = np.asarray(got)[:len(idx)]
            self.stats["scored"] += n
        return out

    def _as_dict(self, row: np.ndarray) -> dict[str, float]:
        d = {a: float(v) for a, v in zip(self.attributes, row)}
        d["reward"] = float(np.dot(self.weights, row.astype(np.float64)))
        return d

    def compile_counts(self) -> dict[int, int]:
        """How many times each bucket length was compiled (1 each when shapes stay static)."""
        return dict(self._compiles)
