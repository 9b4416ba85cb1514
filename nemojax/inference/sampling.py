"""Per-request sampling: parameters, logit filters and the seeded token sampler.

Every sampling knob is a per-row array (one row per engine slot), never an engine-wide
setting, so requests with different temperatures, top-p, seeds ... share one decode batch
and one compiled function. Randomness is derived from (request seed, sample index, token
index) alone, so a seeded request gives the same tokens whichever slot it lands in and
whatever else is in the batch.

Filter order (the usual one): temperature, then top-k, then top-p on what top-k kept, then
min-p. `temperature == 0` means greedy (argmax of the raw logits; the other knobs are ignored).
Log-probs reported for chosen tokens are those of the *model's* distribution (log-softmax of
the raw logits, before temperature or filtering), which is what reward/DPO code wants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf
MAX_TOP_LOGPROBS = 20  # alternatives reported per token at most (OpenAI's limit)


class SamplingError(ValueError):
    """A sampling parameter a user must fix; the message names the field."""


@dataclass
class SamplingParams:
    """How one request is sampled. Field names match the JSONL / CLI option names."""

    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]; 1 = off
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    min_p: float = 0.0  # drop tokens whose prob < min_p * max prob; 0 = off
    max_tokens: int = 256  # generated tokens at most (finish_reason "length" when reached); 0 only
    # with prompt_logprobs (score a prompt without generating)
    stop: list[str] = field(default_factory=list)  # stop strings, matched on decoded text
    stop_token_ids: list[int] = field(default_factory=list)  # extra stop tokens (eos is implicit)
    seed: int | None = None  # None: the engine draws one
    n: int = 1  # independent samples of this prompt
    logprobs: bool = False  # report the log-prob of every chosen token
    top_logprobs: int = 0  # also report this many (<= 20) most likely tokens at each position
    prompt_logprobs: bool = False  # report the log-prob of every prompt token after the first

    def validate(self) -> "SamplingParams":
        def bad(name: str, why: str) -> SamplingError:
            return SamplingError(f"{name}={getattr(self, name)!r}: {why}")

        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise bad("temperature", "must be a number >= 0 (0 = greedy)")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", "must be an integer >= 0 (0 = off)")
        if not isinstance(self.min_p, (int, float)) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if not isinstance(self.prompt_logprobs, bool):
            raise bad("prompt_logprobs", "must be true or false")
        lowest = 0 if self.prompt_logprobs else 1
        if not _is_int(self.max_tokens) or self.max_tokens < lowest:
            raise bad("max_tokens", "must be an integer >= 1 (0 only with prompt_logprobs)")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be a string or a list of non-empty strings")
        if not isinstance(self.stop_token_ids, list) or not all(_is_int(t) and t >= 0
                                                                 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be a list of token ids >= 0")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise bad("seed", "must be an integer >= 0 or null")
        if not _is_int(self.n) or self.n < 1:
            raise bad("n", "must be an integer >= 1")
        if not isinstance(self.logprobs, bool):
            raise bad("logprobs", "must be true or false")
        if not _is_int(self.top_logprobs) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise bad("top_logprobs", f"must be an integer in [0, {MAX_TOP_LOGPROBS}]")
        for name in ("temperature", "top_p", "min_p"):
            if not math.isfinite(getattr(self, name)):
                raise bad(name, "must be a finite number")
        self.temperature, self.top_p, self.min_p = (float(self.temperature), float(self.top_p),
                                                    float(self.min_p))
        return self

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], defaults: "SamplingParams | None" = None) -> "SamplingParams":
        """Fields of `raw` that name a sampling parameter override `defaults`; then validate."""
        base = defaults if defaults is not None else cls()
        kw = {f: getattr(base, f) for f in cls.field_names()}
        kw["stop"], kw["stop_token_ids"] = list(kw["stop"]), list(kw["stop_token_ids"])
        for k in cls.field_names():
            if k in raw:
                kw[k] = raw[k]
        return cls(**kw).validate()


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# --------------------------------------------------------------------------- filters
# Each takes logits [batch, vocab] and one parameter per row, and returns a keep-mask.


def top_k_mask(logits: jax.Array, top_k: jax.Array) -> jax.Array:
    """Keep the `top_k` largest logits per row (ties with the k-th are kept); k <= 0 keeps all."""
    sorted_desc = -jnp.sort(-logits, axis=-1)
    return _top_k_from_sorted(logits, sorted_desc, top_k)[0]


def top_p_mask(logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """Keep the smallest set of most likely tokens whose probability mass reaches `top_p`.

    A token is kept when the mass of the tokens strictly more likely than it is < top_p, so
    the most likely token is always kept and top_p = 1 keeps everything.
    """
    sorted_desc = -jnp.sort(-logits, axis=-1)
    return _top_p_from_sorted(logits, sorted_desc, top_p)


def min_p_mask(logits: jax.Array, min_p: jax.Array) -> jax.Array:
    """Keep tokens with prob >= min_p * (max prob): logit >= max logit + log(min_p)."""
    thresh = jnp.max(logits, axis=-1) + jnp.log(min_p.astype(jnp.float32))
    return logits >= thresh[:, None]


def _top_k_from_sorted(logits: jax.Array, sorted_desc: jax.Array, top_k: jax.Array,
                       ) -> tuple[jax.Array, jax.Array]:
    vocab = logits.shape[-1]
    k = jnp.where((top_k <= 0) | (top_k > vocab), vocab, top_k).astype(jnp.int32)
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)
    keep = logits >= kth
    # The sorted row with everything past the k-th masked, for top-p to continue from.
    sorted_kept = jnp.where(jnp.arange(vocab)[None, :] < k[:, None], sorted_desc, NEG_INF)
    return keep, sorted_kept


def _top_p_from_sorted(logits: jax.Array, sorted_desc: jax.Array, top_p: jax.Array) -> jax.Array:
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.sum(mass_before < top_p[:, None], axis=-1)  # >= 1: mass_before[0] == 0
    last = jnp.take_along_axis(sorted_desc, (jnp.maximum(kept, 1) - 1)[:, None], axis=-1)
    return logits >= last


def filter_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
                  min_p: jax.Array) -> jax.Array:
    """Temperature-scaled logits with filtered-out tokens at -inf ([batch, vocab], fp32).

    Rows with temperature 0 are scaled by 1 (the caller takes their argmax instead). The
    vocab sort that top-k / top-p need runs only when some row asks for one of them.
    """
    logits = logits.astype(jnp.float32)
    t = jnp.where(temperature > 0, temperature, 1.0).astype(jnp.float32)
    scaled = logits / t[:, None]

    def sorted_filters(x: jax.Array) -> jax.Array:
        sorted_desc = -jnp.sort(-x, axis=-1)
        keep_k, sorted_kept = _top_k_from_sorted(x, sorted_desc, top_k)
        keep_p = _top_p_from_sorted(x, sorted_kept, top_p)
        return jnp.where(keep_k & keep_p, x, NEG_INF)

    needs_sort = jnp.any((top_k > 0) | (top_p < 1.0))
    scaled = jax.lax.cond(needs_sort, sorted_filters, lambda x: x, scaled)
    return jnp.where(min_p_mask(scaled, min_p), scaled, NEG_INF)


def argmax_first(x: jax.Array) -> jax.Array:
    """Index of the first maximum along the last axis, int32.

    Two plain reductions instead of `jnp.argmax`'s (value, index) variadic reduce, which XLA's
    CPU backend runs far slower over a large vocabulary.
    """
    best = jnp.max(x, axis=-1, keepdims=True)
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(x == best, iota, x.shape[-1]), axis=-1).astype(jnp.int32)


def categorical_inverse_cdf(keys: jax.Array, logits: jax.Array) -> jax.Array:
    """One draw per row from softmax(logits) using a single uniform per row.

    The first index whose cumulative probability exceeds u * total; tokens at -inf have zero
    mass and can never be drawn. Cheaper than Gumbel-max, which needs a random number per
    vocabulary entry (the PRNG dominates a CPU decode step at a 4k+ vocabulary).
    """
    probs = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    cdf = jnp.cumsum(probs, axis=-1)
    u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys)
    r = u * cdf[:, -1]
    idx = jnp.sum(cdf <= r[:, None], axis=-1)
    return jnp.minimum(idx, logits.shape[-1] - 1).astype(jnp.int32)


def token_keys(seed: jax.Array, sample_index: jax.Array, token_index: jax.Array) -> jax.Array:
    """One PRNG key per row from (seed, sample index, token index) only: slot-independent."""
    def one(s: jax.Array, i: jax.Array, t: jax.Array) -> jax.Array:
        key = jax.random.key(s.astype(jnp.uint32))
        return jax.random.fold_in(jax.random.fold_in(key, i), t)

    return jax.vmap(one)(seed, sample_index, token_index)


def sample(logits: jax.Array, *, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
           min_p: jax.Array, seed: jax.Array, sample_index: jax.Array, token_index: jax.Array,
           ) -> tuple[jax.Array, jax.Array]:
    """Choose one token per row; returns (tokens int32 [batch], model log-probs fp32 [batch]).

    logits: [batch, vocab]. All other arguments are [batch] arrays (one value per slot).
    """
    logits = logits.astype(jnp.float32)
    greedy = argmax_first(logits)

    def sampled(_: None) -> jax.Array:
        filtered = filter_logits(logits, temperature, top_k, top_p, min_p)
        keys = token_keys(seed, sample_index, token_index)
        drawn = categorical_inverse_cdf(keys, filtered)
        return jnp.where(temperature > 0, drawn, greedy)

    tokens = jax.lax.cond(jnp.any(temperature > 0), sampled, lambda _: greedy, None)
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]
    return tokens, logprobs


def top_logprobs(logits: jax.Array, wanted: jax.Array, k: int = MAX_TOP_LOGPROBS,
                 ) -> tuple[jax.Array, jax.Array]:
    """The k most likely tokens of each row and their model log-probs ([..., k] ids, values).

    Computed only when some row asks for them (`wanted` > 0 anywhere); zeros otherwise, so a
    batch that wants none pays no vocabulary sort.
    """
    shape = logits.shape[:-1] + (k,)

    def compute(x: jax.Array) -> tuple[jax.Array, jax.Array]:
        values, ids = jax.lax.top_k(jax.nn.log_softmax(x.astype(jnp.float32), axis=-1), k)
        return ids.astype(jnp.int32), values

    return jax.lax.cond(jnp.any(wanted > 0), compute,
                        lambda x: (jnp.zeros(shape, jnp.int32), jnp.zeros(shape, jnp.float32)), logits)
