"""The engine's device programs, and the cache that compiles each shape once (ever, with a disk).

Three pure functions of (weights, cache, host-built inputs), each compiled per static shape:

- `prefill`: B rows x C prompt tokens; each row writes its tokens' keys/values into its slot's
  cache rows and attends to that slot's rows [0, window). With `logprobs`, also the log-prob
  of each next prompt token and the top alternatives (for echo / prompt scoring).
- `decode`: up to `steps` tokens for every slot in a `lax.while_loop` that exits after the step
  in which some live slot finished (stop token or token budget), so the host refills it at
  once. Attends over the first `window` cache rows. All per-slot inputs (next token, position,
  sampling knobs, budget, stop ids) come from the host with each call: the device state is only
  the KV cache.
- `copy`: moves of `block_size`-row KV blocks between slots and the prefix-cache pool (prefix
  hits into a slot, a finished prefill into the pool, a prompt's rows to its sibling samples).

`Programs` holds the compiled executables. A miss compiles with `jax.jit(...).lower().compile()`;
when a program directory is given and the arguments live on one device, the executable is also
serialized there under a key of everything that affects it (program, shapes, model config,
weights' shapes and dtypes, the device the arguments live on, device kind, jax version, XLA
flags and this package's traced source), and a later process loads it instead of tracing,
lowering and compiling again. Every program the engine runs goes through it, so `stats` counts
compiles, loads and the seconds they took.

A serialized executable does not say where it runs: loaded without execution devices, JAX
spreads it over every device of the process (8 fake CPU devices, 8 GPUs), and its first call on
single-device arguments fails ("Expected args to execute_sharded_on_local_devices to have 8
shards"). So the device comes from the arguments themselves, names the entry, and is the one
execution device of the load: a program compiled for device 3 is never loaded for device 0.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import secrets
import threading
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp

from nemojax.config import ModelConfig
from nemojax.inference.forward import cached_forward, lm_logits
from nemojax.inference.sampling import MAX_TOP_LOGPROBS, argmax_first, sample, top_logprobs

Cache = dict[str, jax.Array]  # {"k", "v": [layers, slots, rows, kv, hd], "pool_k", "pool_v": [layers, blocks, bs, kv, hd]}
Constrain = Callable[[jax.Array], jax.Array]
SAMPLING_FIELDS = ("seed", "sample_index", "temperature", "top_k", "top_p", "min_p")
# Source files whose code is traced into the programs: part of every on-disk key.
_TRACED_SOURCES = ("inference/forward.py", "inference/programs.py", "inference/sampling.py",
                   "model/layers.py", "model/quant.py", "model/transformer.py", "config.py")


def _identity(x: jax.Array) -> jax.Array:
    return x


def prefill(cfg: ModelConfig, constrain: Constrain, weights: dict[str, Any], cache: Cache, ids: jax.Array,
            slots: jax.Array, starts: jax.Array, valid: jax.Array, targets: jax.Array | None, *,
            window: int) -> tuple[Cache, Any]:
    """Write rows [starts, starts + valid) of `slots` from `ids` [B, C]; a padding row has slot >=
    the slot count. With `targets` [B, C] (the token after each position), also returns their
    log-probs [B, C] and the top alternatives ([B, C, K] ids, log-probs)."""
    C = ids.shape[1]
    rows = cache["k"].shape[2]
    positions = starts[:, None] + jnp.arange(C, dtype=jnp.int32)[None, :]
    write_pos = jnp.where(jnp.arange(C)[None, :] < valid[:, None], positions, rows)
    h, k, v = cached_forward(cfg, weights, ids, positions, cache["k"], cache["v"], slots=slots,
                             write_pos=write_pos, window=window)
    out = dict(cache, k=constrain(k), v=constrain(v))
    if targets is None:
        return out, None
    logp = jax.nn.log_softmax(lm_logits(weights, h), axis=-1)
    chosen = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    top_lp, top_ids = jax.lax.top_k(logp, MAX_TOP_LOGPROBS)
    return out, (chosen, top_ids.astype(jnp.int32), top_lp)


def decode(cfg: ModelConfig, constrain: Constrain, steps: int, weights: dict[str, Any], cache: Cache,
           slot: dict[str, jax.Array], *, window: int, sampled: bool = True, top: bool = True,
           ) -> tuple[Cache, dict[str, jax.Array]]:
    """Up to `steps` tokens per slot over cache rows [0, window).

    sampled False: every slot is greedy (argmax only: no sampling code in the program, which is
    then about half the size: faster to compile, load and run). top False: no slot wants
    alternatives (their outputs stay zero).

    slot: per-slot arrays [S]: tokens (to feed next), positions, token_index (PRNG fold-in),
    remaining (token budget), live (the host runs this slot), top_n (alternatives wanted), the
    sampling knobs, and stop_ids [S, MAX_STOP]. Returns the cache and {"tokens", "logprobs"
    [steps, S], "top_ids", "top_logprobs" [steps, S, K], "n" (valid steps)}.
    """
    S = slot["tokens"].shape[0]
    full = window >= cache["k"].shape[2]
    ck, cv = (cache["k"], cache["v"]) if full else (cache["k"][:, :, :window], cache["v"][:, :, :window])
    sampling = {k: slot[k] for k in SAMPLING_FIELDS}
    stop_ids, live, top_n = slot["stop_ids"], slot["live"], slot["top_n"]
    K = MAX_TOP_LOGPROBS

    def cond(carry: tuple[Any, ...]) -> jax.Array:
        return (carry[0] < steps) & ~carry[-1]

    def step(carry: tuple[Any, ...]) -> tuple[Any, ...]:
        i, ck, cv, tokens, positions, token_index, remaining, out, _ = carry
        running = live & (remaining > 0)
        write = jnp.where(running, positions, window)  # idle / finished slots write nothing
        h, ck, cv = cached_forward(cfg, weights, tokens[:, None], positions[:, None], ck, cv,
                                   write_pos=write[:, None])
        logits = lm_logits(weights, h[:, 0])
        if sampled:
            tok, lp = sample(logits, token_index=token_index, **sampling)
        else:
            tok = argmax_first(logits)
            lp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tok[:, None], axis=-1)[:, 0]
        ck, cv = constrain(ck), constrain(cv)
        finished = running & ((remaining == 1) | jnp.any(tok[:, None] == stop_ids, axis=-1))
        remaining = jnp.where(finished, 0, remaining - running.astype(jnp.int32))
        out = dict(out, tokens=out["tokens"].at[i].set(tok), logprobs=out["logprobs"].at[i].set(lp))
        if top:
            top_ids, top_lp = top_logprobs(logits, jnp.where(running, top_n, 0), K)
            out["top_ids"], out["top_logprobs"] = out["top_ids"].at[i].set(top_ids), out["top_logprobs"].at[i].set(top_lp)
        return (i + 1, ck, cv, tok, positions + 1, token_index + 1, remaining, out, jnp.any(finished))

    out = {"tokens": jnp.zeros((steps, S), jnp.int32), "logprobs": jnp.zeros((steps, S), jnp.float32),
           "top_ids": jnp.zeros((steps, S, K), jnp.int32), "top_logprobs": jnp.zeros((steps, S, K), jnp.float32)}
    carry = (jnp.int32(0), ck, cv, slot["tokens"], slot["positions"], slot["token_index"], slot["remaining"],
             out, jnp.bool_(False))
    n, ck, cv, *_, out, _ = jax.lax.while_loop(cond, step, carry)
    if full:
        k, v = ck, cv
    else:
        k = constrain(jax.lax.dynamic_update_slice_in_dim(cache["k"], ck, 0, axis=2))
        v = constrain(jax.lax.dynamic_update_slice_in_dim(cache["v"], cv, 0, axis=2))
    return dict(cache, k=k, v=v), dict(out, n=n)


def copy(constrain: Constrain, block_size: int, cache: Cache, src_pool: jax.Array, src: jax.Array,
         dst_pool: jax.Array, dst: jax.Array) -> Cache:
    """Copy KV blocks: move m takes block `src[m]` of the pool (src_pool) or of the slots' rows
    (slot-major block index: slot * blocks_per_slot + block) to `dst[m]` likewise. A destination
    index past the end (padding) is dropped."""
    L, S, T = cache["k"].shape[:3]
    nb = T // block_size
    P = cache["pool_k"].shape[1]
    out = dict(cache)
    for name in ("k", "v"):
        slots = cache[name].reshape(L, S * nb, block_size, *cache[name].shape[3:])
        pool = cache["pool_" + name]
        data = jnp.where(src_pool[None, :, None, None, None],
                         pool[:, jnp.clip(src, 0, P - 1)], slots[:, jnp.clip(src, 0, S * nb - 1)])
        slots = slots.at[:, jnp.where(dst_pool, S * nb, dst)].set(data, mode="drop")
        out[name] = constrain(slots.reshape(cache[name].shape))
        out["pool_" + name] = constrain(pool.at[:, jnp.where(dst_pool, dst, P)].set(data, mode="drop"))
    return out


# --------------------------------------------------------------------------- compiled programs


# An executable JAX loaded from its own persistent cache serializes without its code (XLA:CPU),
# so such an executable must never be written to the program directory. A monitoring listener
# reports whether a compile in this thread was a JAX cache hit; if so (JAX had the program, e.g.
# from a process that did not keep it, or our file was deleted), the program is lowered again
# under a one-off module name, which JAX's cache cannot hold, and that fresh compile is kept.
_local = threading.local()


def _on_event(event: str, **_: Any) -> None:
    if event == "/jax/compilation_cache/cache_hits" and getattr(_local, "watching", False):
        _local.hit = True


jax.monitoring.register_event_listener(_on_event)


def _named(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    def program(*args: Any) -> Any:
        return fn(*args)

    program.__name__ = program.__qualname__ = name
    return program


def _compile_fresh(fn: Callable[..., Any], name: str, args: tuple[Any, ...], donate: tuple[int, ...]) -> tuple[Any, bool]:
    """(executable, True if it was compiled here rather than loaded from JAX's cache)."""
    for module in (f"nemojax_{name}", f"nemojax_{name}_{secrets.token_hex(6)}"):
        lowered = jax.jit(_named(fn, module), donate_argnums=donate).lower(*args)
        _local.watching, _local.hit = True, False
        try:
            exe = lowered.compile()
        finally:
            _local.watching = False
        if not _local.hit:
            return exe, True
    return exe, False


FORMAT = "nemojax-programs-3"  # part of every key: bump when the on-disk format changes


def _hash_sources() -> str:
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for rel in _TRACED_SOURCES:
        path = root / rel
        h.update(rel.encode())
        h.update(path.read_bytes() if path.is_file() else b"-")
    return h.hexdigest()


# Taken at import: it must describe the code this process runs, even if the files change later.
_SOURCE_FINGERPRINT = _hash_sources()


def source_fingerprint() -> str:
    """Hash of the package source traced into the programs (changes invalidate disk entries)."""
    return _SOURCE_FINGERPRINT


def _avals(tree: Any) -> str:
    leaves, treedef = jax.tree.flatten(tree)
    return repr(treedef) + repr([(tuple(x.shape), str(x.dtype)) for x in leaves])


def _default_device() -> Any:
    """Where jit runs a program whose arguments are all uncommitted (host arrays included)."""
    default = jax.config.jax_default_device
    return jax.devices(default)[0] if default is None or isinstance(default, str) else default


def _placement(args: Any) -> list[Any]:
    """The devices a jitted program on `args` runs on: those of its committed arrays (jit moves
    the uncommitted ones there), else the default device. Sorted by id."""
    arrays = [x for x in jax.tree.leaves(args) if isinstance(x, jax.Array)]
    committed = [x for x in arrays if x.committed]
    if not committed:
        return [_default_device()]
    devices = {d for x in committed for d in x.sharding.device_set}
    return sorted(devices, key=lambda d: d.id)


def _device_key(device: Any) -> str:
    return f"{device.platform}:{device.id}:{getattr(device, 'device_kind', '')}:{device.process_index}"


class Programs:
    """Compiled programs by (name, static key); see the module docstring.

    directory: where serialized executables of single-device programs live (None: memory only;
    programs whose arguments span several devices stay in memory too). context: a string of
    everything outside the arguments that changes the compiled code (model config, jax ...).
    """

    def __init__(self, directory: str | Path | None, context: str) -> None:
        self.directory = Path(directory) if directory else None
        self._context = context
        self._programs: dict[tuple[str, tuple[Any, ...]], Any] = {}
        self.stats: dict[str, Any] = {"compiled": 0, "loaded": 0, "seconds": 0.0, "by_name": {}}

    def __call__(self, name: str, static: tuple[Any, ...], build: Callable[[], Callable[..., Any]],
                 args: tuple[Any, ...], donate: tuple[int, ...]) -> Any:
        """Run program `name` specialised by `static` on `args` (compiling or loading it once)."""
        return self.prepare(name, static, build, args, donate)(*args)

    def prepare(self, name: str, static: tuple[Any, ...], build: Callable[[], Callable[..., Any]],
                args: tuple[Any, ...], donate: tuple[int, ...]) -> Any:
        """The executable of program `name` for `static` and args shaped like `args` (not run)."""
        exe = self._programs.get((name, static))
        if exe is None:
            exe = self._obtain(name, static, build, args, donate)
            self._programs[(name, static)] = exe
        return exe

    def _obtain(self, name: str, static: tuple[Any, ...], build: Callable[[], Callable[..., Any]],
                args: tuple[Any, ...], donate: tuple[int, ...]) -> Any:
        start = time.perf_counter()
        path = None
        exe = None
        devices = _placement(args) if self.directory is not None else []
        if len(devices) == 1:
            key = hashlib.sha256("\n".join([FORMAT, self._context, name, repr(static), _avals(args),
                                             _device_key(devices[0])]).encode())
            path = self.directory / f"{name}-{key.hexdigest()[:40]}.bin"
            exe = self._load(path, devices[0])
        if exe is not None:
            self.stats["loaded"] += 1
        else:
            if path is None:
                exe = jax.jit(build(), donate_argnums=donate).lower(*args).compile()
            else:
                exe, fresh = _compile_fresh(build(), name, args, donate)
                if fresh:
                    self._save(path, exe)
            self.stats["compiled"] += 1
        seconds = time.perf_counter() - start
        self.stats["seconds"] += seconds
        self.stats["by_name"][name] = self.stats["by_name"].get(name, 0) + 1
        return exe

    @staticmethod
    def _load(path: Path, device: Any) -> Any:
        """The executable stored at `path`, running on `device` only (None if absent or unreadable)."""
        if not path.is_file():
            return None
        try:
            from jax.experimental.serialize_executable import deserialize_and_load

            blob, in_tree, out_tree = pickle.loads(path.read_bytes())
            return deserialize_and_load(blob, in_tree, out_tree, backend=device.client, execution_devices=[device])
        except Exception:  # a stale or torn entry: compile instead (and overwrite it)
            return None

    @staticmethod
    def _save(path: Path, exe: Any) -> None:
        try:
            from jax.experimental.serialize_executable import serialize

            data = pickle.dumps(serialize(exe))
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, path)  # atomic: concurrent processes never read a torn file
        except Exception:  # not serializable here (e.g. this backend): memory-only
            pass

    def count(self, name: str) -> int:
        """Distinct executables of program `name` obtained so far."""
        return sum(1 for (n, _) in self._programs if n == name)

    def has(self, name: str, static: tuple[Any, ...]) -> bool:
        """Whether program `name` for `static` is compiled (or loaded) already."""
        return (name, static) in self._programs

    def statics(self, name: str) -> list[tuple[Any, ...]]:
        """The static keys of program `name` obtained so far."""
        return [s for (n, s) in list(self._programs) if n == name]
