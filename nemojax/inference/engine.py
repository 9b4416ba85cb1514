"""In-process sampling engine: preallocated KV cache, chunked prefill, prefix sharing, continuous
batching.

The engine owns a fixed number of *slots*. Each slot holds one running sample: its rows in the
preallocated KV cache [layers, slots, rows, kv_heads, head_dim]. The device state is only that
cache (and the prefix-cache pool); everything else about a slot (next token, position,
sampling knobs, token budget, stop ids) lives on the host and goes to the device with each
decode call, so admitting or dropping a sample costs no device work.

A sample's life:
1. *Admission* into a free slot. Its prompt's leading full blocks that the prefix cache holds
   are copied into the slot's rows (their keys/values are not computed again). Samples 2..n
   of a request admitted together with sample 1 become its *forks*: they wait for sample 1's
   prefill and then get its rows copied, so a prompt is prefilled once for all its samples.
2. *Chunked prefill* of the prompt's remaining tokens except the last: each engine step runs
   one prefill call of at most `max_prefill_tokens` tokens (B rows x C tokens), so a long
   prompt is spread over several steps and never stalls the samples already decoding for
   longer than one such call (when nothing is decoding, prefill runs until the slots are full).
   When its prefill completes, the prompt's new full blocks are copied into the prefix cache.
3. *Decode*: the last prompt token is fed by the decode program like any generated token; one
   decode call runs up to `decode_steps` tokens for every slot per host round-trip and exits
   early when a slot finishes on device (stop token, budget), so the host refills it at once.
   Attention covers a power-of-two *window* of rows covering every live slot.
4. The host reads the tokens, matches stop strings incrementally (detokenize.py), finishes
   samples and frees their slots; streaming requests get per-token deltas (`take_deltas`).

Programs and compilation (programs.py): prompt chunks are padded to power-of-two lengths (from
`min_bucket` up to `prefill_chunk`) and batch sizes (up to `max_prefill_batch`), attention
windows to powers of two up to `max_len`, so the set of distinct programs is bounded and a new
prompt length never compiles once its bucket has been seen. With a program directory, compiled
programs are kept on disk and later processes load them instead of compiling. After a full
warm-up (`warm_up(full=True)`) nothing compiles any more: a prefill whose window was not
compiled for its rows and chunk runs with the narrowest compiled window that is wider (rows
past a token's position are masked, so only the cost changes).

Tensor parallelism: when the model's parameters are `NamedSharding`-sharded, the cache is
created sharded over the same mesh axis as the key projection's kv_heads dim; GSPMD partitions
the programs.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from nemojax.inference import programs
from nemojax.inference.detokenize import IncrementalText, StopMatcher
from nemojax.inference.forward import LAYOUTS, layout_weights, model_arrays
from nemojax.inference.prefix_cache import PrefixCache
from nemojax.inference.requests import Completion, Request, Timing, TokenDelta, TopLogprobs
from nemojax.model.transformer import DTYPES, NemotronLM

MAX_STOP_IDS = 8  # stop token ids the device checks per slot (more only cost an early exit)
COPY_BATCH = 64  # KV block moves per copy call
PROGRAM_SUBDIR = "nemojax-engine"


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


def empty_slots(slots: int) -> dict[str, np.ndarray]:
    """The per-slot host arrays every decode call takes (programs.decode's `slot`), all idle."""
    S = slots
    return {"tokens": np.zeros(S, np.int32), "positions": np.zeros(S, np.int32),
            "token_index": np.zeros(S, np.int32), "remaining": np.zeros(S, np.int32),
            "live": np.zeros(S, bool), "top_n": np.zeros(S, np.int32), "seed": np.zeros(S, np.uint32),
            "sample_index": np.zeros(S, np.int32), "temperature": np.zeros(S, np.float32),
            "top_k": np.zeros(S, np.int32), "top_p": np.ones(S, np.float32), "min_p": np.zeros(S, np.float32),
            "stop_ids": np.full((S, MAX_STOP_IDS), -1, np.int32)}


def default_program_dir() -> Path | None:
    """Where compiled engine programs persist: beside JAX's persistent compilation cache when
    one is configured (`jax_compilation_cache_dir`), else nowhere (memory only)."""
    root = jax.config.jax_compilation_cache_dir
    return Path(root) / PROGRAM_SUBDIR if root else None


@dataclass
class _Job:
    """One sample of one request, from the queue to its completion (host-side bookkeeping)."""

    request: Request
    sample_index: int
    seed: int
    max_new: int
    stop_ids: frozenset[int]
    order: int  # admission order: prefill is first come, first served
    phase: str = "waiting"  # waiting -> prefill | fork -> running -> (done)
    slot: int = -1
    prefilled: int = 0  # prompt rows (of prompt[:-1]) in the slot's cache
    cached: int = 0  # of which copied (prefix cache / parent) instead of computed
    parent: "_Job | None" = None
    generated: int = 0  # tokens sampled on device (stop token included)
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[TopLogprobs] = field(default_factory=list)
    prompt_lps: list[float | None] | None = None
    prompt_top: list[TopLogprobs | None] | None = None
    detok: IncrementalText | None = None
    stops: StopMatcher | None = None
    ends: list[int] = field(default_factory=list)  # text length once output token k is decoded
    released: int = 0  # tokens handed out as deltas
    finish_reason: str | None = None
    final_text: str | None = None
    queued_at: float = 0.0  # time.monotonic() of submit / admission / first and latest token (Timing)
    scheduled_at: float = 0.0
    first_token_at: float | None = None
    last_token_at: float = 0.0
    token_gaps: list[tuple[float, int]] = field(default_factory=list)

    @property
    def prompt(self) -> list[int]:
        return self.request.prompt_ids

    @property
    def target(self) -> int:
        """Prompt rows prefill must fill: all but the last token (decode feeds that one)."""
        return len(self.request.prompt_ids) - 1


class Engine:
    """Continuous-batching sampler over a NemotronLM (see the module docstring).

    Args:
      model: the model; its params may be sharded over a mesh (see module docstring).
      max_slots: samples decoded together.
      max_len: cache rows per slot: prompt + completion tokens at most (default cfg.max_seq_len).
      decode_steps: tokens generated per slot per host round-trip at most.
      max_prefill_batch: prompts prefilled together at most (padded to a power of two).
      min_bucket: the smallest prompt-chunk bucket.
      min_window: the smallest attention window of a decode call. Attending to a few more rows
        than needed costs little next to the weight reads of a decode step, and fewer windows
        mean fewer programs to compile or load.
      tokenizer: needed for `text` and stop strings; anything with `decode(ids) -> str`.
      stop_token_ids: tokens that end every request (default: the model's eos).
      seed: draws seeds for requests that do not give one.
      decode_layout: "split" or "stacked" weights (see forward.py); default "split" on CPU
        (one extra weight copy, ~2x faster there), else "stacked".
      prefill_chunk: prompt tokens per row of one prefill call at most (longer prompts are
        prefilled over several steps).
      max_prefill_tokens: padded tokens (rows x chunk) of one prefill call at most, which bounds
        how long one engine step can delay running samples (default max(prefill_chunk, 512)).
      prefix_cache_tokens: capacity of the prefix cache in tokens (0 = off; default 2 x max_len).
      block_size: the prefix cache's block length in tokens.
      share_prefixes: reuse keys/values across samples (forks) and requests (prefix cache);
        False computes every prompt in full (an attribute: may be switched at any time).
      program_dir: where compiled programs are kept across processes; default
        `default_program_dir()`; False = memory only. Unused for sharded (multi-device) models.
    """

    def __init__(self, model: NemotronLM, *, max_slots: int = 8, max_len: int | None = None,
                 decode_steps: int = 8, max_prefill_batch: int = 8, min_bucket: int = 16,
                 tokenizer: Tokenizer | None = None, stop_token_ids: Iterable[int] | None = None,
                 seed: int = 0, decode_layout: str | None = None, prefill_chunk: int = 256,
                 max_prefill_tokens: int | None = None, prefix_cache_tokens: int | None = None,
                 block_size: int = 16, min_window: int = 128, share_prefixes: bool = True,
                 program_dir: str | Path | bool | None = None):
        cfg = model.cfg
        self.cfg = cfg
        self.max_slots = int(max_slots)
        self.max_len = int(max_len or cfg.max_seq_len)
        if self.max_slots < 1 or self.max_len < 2 or decode_steps < 1 or prefill_chunk < 1 or block_size < 1:
            raise ValueError(f"need max_slots >= 1, max_len >= 2, decode_steps >= 1, prefill_chunk >= 1, "
                             f"block_size >= 1; got {max_slots}, {max_len}, {decode_steps}, {prefill_chunk}, "
                             f"{block_size}")
        self.decode_steps = int(decode_steps)
        self.tokenizer = tokenizer
        self.stop_token_ids = frozenset([cfg.eos_id] if stop_token_ids is None else stop_token_ids)
        self._rng = np.random.default_rng(seed)
        lo = min(min_bucket, self.max_len)
        self.len_buckets = power_of_two_buckets(lo, self.max_len)
        self.window_buckets = power_of_two_buckets(max(lo, min(min_window, self.max_len)), self.max_len)
        self.chunk_buckets = [b for b in power_of_two_buckets(lo, max(lo, min(prefill_chunk, self.max_len)))]
        self.prefill_chunk = self.chunk_buckets[-1]
        self.batch_buckets = [b for b in power_of_two_buckets(1, max(1, max_prefill_batch))
                              if b <= max(1, max_prefill_batch)]
        self.max_prefill_tokens = int(max_prefill_tokens or max(self.prefill_chunk, 512))
        self.block_size = int(block_size)
        # Cache rows per slot: max_len rounded up to whole blocks (block copies stay aligned).
        self.rows = -(-self.max_len // self.block_size) * self.block_size
        pool_tokens = 2 * self.max_len if prefix_cache_tokens is None else int(prefix_cache_tokens)
        self.prefix_cache = PrefixCache(max(0, pool_tokens) // self.block_size, self.block_size)
        self.share_prefixes = share_prefixes
        self._setup_sharding(model)
        platform = next(iter(model.embed[...].devices())).platform
        self.decode_layout = decode_layout or ("split" if platform == "cpu" else "stacked")
        if self.decode_layout not in LAYOUTS:
            raise ValueError(f"decode_layout must be one of {LAYOUTS}, got {decode_layout!r}")
        directory = None
        if program_dir is not False and self.mesh is None:
            directory = default_program_dir() if program_dir in (None, True) else program_dir
        self.programs = programs.Programs(directory, self._program_context(platform))
        self.pad_to_compiled = False  # set by a full warm-up: an uncompiled prefill window runs wider
        self._constrain = self._constrain_cache if self.mesh is not None else programs._identity
        fuse = self.mesh is None
        self.weights = self.programs("weights", (self.decode_layout, fuse),
                                     lambda: partial(layout_weights, cfg, layout=self.decode_layout, fuse_qkv=fuse),
                                     (model_arrays(model),), donate=())
        self.cache = self._init_cache()
        S = self.max_slots
        self._slot = empty_slots(S)
        self._waiting: collections.deque[_Job] = collections.deque()
        self._slots: list[_Job | None] = [None] * S
        self._deltas: list[TokenDelta] = []
        self._order = itertools.count()
        self.stats: dict[str, int] = {"prompt_tokens": 0, "prefill_tokens": 0, "cached_tokens": 0,
                                      "generated_tokens": 0, "decode_calls": 0, "prefill_calls": 0}

    # ------------------------------------------------------------------ device side

    def _setup_sharding(self, model: NemotronLM) -> None:
        sharding = getattr(model.blocks.k[...], "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            spec = tuple(sharding.spec) + (None,) * 4
            kv_axis = spec[2]  # k: [layers, embed, kv_heads, head_dim]
            self.mesh = sharding.mesh
            self.cache_sharding: Any = NamedSharding(self.mesh, P(None, None, None, kv_axis, None))
            self.replicated: Any = NamedSharding(self.mesh, P())
        else:
            self.mesh, self.cache_sharding, self.replicated = None, None, None
            self._device = next(iter(model.embed[...].devices()))

    def _program_context(self, platform: str) -> str:
        import jaxlib

        device = jax.devices()[0]
        return "\n".join([repr(self.cfg), platform, getattr(device, "device_kind", ""), jax.__version__,
                          jaxlib.__version__, os.environ.get("XLA_FLAGS", ""), str(jax.config.jax_enable_x64),
                          str(jax.config.jax_default_matmul_precision), programs.source_fingerprint()])

    def _init_cache(self) -> programs.Cache:
        cfg = self.cfg
        dt = DTYPES[cfg.compute_dtype]
        kv = (cfg.num_kv_heads, cfg.head_dim)
        shapes = {"k": (cfg.num_layers, self.max_slots, self.rows, *kv),
                  "pool_k": (cfg.num_layers, max(1, self.prefix_cache.num_blocks), self.block_size, *kv)}
        shapes["v"], shapes["pool_v"] = shapes["k"], shapes["pool_k"]
        if self.mesh is None and self._device.platform == "cpu":  # host zeros: no program to compile
            return {name: jax.device_put(np.zeros(shape, dt), self._device) for name, shape in shapes.items()}
        # Accelerators: allocate on the device (a big cache must never pass through host memory).
        target = self.cache_sharding if self.mesh is not None else jax.sharding.SingleDeviceSharding(self._device)
        make = jax.jit(lambda: {name: jnp.zeros(shape, dt) for name, shape in shapes.items()},
                       out_shardings={name: target for name in shapes})
        return make()

    def _constrain_cache(self, x: jax.Array) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, self.cache_sharding)

    def compile_counts(self) -> dict[str, int]:
        """Distinct executables obtained so far (compiled or loaded from disk) per program."""
        return {name: self.programs.count(name) for name in ("prefill", "decode", "copy")}

    def compile_stats(self) -> dict[str, Any]:
        """{"compiled", "loaded" (from disk), "seconds" (spent obtaining programs), "by_name"}."""
        return dict(self.programs.stats)

    def _window(self, rows: int) -> int:
        """The static attention window of a program that must see `rows` cache rows (a window
        reaching max_len attends to every row of the slot)."""
        return self.rows if rows >= self.max_len else rows

    def prefill_shapes(self) -> list[tuple[int, int, int, bool]]:
        """The prefill programs (rows B, chunk C, window W, prompt log-probs) a full warm-up
        compiles, such that every call `_prefill_batch` can make runs on one of them.

        The scheduler makes B = the bucket of the rows packed (one row of any chunk; several
        only while B x C fits max_prefill_tokens, never more than the slots), C = a chunk
        bucket, W >= C any length bucket (prefix hits and later chunks start deeper). Compiled
        exactly: every (B, C) at its first-chunk window (the common case) and at the full
        window, which covers every deeper start; the longest chunk at every window (long
        prompts, chunk after chunk); prompt log-prob prefills at the full window.
        """
        most = _bucket(min(self.max_slots, self.batch_buckets[-1]), self.batch_buckets)
        pairs = [(b, c) for b in self.batch_buckets if b <= most for c in self.chunk_buckets
                 if b == 1 or b * c <= self.max_prefill_tokens]
        shapes = set()
        for b, c in pairs:
            first = self._window(_bucket(c, self.len_buckets))
            shapes |= {(b, c, first, False), (b, c, self.rows, False), (b, c, self.rows, True)}
        shapes |= {(1, self.prefill_chunk, self._window(w), False) for w in self.len_buckets
                   if w >= self.prefill_chunk}
        return sorted(shapes)

    def warm_up(self, full: bool = False) -> dict[str, Any]:
        """Compile (or load) programs ahead of traffic; returns `compile_stats()`.

        Minimal: one decode window (greedy and sampled), the smallest prefill shape and the block
        copy; other shapes compile on first use. full: `prefill_shapes()`, every decode window
        with and without sampling and top log-probs, and the copy; from then on a prefill shape
        that was not compiled runs at a wider compiled window (`pad_to_compiled`), so no
        request ever waits for a compile. Nothing runs, so no state changes.
        """
        if full:
            shapes = self.prefill_shapes()
            windows, variants = self.window_buckets, [(s, t) for s in (False, True) for t in (False, True)]
        else:
            c = self.chunk_buckets[0]
            shapes = [(1, c, self._window(_bucket(c, self.len_buckets)), False)]
            windows, variants = self.window_buckets[:1], [(False, False), (True, False)]
        for B, C, W, lp in shapes:
            zeros, ids = np.zeros(B, np.int32), np.zeros((B, C), np.int32)
            build = lambda W=W: partial(_prefill_entry, self.cfg, self._constrain, W)  # noqa: E731
            self.programs.prepare("prefill", (B, C, W, lp), build,
                                  (self.weights, self.cache, ids, zeros, zeros, zeros, ids if lp else None),
                                  donate=(1,))
        for W in windows:
            W = self._window(W)
            for sampled, top in variants:
                build = lambda W=W, sampled=sampled, top=top: partial(  # noqa: E731
                    _decode_entry, self.cfg, self._constrain, self.decode_steps, W, sampled, top)
                self.programs.prepare("decode", (self.decode_steps, W, sampled, top), build,
                                      (self.weights, self.cache, self._slot), donate=(1,))
        size = COPY_BATCH
        self.programs.prepare("copy", (size,), lambda: partial(programs.copy, self._constrain, self.block_size),
                              (self.cache, np.zeros(size, bool), np.zeros(size, np.int32), np.zeros(size, bool),
                               np.zeros(size, np.int32)), donate=(0,))
        if full:
            self.pad_to_compiled = True
        return self.compile_stats()

    def _prefill_key(self, B: int, C: int, W: int, lp: bool) -> tuple[int, int, int, bool]:
        """The prefill program to run a (B, C, W, lp) call on: itself, or after a full warm-up
        when it was not compiled, the same rows and chunk at the narrowest wider window compiled
        (`prefill_shapes` has every (B, C) at the full window)."""
        key = (B, C, W, lp)
        if not self.pad_to_compiled or self.programs.has("prefill", key):
            return key
        wider = [k[2] for k in self.programs.statics("prefill") if k[:2] == (B, C) and k[3] == lp and k[2] > W]
        return (B, C, min(wider), lp) if wider else key

    def _run_prefill(self, ids: np.ndarray, slots: np.ndarray, starts: np.ndarray, valid: np.ndarray,
                     targets: np.ndarray | None, window: int) -> Any:
        B, C = ids.shape
        key = self._prefill_key(B, C, window, targets is not None)
        build = lambda: partial(_prefill_entry, self.cfg, self._constrain, key[2])  # noqa: E731
        self.cache, lps = self.programs("prefill", key, build,
                                        (self.weights, self.cache, ids, slots, starts, valid, targets),
                                        donate=(1,))
        return lps

    def _run_copy(self, moves: list[tuple[bool, int, bool, int]]) -> None:
        """Block moves (src is pool, src index, dst is pool, dst index), in fixed-size batches."""
        size = COPY_BATCH
        for i in range(0, len(moves), size):
            part = moves[i:i + size]
            src_pool, dst_pool = np.zeros(size, bool), np.zeros(size, bool)
            src, dst = np.zeros(size, np.int32), np.full(size, np.iinfo(np.int32).max, np.int32)  # padding: dropped
            for m, (sp, si, dp, di) in enumerate(part):
                src_pool[m], src[m], dst_pool[m], dst[m] = sp, si, dp, di
            build = lambda: partial(programs.copy, self._constrain, self.block_size)  # noqa: E731
            self.cache = self.programs("copy", (size,), build, (self.cache, src_pool, src, dst_pool, dst),
                                       donate=(0,))

    def _run_decode(self, window: int, sampled: bool, top: bool) -> dict[str, np.ndarray]:
        build = lambda: partial(_decode_entry, self.cfg, self._constrain, self.decode_steps, window,  # noqa: E731
                                sampled, top)
        self.cache, out = self.programs("decode", (self.decode_steps, window, sampled, top), build,
                                        (self.weights, self.cache, self._slot), donate=(1,))
        return out

    # ------------------------------------------------------------------ requests

    def _new_jobs(self, request: Request) -> list[_Job]:
        p = request.params
        n_prompt = len(request.prompt_ids)
        if n_prompt == 0:
            raise ValueError(f"request {request.id!r}: empty prompt")
        if n_prompt >= self.max_len:
            raise ValueError(f"request {request.id!r}: prompt has {n_prompt} tokens, the engine's "
                             f"max_len is {self.max_len}; shorten it or raise max_len")
        bad = [t for t in request.prompt_ids if not (isinstance(t, (int, np.integer))
                                                     and 0 <= t < self.cfg.vocab_size)]
        if bad:
            raise ValueError(f"request {request.id!r}: token ids {bad[:5]} outside the vocabulary "
                             f"[0, {self.cfg.vocab_size})")
        if p.stop and self.tokenizer is None:
            raise ValueError(f"request {request.id!r}: stop strings need an engine with a tokenizer")
        if request.stream and self.tokenizer is None:
            raise ValueError(f"request {request.id!r}: streaming needs an engine with a tokenizer")
        seed = p.seed if p.seed is not None else int(self._rng.integers(0, 2**32))
        stop_ids = self.stop_token_ids | frozenset(p.stop_token_ids)
        max_new = min(p.max_tokens, self.max_len - n_prompt)
        jobs = []
        now = time.monotonic()
        for i in range(p.n):
            job = _Job(request, i, seed & 0xFFFFFFFF, max_new, stop_ids, order=next(self._order), queued_at=now)
            if self.tokenizer is not None and (p.stop or request.stream):
                job.detok = IncrementalText(self.tokenizer)
                job.stops = StopMatcher(p.stop)
            jobs.append(job)
        return jobs

    def _finish(self, job: _Job, reason: str) -> None:
        job.finish_reason = reason
        if job.detok is not None and job.final_text is None:
            job.detok.flush()
            self._sync_ends(job)
            job.final_text = job.detok.text
        if job.slot >= 0:
            self._slot["live"][job.slot] = False
            if self._slots[job.slot] is job:
                self._slots[job.slot] = None
        job.phase = "done"

    def _complete(self, job: _Job) -> Completion:
        text = None
        if self.tokenizer is not None:
            text = job.final_text if job.final_text is not None else self.tokenizer.decode(job.output_ids)
        p = job.request.params
        if job.request.stream:
            self._release(job, final=True)
        return Completion(request_id=job.request.id, sample_index=job.sample_index,
                          prompt_tokens=len(job.prompt), output_ids=list(job.output_ids),
                          finish_reason=job.finish_reason or "length", text=text,
                          logprobs=list(job.logprobs) if p.logprobs else None,
                          top_logprobs=list(job.top) if p.top_logprobs else None,
                          prompt_logprobs=job.prompt_lps, prompt_top_logprobs=job.prompt_top,
                          cached_tokens=job.cached,
                          timing=Timing(job.queued_at, job.scheduled_at, job.first_token_at, time.monotonic(),
                                        job.token_gaps))

    # ------------------------------------------------------------------ tokens

    @staticmethod
    def _sync_ends(job: _Job) -> None:
        """Record the text length for output tokens that just became decoded text."""
        job.ends += [len(job.detok.text)] * (job.detok.decoded - len(job.ends))

    def _accept(self, job: _Job, tok: int, lp: float, top: TopLogprobs | None) -> bool:
        """One token sampled for a running job; True when the job has finished."""
        job.generated += 1
        if tok in job.stop_ids:
            self._finish(job, "stop")
            return True
        job.output_ids.append(tok)
        job.logprobs.append(lp)
        if top is not None:
            job.top.append(top)
        if job.detok is not None:
            before = len(job.detok.text)
            job.detok.add(tok)
            self._sync_ends(job)
            cut = job.stops.search(job.detok.text, before)
            if cut >= 0:  # keep the tokens whose text lies before the stop string
                keep = bisect.bisect_right(job.ends, cut)
                del job.output_ids[keep:], job.logprobs[keep:], job.ends[keep:], job.top[keep:]
                job.final_text = job.detok.text[:cut]
                self._finish(job, "stop")
                return True
        if len(job.output_ids) >= job.max_new:
            self._finish(job, "length")
            return True
        return False

    def _release(self, job: _Job, final: bool = False) -> None:
        """Queue deltas for a streaming job's tokens whose text is certain (every kept token
        once the job has finished)."""
        text = job.final_text if final else job.detok.text
        count = len(job.output_ids) if final else bisect.bisect_right(job.ends, job.stops.safe_length(text))
        top = job.request.params.top_logprobs
        while job.released < count:
            k = job.released
            start, end = (job.ends[k - 1] if k else 0), min(job.ends[k], len(text))
            self._deltas.append(TokenDelta(job.request.id, job.sample_index, job.output_ids[k], job.logprobs[k],
                                           job.top[k] if top else None, text[start:end] if end > start else ""))
            job.released += 1

    def take_deltas(self) -> list[TokenDelta]:
        """Per-token increments of streaming requests since the last call (see TokenDelta).

        A sample's deltas always come before its Completion is returned by `step`."""
        out, self._deltas = self._deltas, []
        return out

    @staticmethod
    def _top(ids: np.ndarray, lps: np.ndarray, n: int) -> TopLogprobs:
        return [(int(i), float(v)) for i, v in zip(ids[:n], lps[:n])]

    # ------------------------------------------------------------------ scheduling

    def _admit(self) -> None:
        """Put waiting samples into free slots; copy cached prefixes in; wire up forks.

        A sample whose prompt continues past its cached prefix into a block that another
        admitted prompt is computing right now waits for that prefill (then finds the block in
        the prefix cache) instead of computing the same tokens again: when many prompts share a
        long template and arrive together, the template is prefilled once, not once per slot.
        """
        moves: list[tuple[bool, int, bool, int]] = []
        nb = self.rows // self.block_size
        free = [i for i, j in enumerate(self._slots) if j is None]
        deferred: list[_Job] = []
        now = time.monotonic()
        while free and self._waiting:
            job = self._waiting.popleft()
            parent = None
            if self.share_prefixes:
                parent = next((j for j in self._slots if j is not None and j.phase == "prefill"
                               and j.request is job.request), None)
            blocks: list[int] = []
            if parent is None and self.share_prefixes and not job.request.params.prompt_logprobs:
                blocks = self.prefix_cache.match(job.prompt[:job.target])
                if self._being_computed(job, len(blocks)):
                    deferred.append(job)
                    continue
            slot = free.pop(0)
            job.slot, job.scheduled_at = slot, now
            self._slots[slot] = job
            self.stats["prompt_tokens"] += len(job.prompt)
            if parent is not None:  # a sibling is prefilling this prompt: share its rows
                job.phase, job.parent = "fork", parent
                continue
            moves += [(True, b, False, slot * nb + i) for i, b in enumerate(blocks)]
            job.prefilled = job.cached = len(blocks) * self.block_size
            job.phase = "prefill"
        self._waiting.extendleft(reversed(deferred))
        if moves:
            self._run_copy(moves)

    def _being_computed(self, job: _Job, cached_blocks: int) -> bool:
        """True when a prompt being prefilled now will add the block of `job`'s prompt that follows
        its `cached_blocks` cached ones (so waiting for it saves computing that block twice)."""
        if not self.prefix_cache.num_blocks:
            return False
        end = (cached_blocks + 1) * self.block_size
        if end > job.target:
            return False
        head = job.prompt[:end]
        return any(j is not None and j.phase == "prefill" and j.target >= end and j.prompt[:end] == head
                   for j in self._slots)

    def _prefill_batch(self, jobs: list[_Job]) -> list[_Job]:
        """One prefill call for (a bounded batch of) `jobs`; returns those whose prefill completed."""
        want_lp = jobs[0].request.params.prompt_logprobs
        rows: list[_Job] = []
        C = 0
        for job in jobs:
            if job.request.params.prompt_logprobs != want_lp or len(rows) == self.batch_buckets[-1]:
                continue
            c = _bucket(min(job.target - job.prefilled, self.prefill_chunk), self.chunk_buckets)
            if rows and _bucket(len(rows) + 1, self.batch_buckets) * max(C, c) > self.max_prefill_tokens:
                break
            rows.append(job)
            C = max(C, c)
        B = _bucket(len(rows), self.batch_buckets)
        ids = np.zeros((B, C), np.int32)
        targets = np.zeros((B, C), np.int32) if want_lp else None
        slots = np.full(B, self.max_slots, np.int32)  # padding rows write nowhere
        starts = np.zeros(B, np.int32)
        valid = np.zeros(B, np.int32)
        for r, job in enumerate(rows):
            n = min(job.target - job.prefilled, C)
            ids[r, :n] = job.prompt[job.prefilled:job.prefilled + n]
            if targets is not None:
                targets[r, :n] = job.prompt[job.prefilled + 1:job.prefilled + n + 1]
            slots[r], starts[r], valid[r] = job.slot, job.prefilled, n
        window = _bucket(int((starts + valid).max()), self.len_buckets)
        lps = self._run_prefill(ids, slots, starts, valid, targets, self.rows if window >= self.max_len else window)
        self.stats["prefill_calls"] += 1
        if lps is not None:
            chosen, top_ids, top_lps = (np.asarray(x) for x in lps)
        done = []
        for r, job in enumerate(rows):
            n = int(valid[r])
            if lps is not None:
                k = job.request.params.top_logprobs
                if job.prompt_lps is None:
                    job.prompt_lps, job.prompt_top = [None], [None]
                job.prompt_lps += [float(x) for x in chosen[r, :n]]
                job.prompt_top += [self._top(top_ids[r, c], top_lps[r, c], k) if k else None for c in range(n)]
            job.prefilled += n
            self.stats["prefill_tokens"] += n
            if job.prefilled >= job.target:
                done.append(job)
        return done

    def _prefill(self) -> list[Completion]:
        """Prefill prompt chunks: one call while samples are decoding (bounded stall), else until
        every admitted prompt is ready (nothing waits on a decode meanwhile)."""
        streams = any(j is not None and j.phase == "running" for j in self._slots)
        finished: list[Completion] = []
        while True:
            prefilling = sorted((j for j in self._slots if j is not None and j.phase == "prefill"),
                                key=lambda j: j.order)
            if not prefilling:
                return finished
            ready = [j for j in prefilling if j.prefilled >= j.target]
            todo = [j for j in prefilling if j.prefilled < j.target]
            if todo:
                ready += self._prefill_batch(todo)
            finished += self._activate(ready)
            if streams:
                return finished

    def _activate(self, jobs: list[_Job]) -> list[Completion]:
        """Prefill done: cache the prompt's blocks, give forks their rows, start decoding."""
        moves: list[tuple[bool, int, bool, int]] = []
        nb = self.rows // self.block_size
        finished: list[Completion] = []
        started: list[_Job] = []
        for job in jobs:
            started.append(job)
            if self.share_prefixes:
                for index, block in self.prefix_cache.insert(job.prompt[:job.target]):
                    moves.append((False, job.slot * nb + index, True, block))
            for child in [j for j in self._slots if j is not None and j.phase == "fork" and j.parent is job]:
                for index in range(-(-job.target // self.block_size)):
                    moves.append((False, job.slot * nb + index, False, child.slot * nb + index))
                child.prefilled = child.cached = job.target
                child.prompt_lps, child.prompt_top = job.prompt_lps, job.prompt_top
                child.parent = None
                started.append(child)
        if moves:
            self._run_copy(moves)
        s = self._slot
        for job in started:
            p = job.request.params
            if job.max_new == 0:  # scoring only (prompt log-probs)
                self._finish(job, "length")
                finished.append(self._complete(job))
                continue
            i = job.slot
            job.phase = "running"
            s["tokens"][i], s["positions"][i], s["token_index"][i] = job.prompt[-1], job.target, 0
            s["remaining"][i], s["live"][i], s["top_n"][i] = job.max_new, True, p.top_logprobs
            s["seed"][i], s["sample_index"][i] = job.seed, job.sample_index
            s["temperature"][i], s["top_k"][i], s["top_p"][i], s["min_p"][i] = (p.temperature, p.top_k,
                                                                                 p.top_p, p.min_p)
            ids = sorted(job.stop_ids)[:MAX_STOP_IDS]
            s["stop_ids"][i] = -1
            s["stop_ids"][i, :len(ids)] = ids
            self.stats["cached_tokens"] += job.cached
        return finished

    def _decode(self) -> list[Completion]:
        running = [j for j in self._slots if j is not None and j.phase == "running"]
        if not running:
            return []
        need = max(int(self._slot["positions"][j.slot]) for j in running) + self.decode_steps
        window = _bucket(min(need, self.max_len), self.window_buckets)
        sampled = any(j.request.params.temperature > 0 for j in running)
        top = any(j.request.params.top_logprobs for j in running)
        started = time.monotonic()
        out = self._run_decode(self.rows if window >= self.max_len else window, sampled, top)
        self.stats["decode_calls"] += 1
        n = int(out["n"])  # the one host sync per chunk
        now = time.monotonic()
        toks, lps = np.asarray(out["tokens"])[:n], np.asarray(out["logprobs"])[:n]
        if top:
            top_ids, top_lps = np.asarray(out["top_ids"])[:n], np.asarray(out["top_logprobs"])[:n]
        done: list[Completion] = []
        s = self._slot
        for job in running:
            i, k = job.slot, job.request.params.top_logprobs
            before = job.generated
            finished = False
            for t in range(n):
                top = self._top(top_ids[t, i], top_lps[t, i], k) if k else None
                if self._accept(job, int(toks[t, i]), float(lps[t, i]), top):
                    finished = True
                    break
            got = job.generated - before
            self.stats["generated_tokens"] += got
            if got:
                if job.first_token_at is None:
                    job.first_token_at = now
                    if got > 1:
                        job.token_gaps.append(((now - started) / got, got - 1))
                else:
                    job.token_gaps.append(((now - job.last_token_at) / got, got))
                job.last_token_at = now
            if finished:
                done.append(self._complete(job))
                continue
            s["tokens"][i] = toks[n - 1, i]
            s["positions"][i] += n
            s["token_index"][i] += n
            s["remaining"][i] = job.max_new - job.generated
            if job.request.stream:
                self._release(job)
        return done

    # ------------------------------------------------------------------ scheduling API
    # `submit` queues requests, `step` admits waiting samples into free slots, prefills and
    # decodes one chunk, `take_deltas` gives streaming increments, `in_flight` shows partial
    # outputs, `cancel` drops a request. The HTTP server's worker thread drives the engine this
    # way; `generate` is the same loop over an iterable.

    def submit(self, request: Request) -> None:
        """Queue a request for `step`; raises ValueError now if the engine cannot run it."""
        self._waiting.extend(self._new_jobs(request))

    def cancel(self, request_id: Any) -> int:
        """Drop every waiting or running sample of `request_id`; returns how many were dropped.

        A freed slot's cache rows are simply overwritten by the next sample placed in it.
        """
        kept = [j for j in self._waiting if j.request.id != request_id]
        dropped = len(self._waiting) - len(kept)
        self._waiting.clear()
        self._waiting.extend(kept)
        for job in list(self._slots):
            if job is not None and job.request.id == request_id:
                self._finish(job, "cancelled")
                dropped += 1
        self._deltas = [d for d in self._deltas if d.request_id != request_id]
        return dropped

    @property
    def has_work(self) -> bool:
        """True while submitted samples are waiting or running."""
        return bool(self._waiting) or any(j is not None for j in self._slots)

    def free_slots(self) -> int:
        """Slots a waiting sample could be admitted to right now (minus samples already queued)."""
        return sum(j is None for j in self._slots) - len(self._waiting)

    def queued(self) -> int:
        """Samples waiting for a slot."""
        return len(self._waiting)

    def running(self) -> int:
        """Samples holding a slot (prefilling or decoding)."""
        return sum(j is not None for j in self._slots)

    def kv_cache_usage(self) -> dict[str, float]:
        """{"reserved": fraction of the KV cache's slots held by a sample (each slot reserves
        max_len rows, so this is what limits admission), "filled": fraction of all slot rows
        holding a token}. Approximate when read from another thread while the engine steps."""
        filled = 0
        for job in list(self._slots):
            if job is not None:
                filled += int(self._slot["positions"][job.slot]) if job.phase == "running" else job.prefilled
        total = self.max_slots * self.max_len
        return {"reserved": self.running() / self.max_slots, "filled": min(1.0, filled / total)}

    def in_flight(self) -> list[tuple[Any, int, list[int]]]:
        """(request id, sample index, output ids so far) of every sample holding a slot."""
        return [(j.request.id, j.sample_index, list(j.output_ids)) for j in self._slots if j is not None]

    def step(self) -> list[Completion]:
        """Admit waiting samples into free slots, prefill, then decode one chunk.

        Returns the samples that finished during this call. One host sync per decode chunk;
        the chunk ends early when a slot finishes on device, so the next `step` refills it.
        """
        self._admit()
        done = self._prefill()
        done += self._decode()
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


# --------------------------------------------------------------------------- program entry points
# Module-level (not closures over the engine), so compiled programs depend only on their
# arguments and the static values bound with functools.partial.


def _prefill_entry(cfg: Any, constrain: Any, window: int, weights: Any, cache: Any, ids: Any, slots: Any,
                   starts: Any, valid: Any, targets: Any) -> Any:
    return programs.prefill(cfg, constrain, weights, cache, ids, slots, starts, valid, targets, window=window)


def _decode_entry(cfg: Any, constrain: Any, steps: int, window: int, sampled: bool, top: bool, weights: Any,
                  cache: Any, slot: Any) -> Any:
    return programs.decode(cfg, constrain, steps, weights, cache, slot, window=window, sampled=sampled, top=top)
