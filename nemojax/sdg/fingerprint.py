"""What a stage's outputs depend on, recorded when it runs and compared on every rerun.

A stage's fingerprint is a JSON tree of everything that can change its records:
- `stage`: its resolved spec (kind, sampling parameters, limits, its own keys);
- `seed` and the prompt-template overrides;
- `clients`: each client the stage can call (its `client`, and any spec value naming a
  declared client, e.g. respond's `clients`, Genetic Instruct's `coder`), described by what
  changes its answers: an engine's model identity (resolved checkpoint, training step, a
  digest of the weights and of the model config), tokenizer digest, dtype and the engine
  settings that change numerics or admission (slots, max_len, batch invariance, prefill batch,
  buckets); an OpenAI-compatible server's base_url and model; a scripted client's rules.
  Transport settings (timeouts, retries, concurrency, program cache) are left out: they change
  how long a stage takes, not what it writes;
- `reward`: the reward backend, for stages that score with it;
- `files`: a digest of every data file a spec value names (read's `path`, `eval_file`, ...);
- `inputs`: a digest of the fingerprint of each stage it reads, so a change upstream marks
  every stage downstream as changed too.

The runner refuses to reuse a finished stage, or to continue a partly done one, whose recorded
fingerprint differs, naming the keys that changed (`describe_change`).

Weight digests read each file's size, its first and last MiB (files up to 2 MiB whole) and its
path: a retrained or replaced checkpoint changes every array file's head, so it is detected,
while a 340B checkpoint is not read in full on every run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from nemojax.sdg.config import ClientConfig, PipelineConfig, RewardConfig, spec_dict

HEAD = 1 << 20  # bytes read from each end of a large file
REWARD_KINDS = ("reward_filter",)  # kinds that always score; `preference` does with judge: reward
_digests: dict[tuple, str] = {}


def content_digest(path: str | Path) -> str:
    """sha256 over a file or directory tree: relative paths, sizes, and the bytes of files up to
    2 MiB or the first and last MiB of larger ones (see the module docstring)."""
    root = Path(path).resolve()
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    stats = tuple((str(p.relative_to(root)) if root.is_dir() else p.name, p.stat().st_size, p.stat().st_mtime_ns)
                  for p in files)
    key = (str(root), stats)
    if key in _digests:
        return _digests[key]
    h = hashlib.sha256()
    for p, (rel, size, _) in zip(files, stats):
        h.update(f"{rel}\0{size}\0".encode())
        with p.open("rb") as f:
            if size <= 2 * HEAD:
                h.update(f.read())
            else:
                h.update(f.read(HEAD))
                f.seek(size - HEAD)
                h.update(f.read(HEAD))
    _digests[key] = h.hexdigest()[:32]
    return _digests[key]


def model_identity(checkpoint: str) -> dict[str, Any]:
    """Resolved checkpoint (a run directory means its newest step), step, weight and config digests."""
    from nemojax.checkpoint import resolve_checkpoint

    kind, where, config = resolve_checkpoint(checkpoint)
    out: dict[str, Any] = {"format": kind, "path": str(where), "weights": content_digest(where)}
    if kind == "nemojax":
        out["config"] = content_digest(config)
        if where.parent.name.isdigit():
            out["step"] = int(where.parent.name)
    return out


def tokenizer_identity(spec: str, checkpoint: str) -> dict[str, Any]:
    from nemojax.data.tokenizer import resolve_tokenizer_path

    if not spec:
        own = Path(checkpoint) / "tokenizer.model"
        spec = str(own) if own.is_file() else "builtin"
    return {"spec": spec, "digest": content_digest(resolve_tokenizer_path(spec))}


ENGINE_KEYS = ("max_slots", "max_len", "decode_steps", "batch_invariant", "max_prefill_batch", "min_bucket", "dtype")


def client_identity(c: ClientConfig, live: Any = None) -> dict[str, Any]:
    """What changes a client's answers (see the module docstring); `live` is the client object,
    whose own `identity()` (if it has one) is added: a live engine's settings and model shape."""
    if c.type == "engine":
        out: dict[str, Any] = {"type": "engine", "model": model_identity(c.checkpoint),
                               "tokenizer": tokenizer_identity(c.tokenizer, c.checkpoint),
                               **{k: getattr(c, k) for k in ENGINE_KEYS}}
    elif c.type == "openai":
        out = {"type": "openai", "base_url": c.base_url, "model": c.model}
    else:
        out = {"type": c.type, "rules": c.rules, "default": c.default}
    identity = getattr(live, "identity", None)
    if callable(identity):
        out["live"] = identity()
    return out


def reward_identity(r: RewardConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"type": r.type, "weights": dict(r.weights)}
    if r.type == "engine":
        out.update(model=model_identity(r.checkpoint), tokenizer=tokenizer_identity(r.tokenizer, r.checkpoint),
                   max_len=r.max_len)
    elif r.type == "openai":
        out.update(base_url=r.base_url, model=r.model)
    return out


def _values(spec: Any) -> list[tuple[str, str]]:
    """(key, string) for every string spec value, lists included."""
    out = []
    for f in dataclasses.fields(spec):
        v = getattr(spec, f.name)
        for s in (v if isinstance(v, list) else [v]):
            if isinstance(s, str) and s:
                out.append((f.name, s))
    return out


def stage_clients(cfg: PipelineConfig, spec: Any) -> list[str]:
    """Declared clients the stage can call: its own (default: the first) and any spec value naming one."""
    names = []
    if spec.needs_client() and cfg.clients:
        names.append(spec.client or next(iter(cfg.clients)))
    names += [v for k, v in _values(spec) if k not in ("input", "kind") and v in cfg.clients]
    return sorted(set(names))


def uses_reward(spec: Any) -> bool:
    return spec.kind in REWARD_KINDS or (spec.kind == "preference" and getattr(spec, "judge", "") == "reward")


def _files(spec: Any) -> dict[str, str]:
    from nemojax.sdg.stages.io import data_path

    out = {}
    for key, value in _values(spec):
        p = Path(data_path(value))
        if key not in ("kind", "input", "client") and "\n" not in value and len(value) < 4096 and p.is_file():
            out[f"{key}={value}"] = content_digest(p)
    return out


def digest(tree: Any) -> str:
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:32]


def fingerprints(cfg: PipelineConfig, clients: dict[str, Any], reward: Any = None) -> dict[str, dict[str, Any]]:
    """Every stage's fingerprint, in pipeline order (`clients`, `reward`: the live objects)."""
    out: dict[str, dict[str, Any]] = {}
    known: dict[str, dict[str, Any]] = {}
    for name, spec in cfg.stages.items():
        used = stage_clients(cfg, spec)
        for c in used:
            if c not in known:
                known[c] = client_identity(cfg.clients[c], clients.get(c))
        fp: dict[str, Any] = {"stage": spec_dict(spec), "seed": cfg.seed, "templates": dict(cfg.templates),
                              "clients": {c: known[c] for c in used}, "files": _files(spec)}
        if uses_reward(spec):
            fp["reward"] = reward_identity(cfg.reward)
        upstream = [spec.input] + list(getattr(spec, "inputs", []) or [])
        fp["inputs"] = {s: digest(out[s]) for s in upstream if s in out}
        out[name] = fp
    return out


def _flat(tree: Any, prefix: str) -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: tree}


def _short(v: Any) -> str:
    s = json.dumps(v) if v is not None else "unset"
    return s if len(s) <= 60 else s[:57] + "..."


def describe_change(stage: str, old: Any, new: dict[str, Any]) -> str:
    """The keys whose values differ between a recorded and a current fingerprint, e.g.
    `stages.answers.n (1 -> 3)`; upstream changes name the stage read."""
    if not isinstance(old, dict):
        return "it was recorded by an older nemojax, without a configuration fingerprint"
    a, b = _flat(old, ""), _flat(new, "")
    parts = []
    for key in sorted(set(a) | set(b), key=lambda k: (not k.startswith("stage."), k)):
        if a.get(key) == b.get(key):
            continue
        if key.startswith("inputs."):
            parts.append(f"the stage it reads, {key[len('inputs.'):]!r}, changed")
            continue
        shown = f"stages.{stage}.{key[len('stage.'):]}" if key.startswith("stage.") else key
        parts.append(f"{shown} ({_short(a.get(key))} -> {_short(b.get(key))})")
    return "; ".join(parts[:8]) + (f"; and {len(parts) - 8} more" if len(parts) > 8 else "")
