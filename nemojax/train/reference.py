"""Reference log-probs for preference stages: computed once with the frozen reference weights, cached.

NeMo-Aligner swaps the initial weights in for every global batch; Tunix keeps a second model
resident. Here the reference is run once, before training, over every pair of the training and
validation sets (file order, batched like validation, sharded on the training mesh), and the
per-pair log-probs are attached to the rows (`ref_chosen_logps` / `ref_rejected_logps`), so a
training step reads two floats per pair and no reference weights are resident while training.

The reference is the weights training starts from (`init_from`, else the seeded fresh init) or
`stage.reference`; with LoRA it is the base model with adapters off. A cache file
`<cache_dir>/<name>.npz` (+ `.json`, its key) is reused only when everything that changes the
values matches: the tokenized data and its settings, tokenizer included (the dataset
fingerprint); the reference weights (the resolved checkpoint, step included, and the size and
modification time of every file in it, so a checkpoint rewritten in place is a new reference;
or the init seed); the model settings (dtypes, LoRA, architecture); and the log-prob averaging.
The key also holds the .npz's SHA-256, so a cache torn between its two files is never read. A
resumed run skips the pass; any change recomputes it.

`sharded_forward` is the helper both this pass and the stages' validation use: a jitted
forward of one batch on the training's mesh and sharding rules (through the pipeline when there
is one), fed from full numpy batches and returning full numpy outputs on every process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from nemojax.config import Config
from nemojax.model.axes import use_rules
from nemojax.parallel import batching
from nemojax.parallel.pipeline import use_pipeline
from nemojax.train.build import Training
from nemojax.train.tasks import SEQUENCE_FIELDS, SIDES, pair_log_probs

PAIR_FIELDS = tuple(f"{side}_{f}" for side in SIDES for f in SEQUENCE_FIELDS)
CACHE_VERSION = 2


def sharded_forward(training: Training, fn: Callable[[Any, Any, dict], Any], graphdef: Any = None
                    ) -> Callable[[Any, dict[str, np.ndarray]], Any]:
    """`call(params, batch)`: `fn(graphdef, params, microbatch)` jitted on the training's mesh.

    batch: the FULL batch as numpy arrays `[micro, ...]` (every process passes the same one;
    each feeds only the rows its devices hold). micro must be a multiple of
    `training.batch_divisor`. Returns fn's outputs as numpy arrays on every process.
    """
    graphdef = training.graphdef if graphdef is None else graphdef
    mesh, rules, schedule = training.mesh, training.rules, training.schedule

    def one(params: Any, batch: dict) -> Any:
        with use_rules(mesh, rules), use_pipeline(schedule):
            return fn(graphdef, params, jax.tree.map(lambda x: x[0], batch))

    jitted = jax.jit(one, in_shardings=(training.state_shardings.params, training.batch_sharding),
                     out_shardings=NamedSharding(mesh, PartitionSpec()))

    def call(params: Any, batch: dict[str, np.ndarray]) -> Any:
        micro = len(next(iter(batch.values())))
        rows = training.rows(1, micro)
        local = {k: np.asarray(v)[rows] for k, v in batch.items()}
        return jax.device_get(jitted(params, batching.assemble(training.batch_sharding, local, 1, micro)))

    return call


def pair_log_probs_fn(training: Training, *, average: bool, adapters: bool = True
                      ) -> Callable[[Any, dict[str, np.ndarray]], tuple[np.ndarray, np.ndarray]]:
    """(chosen, rejected) response log-probs of a batch of pair rows; adapters=False runs the base
    model of a LoRA-adapted one (the preference stages' reference)."""
    graphdef = training.graphdef
    if not adapters:
        from nemojax.model.lora import set_adapters_enabled

        model = nnx.merge(training.graphdef, training.abstract_state.params)
        set_adapters_enabled(model, False)
        graphdef = nnx.split(model, nnx.Param)[0]
    fwd = sharded_forward(training, lambda g, p, mb: pair_log_probs(nnx.merge(g, p), mb, average=average), graphdef)
    return lambda params, batch: fwd(params, {k: batch[k] for k in PAIR_FIELDS})


def dataset_log_probs(fwd: Callable, params: Any, dataset: Any, batch_size: int,
                      log: Callable[[str], None] = print, what: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Per-example (chosen, rejected) log-probs of every pair of `dataset`, indexed by example."""
    n = dataset.num_examples
    chosen, rejected = np.full(n, np.nan, np.float32), np.full(n, np.nan, np.float32)
    batches = -(-n // batch_size)
    t0, last = time.perf_counter(), time.perf_counter()
    for i, b in enumerate(dataset.eval_batches(batch_size), start=1):
        c, r = fwd(params, b)
        real = b["example_mask"] > 0
        idx = b["example_index"][real]
        chosen[idx], rejected[idx] = np.asarray(c)[real], np.asarray(r)[real]
        if time.perf_counter() - last > 30 or i == batches:
            log(f"reference log-probs{what}: {i}/{batches} batches ({time.perf_counter() - t0:.0f} s)")
            last = time.perf_counter()
    return chosen, rejected


def reference_identity(cfg: Config) -> tuple[str, str]:
    """What the reference weights are, for the cache key: (the resolved checkpoint or the init
    seed, `files_signature` of the checkpoint's files or "" for a fresh init)."""
    src = cfg.stage.reference or cfg.init_from
    if not src:
        return f"fresh-init:seed={cfg.seed}", ""
    from nemojax.checkpoint import resolve_checkpoint
    from nemojax.train.checkpointing import CheckpointError

    try:
        kind, where, config_file = resolve_checkpoint(src)
    except FileNotFoundError as e:
        key = "stage.reference" if cfg.stage.reference else "init_from"
        raise CheckpointError(f"{key}={src!r} (the reference policy): {e}") from None
    return f"{kind}:{where}", files_signature([where, config_file])


def files_signature(paths: list[Path]) -> str:
    """SHA-256 over (path, size, modification time) of every file under `paths`: changes when any
    file is rewritten, without reading the (possibly huge) weights."""
    h = hashlib.sha256()
    for root in paths:
        files = sorted(f for f in Path(root).rglob("*") if f.is_file()) if Path(root).is_dir() else [Path(root)]
        for f in files:
            st = f.stat()
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _everyone(flag: bool) -> bool:
    """True only if every process says so (a collective pass must be run by all or none)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.all(multihost_utils.process_allgather(np.asarray([flag], np.int32))))


def _cache_key(cfg: Config, dataset: Any, source: tuple[str, str]) -> dict[str, Any]:
    """Everything the cached values depend on (see the module docstring)."""
    model = json.dumps(dataclasses.asdict(cfg.model), sort_keys=True, default=str)
    return {"version": CACHE_VERSION, "fingerprint": dataset.fingerprint, "reference": source[0],
            "weights": source[1], "model": hashlib.sha256(model.encode()).hexdigest(),
            "average_log_probs": bool(cfg.stage.average_log_probs)}


def _load_cached(dataset: Any, path: Path, key: dict[str, Any]) -> bool:
    """Attach the cached values if the cache was written for `key` and is whole; else False."""
    try:
        meta = json.loads(path.with_suffix(".json").read_text())
        if {k: v for k, v in meta.items() if k != "npz_sha256"} != key or meta.get("npz_sha256") != _sha256_file(path):
            return False
    except (OSError, ValueError, AttributeError):
        return False
    return dataset.load_reference_logps(path)


def _save_cached(dataset: Any, path: Path, key: dict[str, Any]) -> None:
    """Write the values, then their key (with the values file's hash): a kill in between leaves
    no key, so the next run recomputes."""
    meta = path.with_suffix(".json")
    meta.unlink(missing_ok=True)
    dataset.save_reference_logps(path)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**key, "npz_sha256": _sha256_file(path)}))
    tmp.replace(meta)


def attach_reference_log_probs(cfg: Config, training: Training, datasets: dict[str, Any],
                               load_weights: Callable[[str, Config, Any], dict],
                               log: Callable[[str], None] = print) -> dict[str, str]:
    """Attach reference log-probs to every dataset in `datasets` ({name: PreferenceDataset}),
    from the cache when valid, else by one pass of the reference weights (then cached).

    Returns {name: "cached" | "computed"}. The reference weights are loaded only if some
    dataset needs the pass, and released before training starts.
    """
    st = cfg.stage
    cache_dir = Path(st.reference_cache or Path(cfg.run_dir) / "reference")
    source = reference_identity(cfg)
    paths = {name: cache_dir / f"{name}.npz" for name in datasets}
    keys = {name: _cache_key(cfg, ds, source) for name, ds in datasets.items()}
    status = {name: "cached" for name in datasets}
    todo = [name for name, ds in datasets.items() if not _everyone(_load_cached(ds, paths[name], keys[name]))]
    if not todo:
        return status
    params = reference_params(cfg, training, load_weights)
    fwd = pair_log_probs_fn(training, average=st.average_log_probs, adapters=not cfg.model.lora.rank)
    bs = cfg.data.micro_batch_size or cfg.data.global_batch_size
    for name in todo:
        ds = datasets[name]
        ds.ref_logps = None  # computed from scratch (a half-attached stale value must not leak in)
        c, r = dataset_log_probs(fwd, params, ds, bs, log, f" ({name}, {ds.num_examples} pairs)")
        ds.set_reference_logps(c, r)
        if jax.process_index() == 0:
            _save_cached(ds, paths[name], keys[name])
        status[name] = "computed"
    del params
    return status


def reference_params(cfg: Config, training: Training, load_weights: Callable[[str, Config, Any], dict]) -> Any:
    """The reference weights as the training's sharded params State."""
    src = cfg.stage.reference or cfg.init_from
    if not src:
        return training.init_state(cfg.seed).params
    from nemojax.train.checkpointing import CheckpointError

    try:
        pure = load_weights(src, cfg, training.state_shardings.params.to_pure_dict())
    except CheckpointError:
        raise
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        key = "stage.reference" if cfg.stage.reference else "init_from"
        raise CheckpointError(f"{key}={src!r} (the reference policy): {e}") from None
    params = jax.tree.map(lambda x: x, training.abstract_state.params)
    params.replace_by_pure_dict(pure)
    return params


__all__ = ["PAIR_FIELDS", "attach_reference_log_probs", "dataset_log_probs", "pair_log_probs_fn",
           "files_signature", "reference_identity", "reference_params", "sharded_forward"]
