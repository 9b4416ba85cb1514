"""In-process sampling engine: preallocated KV cache, bucketed prefill, continuous batching.

The engine owns a fixed number of *slots*. Each slot holds one running sample: its rows in
the preallocated KV cache [layers, slots, max_len, kv_heads, head_dim] and its sampling
parameters (per-slot arrays, see sampling.py). The device-side state is one pytree that every
jitted function takes donated and returns updated, so the cache is updated in place.

- Prefill: prompts are padded to a few static lengths (powers of two) and batch sizes (powers
  of two), so a new prompt length never triggers a compile once its bucket has been seen. Only
  the last prompt position goes through the LM head. The prompt's keys/values are scattered
  into the chosen slots' cache rows and the first token is sampled in the same call.
- Decode: one jitted function runs up to `decode_steps` tokens for all slots per host
  round-trip (a `lax.while_loop` that exits early once some slot hits a stop token or its
  token budget, so a finished slot is refilled at once), attending over a power-of-two
  *window* of the cache that covers every live slot, so short sequences do not pay for
  `max_len`. It is compiled once per window.
- Continuous batching: after every decode chunk the host reads the new tokens, finishes samples
  (stop token, stop string, max_tokens, cache full) and immediately prefills waiting requests
  into the freed slots. Slots left idle keep computing harmless garbage (their cache rows are
  overwritten by the next prefill before anything attends to them).

Tensor parallelism: when the model's parameters are `NamedSharding`-sharded, the cache is
created sharded over the same mesh axis as the key projection's kv_heads dim, and all state
lives on that mesh; GSPMD partitions prefill and decode.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from nemojax.inference.decode import LAYOUTS, decode_one_token, split_weights
from nemojax.inference.requests import Completion, Request
from nemojax.inference.sampling import SamplingParams, sample
from nemojax.model.transformer import KVCache, NemotronLM

SLOT_FIELDS: dict[str, Any] = {  # per-slot arrays of the device state, and their dtypes
    "tokens": jnp.int32,  # the token to feed next
    "positions": jnp.int32,  # its position (= cache row it is written to)
    "token_index": jnp.int32,  # index of the token being sampled next (PRNG fold-in)
    "seed": jnp.uint32,
    "sample_index": jnp.int32,
    "temperature": jnp.float32,
    "top_k": jnp.int32,
    "top_p": jnp.float32,
    "min_p": jnp.float32,
    "remaining": jnp.int32,  # tokens this slot may still generate; 0 = finished / idle
}
MAX_STOP_IDS = 8  # stop token ids the device checks per slot (more only cost an early exit)
SAMPLING_FIELDS = ("seed", "sample_index", "temperature", "top_k", "top_p", "min_p")


class Tokenizer(Protocol):
    def decode(self, ids: list[int]) -> str: ...


def power_of_two_buckets(lo: int, hi: int) -> list[int]:
    """lo, 2*lo, 4*lo, ... below hi, then hi itself."""
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= 2
    return out + [hi]


def _bucket(n: int, buckets: list[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


@dataclass
class _Job:
    """One sample of one request, while it waits or runs in a slot (host-side bookkeeping)."""

    request: Request
    sample_index: int
    seed: int
    max_new: int
    stop_ids: frozenset[int]
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""  # decoded output so far (only kept when there are stop strings)
    finish_reason: str | None = None
    position: int = 0  # host mirror of the slot's next position


class Engine:
    """Continuous-batching sampler over a NemotronLM (see the module docstring).

    Args:
      model: the model; its params may be sharded over a mesh (see module docstring).
      max_slots: samples decoded together.
      max_len: cache rows per slot: prompt + completion tokens at most (default cfg.max_seq_len).
      decode_steps: tokens generated per slot per host round-trip.
      max_prefill_batch: prompts prefilled together at most (padded to a power of two).
      min_bucket: the smallest prompt-length / attention-window bucket.
      tokenizer: needed for `text` and stop strings; anything with `decode(ids) -> str`.
      stop_token_ids: tokens that end every request (default: the model's eos).
      seed: draws seeds for requests that do not give one.
      decode_layout: "split" or "stacked" weights for the decode step (see decode.py);
        default "split" on CPU (one extra weight copy, ~2x faster there), else "stacked".
    """

    def __init__(self, model: NemotronLM, *, max_slots: int = 8, max_len: int | None = None,
                 decode_steps: int = 8, max_prefill_batch: int = 8, min_bucket: int = 16,
                 tokenizer: Tokenizer | None = None, stop_token_ids: Iterable[int] | None = None,
                 seed: int = 0, decode_layout: str | None = None):
        cfg = model.cfg
        self.cfg = cfg
        self.max_slots = int(max_slots)
        self.max_len = int(max_len or cfg.max_seq_len)
        if self.max_slots < 1 or self.max_len < 2 or decode_steps < 1:
            raise ValueError(f"need max_slots >= 1, max_len >= 2, decode_steps >= 1; got "
                             f"{max_slots}, {max_len}, {decode_steps}")
        self.decode_steps = int(decode_steps)
        self.tokenizer = tokenizer
        self.stop_token_ids = frozenset([cfg.eos_id] if stop_token_ids is None else stop_token_ids)
        self._rng = np.random.default_rng(seed)
        self.len_buckets = power_of_two_buckets(min(min_bucket, self.max_len), self.max_len)
        self.batch_buckets = [b for b in power_of_two_buckets(1, max(1, max_prefill_batch))
                              if b <= max(1, max_prefill_batch)]
        self.graphdef, self.params = nnx.split(model)
        self.trace_counts: collections.Counter[str] = collections.Counter()
        self._setup_sharding(model)
        self.state = self._init_state()
        platform = jax.tree.leaves(self.params)[0].devices().pop().platform
        self.decode_layout = decode_layout or ("split" if platform == "cpu" else "stacked")
        if self.decode_layout not in LAYOUTS:
            raise ValueError(f"decode_layout must be one of {LAYOUTS}, got {decode_layout!r}")
        self.decode_weights = None
        if self.decode_layout == "split":
            fuse = self.mesh is None
            self.decode_weights = jax.jit(lambda p: split_weights(nnx.merge(self.graphdef, p), fuse))(
                self.params)
        self._prefill_jit = jax.jit(self._prefill, donate_argnums=(1,))
        self._decode_jit = jax.jit(self._decode_chunk, donate_argnums=(2,), static_argnums=(4,))

    # ------------------------------------------------------------------ device side

    def _setup_sharding(self, model: NemotronLM) -> None:
        sharding = getattr(model.blocks.k[...], "sharding", None)
        if isinstance(sharding, NamedSharding):
            spec = tuple(sharding.spec) + (None,) * 4
            kv_axis = spec[2]  # k: [layers, embed, kv_heads, head_dim]
            self.mesh = sharding.mesh
            self.cache_sharding: Any = NamedSharding(self.mesh, P(None, None, None, kv_axis, None))
            self.replicated: Any = NamedSharding(self.mesh, P())
        else:
            self.mesh, self.cache_sharding, self.replicated = None, None, None

    def _init_state(self) -> dict[str, jax.Array]:
        cfg, S, T = self.cfg, self.max_slots, self.max_len

        def make() -> dict[str, jax.Array]:
            cache = KVCache.zeros(cfg, S, T)
            st = {"k": cache.k, "v": cache.v}
            for name, dt in SLOT_FIELDS.items():
                st[name] = jnp.zeros((S,), dt)
            st["top_p"] = jnp.ones((S,), jnp.float32)
            st["stop_ids"] = jnp.full((S, MAX_STOP_IDS), -1, jnp.int32)
            return st

        if self.mesh is None:
            # Commit the state to the params' device: uncommitted inputs would make the first
            # call after a donated (committed) output compile a second executable.
            device = next(iter(jax.tree.leaves(self.params)[0].devices()))
            return jax.jit(make, out_shardings=jax.sharding.SingleDeviceSharding(device))()
        shardings = {k: (self.cache_sharding if k in ("k", "v") else self.replicated)
                     for k in ["k", "v", "stop_ids", *SLOT_FIELDS]}
        return jax.jit(make, out_shardings=shardings)()

    def _constrain_cache(self, x: jax.Array) -> jax.Array:
        if self.cache_sharding is None:
            return x
        return jax.lax.with_sharding_constraint(x, self.cache_sharding)

    def _prefill(self, params: Any, state: dict[str, jax.Array], ids: jax.Array,
                 lengths: jax.Array, slots: jax.Array, sampling: dict[str, jax.Array],
                 remaining: jax.Array, stop_ids: jax.Array,
                 ) -> tuple[dict[str, jax.Array], jax.Array, jax.Array]:
        """Prefill B padded prompts [B, Lb] into `slots` (index >= max_slots: a padding row)."""
        self.trace_counts[f"prefill_{ids.shape[0]}x{ids.shape[1]}"] += 1
        model = nnx.merge(self.graphdef, params)
        b, lb = ids.shape
        positions = jnp.broadcast_to(jnp.arange(lb, dtype=jnp.int32), (b, lb))
        h, small = model.hidden(ids, positions=positions, cache=KVCache.zeros(self.cfg, b, lb))
        last = h[jnp.arange(b), lengths - 1][:, None, :]
        logits = model.logits(last)[:, 0]
        tok, lp = sample(logits, token_index=jnp.zeros((b,), jnp.int32), **sampling)
        st = dict(state)
        st["k"] = self._constrain_cache(state["k"].at[:, slots, :lb].set(small.k, mode="drop"))
        st["v"] = self._constrain_cache(state["v"].at[:, slots, :lb].set(small.v, mode="drop"))
        finished = jnp.any(tok[:, None] == stop_ids, axis=-1)
        updates = {"tokens": tok, "positions": lengths, "token_index": jnp.ones((b,), jnp.int32),
                   "remaining": jnp.where(finished, 0, remaining - 1), **sampling}
        st["stop_ids"] = state["stop_ids"].at[slots].set(stop_ids, mode="drop")
        for name, value in updates.items():
            st[name] = state[name].at[slots].set(value.astype(state[name].dtype), mode="drop")
        return st, tok, lp

    def _decode_chunk(self, params: Any, weights: Any, state: dict[str, jax.Array], live: jax.Array,
                      window: int) -> tuple[dict[str, jax.Array], jax.Array, jax.Array, jax.Array]:
        """Up to `decode_steps` tokens for every slot, attending over cache rows [0, window).

        Returns early, after the step where some live slot finished (stop token or its token
        budget), so the host can refill that slot at once instead of idling it for the rest of
        the chunk. `live` [S] marks the slots the host is running. Returns (state, tokens
        [steps, S], log-probs [steps, S], number of valid steps).
        """
        self.trace_counts[f"decode_w{window}"] += 1
        model = nnx.merge(self.graphdef, params)
        full = window >= self.max_len
        cache = KVCache(state["k"], state["v"]) if full else KVCache(
            state["k"][:, :, :window], state["v"][:, :, :window])
        sampling = {k: state[k] for k in SAMPLING_FIELDS}

        K, S = self.decode_steps, self.max_slots
        stop_ids = state["stop_ids"]

        def cond(carry: tuple[Any, ...]) -> jax.Array:
            return (carry[0] < K) & ~carry[-1]

        def step(carry: tuple[Any, ...]) -> tuple[Any, ...]:
            i, ck, cv, tokens, positions, token_index, remaining, toks, lps, _ = carry
            logits, k, v = decode_one_token(model, tokens, positions, ck, cv, weights)
            tok, lp = sample(logits, token_index=token_index, **sampling)
            k, v = self._constrain_cache(k), self._constrain_cache(v)
            running = live & (remaining > 0)
            finished = running & ((remaining == 1) | jnp.any(tok[:, None] == stop_ids, axis=-1))
            remaining = jnp.where(finished, 0, remaining - running.astype(jnp.int32))
            toks, lps = toks.at[i].set(tok), lps.at[i].set(lp)
            return (i + 1, k, v, tok, positions + 1, token_index + 1, remaining, toks, lps,
                    jnp.any(finished))

        carry = (jnp.int32(0), cache.k, cache.v, state["tokens"], state["positions"],
                 state["token_index"], state["remaining"], jnp.zeros((K, S), jnp.int32),
                 jnp.zeros((K, S), jnp.float32), jnp.bool_(False))
        (n, ck, cv, tokens, positions, token_index, remaining, toks, lps, _) = jax.lax.while_loop(
            cond, step, carry)
        st = dict(state, tokens=tokens, positions=positions, token_index=token_index,
                  remaining=remaining)
        if full:
            st["k"], st["v"] = ck, cv
        else:
            st["k"] = self._constrain_cache(jax.lax.dynamic_update_slice_in_dim(state["k"], ck, 0, axis=2))
            st["v"] = self._constrain_cache(jax.lax.dynamic_update_slice_in_dim(state["v"], cv, 0, axis=2))
        return st, toks, lps, n

    def compile_counts(self) -> dict[str, int]:
        """Executables compiled so far per jitted function (jit's own cache, not our traces)."""
        return {"prefill": self._prefill_jit._cache_size(), "decode": self._decode_jit._cache_size()}

    # ------------------------------------------------------------------ host side

    def _new_jobs(self, request: Request) -> list[_Job]:
        p = request.params
        n_prompt = len(request.prompt_ids)
        if n_prompt == 0:
            raise ValueError(f"request {request.id!r}: empty prompt")
        if n_prompt >= self.max_len:
            raise ValueError(f"request {request.id!r}: prompt has {n_prompt} tokens, the engine's "
                             f"max_len is {self.max_len}; shorten it or raise max_len")
        bad = [t for t in request.prompt_ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"request {request.id!r}: token ids {bad[:5]} outside the vocabulary "
                             f"[0, {self.cfg.vocab_size})")
        if p.stop and self.tokenizer is None:
            raise ValueError(f"request {request.id!r}: stop strings need an engine with a tokenizer")
        seed = p.seed if p.seed is not None else int(self._rng.integers(0, 2**32))
        stop_ids = self.stop_token_ids | frozenset(p.stop_token_ids)
        max_new = min(p.max_tokens, self.max_len - n_prompt)
        return [_Job(request, i, seed & 0xFFFFFFFF, max_new, stop_ids, position=n_prompt)
                for i in range(p.n)]

    def _admit(self, jobs: list[tuple[int, _Job]]) -> list[tuple[int, _Job, int, float]]:
        """Prefill (slot, job) pairs, grouped by length bucket; returns first tokens."""
        out = []
        by_len: dict[int, list[tuple[int, _Job]]] = collections.defaultdict(list)
        for slot, job in jobs:
            by_len[_bucket(len(job.request.prompt_ids), self.len_buckets)].append((slot, job))
        for lb, group in sorted(by_len.items()):
            while group:
                take = min(len(group), self.batch_buckets[-1])
                bb = _bucket(take, self.batch_buckets)
                chunk, group = group[:take], group[take:]
                ids = np.zeros((bb, lb), np.int32)
                lengths = np.ones((bb,), np.int32)
                slots = np.full((bb,), self.max_slots, np.int32)  # padding rows are dropped
                remaining = np.zeros((bb,), np.int32)
                stop_ids = np.full((bb, MAX_STOP_IDS), -1, np.int32)
                sampling = {"seed": np.zeros((bb,), np.uint32), "sample_index": np.zeros((bb,), np.int32),
                            "temperature": np.zeros((bb,), np.float32), "top_k": np.zeros((bb,), np.int32),
                            "top_p": np.ones((bb,), np.float32), "min_p": np.zeros((bb,), np.float32)}
                for r, (slot, job) in enumerate(chunk):
                    prompt, p = job.request.prompt_ids, job.request.params
                    ids[r, :len(prompt)] = prompt
                    lengths[r], slots[r] = len(prompt), slot
                    sampling["seed"][r], sampling["sample_index"][r] = job.seed, job.sample_index
                    sampling["temperature"][r], sampling["top_k"][r] = p.temperature, p.top_k
                    sampling["top_p"][r], sampling["min_p"][r] = p.top_p, p.min_p
                    remaining[r] = job.max_new
                    ids_list = sorted(job.stop_ids)[:MAX_STOP_IDS]
                    stop_ids[r, :len(ids_list)] = ids_list
                self.state, tok, lp = self._prefill_jit(self.params, self.state, ids, lengths, slots,
                                                        sampling, remaining, stop_ids)
                tok, lp = np.asarray(tok), np.asarray(lp)
                out += [(slot, job, int(tok[r]), float(lp[r])) for r, (slot, job) in enumerate(chunk)]
        return out

    def _window(self, running: list[_Job]) -> int:
        need = max(j.position for j in running) + self.decode_steps
        return _bucket(min(need, self.max_len), self.len_buckets)

    def _accept(self, job: _Job, tokens: Iterable[int], logprobs: Iterable[float]) -> bool:
        """Append newly generated tokens to a running job; True when it has finished."""
        start = len(job.output_ids)
        for t, lp in zip(tokens, logprobs):
            if t in job.stop_ids:
                job.finish_reason = "stop"
                break
            job.output_ids.append(t)
            job.logprobs.append(lp)
            if len(job.output_ids) >= job.max_new:
                job.finish_reason = "length"
                break
        if job.request.params.stop and len(job.output_ids) > start:
            self._check_stop_strings(job, start)
        return job.finish_reason is not None

    def _check_stop_strings(self, job: _Job, start: int) -> None:
        stops = job.request.params.stop
        text = self.tokenizer.decode(job.output_ids)
        lookback = max(len(s) for s in stops)
        begin = max(0, len(job.text) - lookback)
        job.text = text
        hits = [i for i in (text.find(s, begin) for s in stops) if i >= 0]
        if not hits:
            return
        cut = min(hits)
        # Keep the tokens whose text lies before the stop string (at least those before the
        # token that completed it), drop the rest.
        m = len(job.output_ids)
        for m in range(start + 1, len(job.output_ids) + 1):
            if any(s in self.tokenizer.decode(job.output_ids[:m]) for s in stops):
                break
        keep = m - 1
        while keep > 0 and len(self.tokenizer.decode(job.output_ids[:keep])) > cut:
            keep -= 1
        del job.output_ids[keep:]
        del job.logprobs[keep:]
        job.text = text[:cut]
        job.finish_reason = "stop"

    def _complete(self, job: _Job) -> Completion:
        text = None
        if self.tokenizer is not None:
            text = job.text if job.request.params.stop and job.finish_reason == "stop" \
                else self.tokenizer.decode(job.output_ids)
        return Completion(request_id=job.request.id, sample_index=job.sample_index,
                          prompt_tokens=len(job.request.prompt_ids), output_ids=list(job.output_ids),
                          finish_reason=job.finish_reason or "length", text=text,
                          logprobs=list(job.logprobs) if job.request.params.logprobs else None)

    # ------------------------------------------------------------------ scheduling API
    # `submit` queues requests, `step` admits waiting samples into free slots and decodes one
    # chunk, `in_flight` shows partial outputs, `cancel` drops a request. The HTTP server's
    # worker thread drives the engine this way; `generate` is the same loop over an iterable.

    def _sched(self) -> tuple[collections.deque[_Job], list[_Job | None]]:
        if not hasattr(self, "_waiting"):
            self._waiting: collections.deque[_Job] = collections.deque()
            self._slots: list[_Job | None] = [None] * self.max_slots
        return self._waiting, self._slots

    def submit(self, request: Request) -> None:
        """Queue a request for `step`; raises ValueError now if the engine cannot run it."""
        waiting, _ = self._sched()
        waiting.extend(self._new_jobs(request))

    def cancel(self, request_id: Any) -> int:
        """Drop every waiting or running sample of `request_id`; returns how many were dropped.

        A freed slot's cache rows are simply overwritten by the next prefill into it.
        """
        waiting, slots = self._sched()
        kept = [j for j in waiting if j.request.id != request_id]
        dropped = len(waiting) - len(kept)
        waiting.clear()
        waiting.extend(kept)
        for i, job in enumerate(slots):
            if job is not None and job.request.id == request_id:
                slots[i] = None
                dropped += 1
        return dropped

    @property
    def has_work(self) -> bool:
        """True while submitted samples are waiting or running."""
        waiting, slots = self._sched()
        return bool(waiting) or any(j is not None for j in slots)

    def free_slots(self) -> int:
        """Slots a waiting sample could be admitted to right now (minus samples already queued)."""
        waiting, slots = self._sched()
        return sum(j is None for j in slots) - len(waiting)

    def in_flight(self) -> list[tuple[Any, int, list[int]]]:
        """(request id, sample index, output ids so far) of every running sample."""
        _, slots = self._sched()
        return [(j.request.id, j.sample_index, list(j.output_ids)) for j in slots if j is not None]

    def step(self) -> list[Completion]:
        """Admit waiting samples into free slots, then decode one chunk for the running ones.

        Returns the samples that finished during this call. One host sync per chunk; the chunk
        ends early when a slot finishes on device, so the next `step` refills it at once.
        """
        waiting, slots = self._sched()
        done: list[Completion] = []
        while waiting:  # admission can finish samples at once (stop token / max_tokens 1): loop
            free = [i for i, j in enumerate(slots) if j is None]
            batch = [(free[i], waiting.popleft()) for i in range(min(len(free), len(waiting)))]
            if not batch:
                break
            finished_any = False
            for slot, job, tok, lp in self._admit(batch):
                slots[slot] = job
                if self._accept(job, [tok], [lp]):
                    slots[slot] = None
                    finished_any = True
                    done.append(self._complete(job))
            if not finished_any:
                break
        running = [(i, j) for i, j in enumerate(slots) if j is not None]
        if running:
            window = self._window([j for _, j in running])
            live = np.zeros((self.max_slots,), bool)
            live[[i for i, _ in running]] = True
            self.state, toks, lps, n = self._decode_jit(self.params, self.decode_weights, self.state,
                                                        live, window)
            n = int(n)  # the one host sync per chunk
            toks, lps = np.asarray(toks)[:n], np.asarray(lps)[:n]
            for i, job in running:
                job.position += n
                if self._accept(job, toks[:, i].tolist(), lps[:, i].tolist()):
                    slots[i] = None
                    done.append(self._complete(job))
        return done

    def generate(self, requests: Iterable[Request],
                 on_error: Callable[[Request, Exception], None] | None = None) -> Iterator[Completion]:
        """Run requests through the slots, yielding each sample's Completion as it finishes.

        Requests are pulled from the iterable lazily, as slots free up, so it may be a stream.
        A request the engine cannot run (prompt too long, bad ids) raises ValueError, or is
        passed to `on_error` and skipped when that is given. Uses the same slots as `submit`.
        """
        source = iter(requests)
        exhausted = False
        while True:
            while not exhausted and self.free_slots() > 0:
                req = next(source, None)
                if req is None:
                    exhausted = True
                    break
                try:
                    self.submit(req)
                except ValueError as e:
                    if on_error is None:
                        raise
                    on_error(req, e)
            if not self.has_work:
                if exhausted:
                    return
                continue
            yield from self.step()

    def generate_all(self, requests: Iterable[Request]) -> list[Completion]:
        """All completions, ordered by (request order, sample index)."""
        reqs = list(requests)
        index = {r.id: i for i, r in enumerate(reqs)}
        done = list(self.generate(reqs))
        return sorted(done, key=lambda c: (index[c.request_id], c.sample_index))
