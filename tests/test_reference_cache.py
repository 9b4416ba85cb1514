"""The reference is the reference: cached reference log-probs are the reference checkpoint's values.

`attach_reference_log_probs` (what every preference stage runs before training) is compared
with tests/independent_forward.py, a float64 numpy forward of the weights the test itself wrote
to the checkpoint, on the rows the step trains on. Then every input the values depend on is
changed in turn (the checkpoint rewritten in place, the weights' dtype, LoRA settings, the data,
the tokenizer, the averaging) and the cache must be recomputed, with values equal to a fresh
forward; a cache torn between its two files must not be read. (RPO round r's reference being
round r-1's weights, by value, is checked on a real two-round run in tests/test_stage_runs.py.)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from flax import nnx

import independent_forward as ind
from nemojax.checkpoint import save_model
from nemojax.config import load_config
from nemojax.data.stage_data import load_stage_data
from nemojax.data.tokenizer import load_tokenizer
from nemojax.model.reward import make_abstract_model
from nemojax.parallel.mesh import make_mesh
from nemojax.train.build import build_training
from nemojax.train.reference import attach_reference_log_probs
from nemojax.train.tasks import stage_task

REPO = Path(__file__).resolve().parent.parent
SMALL = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
         "model.head_dim=8", "model.ffn_hidden_size=64", "model.max_seq_len=64", "data.seq_len=64",
         "data.global_batch_size=4", "stage.validation=", "stage.validation_fraction=0", "seed=0"]
PAIRS = 6
RTOL = 2e-6  # fp32 pass vs float64 numpy, log-probs summed over a response (~ -100 nats)


def random_weights(model_cfg: Any, seed: int) -> dict:
    """Weights no seeded init gives: every leaf N(0, 0.1), float32."""
    rng = np.random.default_rng(seed)
    abstract = nnx.to_pure_dict(nnx.state(make_abstract_model(model_cfg), nnx.Param))
    return jax.tree.map(lambda x: (0.1 * rng.standard_normal(x.shape)).astype(np.float32), abstract)


class OtherTokenizer:
    """The builtin tokenizer under another fingerprint (a different tokenizer file giving these ids)."""

    fingerprint = "another-tokenizer"

    def __init__(self, tok: Any) -> None:
        self._tok = tok

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("reference_cache")
    lines = (REPO / "configs/data/preference_train.jsonl").read_text().splitlines(keepends=True)
    (d / "pairs.jsonl").write_text("".join(lines[:PAIRS]))
    (d / "other_pairs.jsonl").write_text("".join(lines[PAIRS:2 * PAIRS]))
    cfg = config(d, [])
    weights = random_weights(cfg.model, seed=5)
    save_model(weights, cfg.model, d / "base")
    return {"dir": d, "weights": weights, "tok": load_tokenizer("builtin"), "trainings": {}}


def config(d: Path, extra: list[str]) -> Any:
    return load_config("configs/dpo.yaml", SMALL + [f"run_dir={d / 'run'}", f"init_from={d / 'base'}",
                                                     f"stage.train={d / 'pairs.jsonl'}", *extra])


def training_for(world: dict[str, Any], cfg: Any) -> Any:
    """One Training per model config (its jitted forward compiles once)."""
    key = json.dumps(dataclasses.asdict(cfg.model), sort_keys=True, default=str)
    if key not in world["trainings"]:
        world["trainings"][key] = build_training(cfg, make_mesh(cfg.mesh, jax.devices()[:1]), task=stage_task(cfg))
    return world["trainings"][key]


def attach(world: dict[str, Any], cfg: Any, tokenizer: Any = None) -> tuple[str, Any]:
    """(cache status, the dataset with reference log-probs attached) for `cfg`'s training pairs."""
    ds = load_stage_data(cfg, tokenizer or world["tok"]).train
    status = attach_reference_log_probs(cfg, training_for(world, cfg), {"train": ds}, stage_task(cfg).load_weights,
                                        log=lambda s: None)
    return status["train"], ds


def independent(ds: Any, weights: dict, cfg: Any) -> np.ndarray:
    """[n, 2] float64 (chosen, rejected) log-probs of `weights` on every pair of `ds`, by example index."""
    p = ind.as_numpy(weights)
    out = np.full((ds.num_examples, 2), np.nan)
    for rows in ds.eval_batches(4):
        real = rows["example_mask"] > 0
        for j, side in enumerate(("chosen", "rejected")):
            lp = ind.response_log_probs(p, cfg.model, rows, side, average=cfg.stage.average_log_probs)
            out[rows["example_index"][real], j] = lp[real]
    assert np.isfinite(out).all()
    return out


def test_cached_reference_log_probs_are_the_reference_checkpoints_forward(world: dict[str, Any]) -> None:
    """The pass computes the init_from checkpoint's log-probs of every pair (by value), a rerun reads
    them back unchanged, and with LoRA the reference is the base (adapters off: same values).

    Kills the mutant "reference log-probs computed from a fresh init" (`reference_params`
    returning `training.init_state(cfg.seed).params`)."""
    cfg = config(world["dir"], [])
    status, ds = attach(world, cfg)
    want = independent(ds, world["weights"], cfg)
    assert status == "computed"
    np.testing.assert_allclose(ds.ref_logps, want, rtol=RTOL)
    assert np.abs(ds.ref_logps).min() > 1.0  # real responses, not empty masks
    again_status, again = attach(world, cfg)
    assert again_status == "cached"
    np.testing.assert_array_equal(again.ref_logps, ds.ref_logps)

    lora = config(world["dir"], ["model.lora.rank=2", "model.lora.targets=[q,v]"])
    status, ds = attach(world, lora)
    assert status == "computed"  # other model settings: not read from the cache...
    np.testing.assert_allclose(ds.ref_logps, want, rtol=RTOL)  # ...and the base's values


def test_a_stale_cache_is_recomputed(world: dict[str, Any]) -> None:
    """Each input of the values, changed alone, recomputes the cache, and the new values equal a
    fresh forward: the checkpoint rewritten in place (same path and step), the weights' dtype,
    the data, the tokenizer, the averaging. A cache whose values file no longer matches its key
    (torn by a kill, or replaced) is recomputed, never read.

    Kills the mutants "cache keyed by the checkpoint path only", "dtype / LoRA settings not in
    the key", "averaging not in the key", "values file not checked against its key"."""
    d = world["dir"] / "stale"
    d.mkdir()
    for name in ("pairs.jsonl", "other_pairs.jsonl"):
        (d / name).write_text((world["dir"] / name).read_text())
    weights = random_weights(config(d, []).model, seed=7)
    save_model(weights, config(d, []).model, d / "base")
    cfg = config(d, [])
    assert attach(world, cfg)[0] == "computed"
    assert attach(world, cfg)[0] == "cached"

    # Each change below differs from the cache left by the one before in that one input only.
    rewritten = random_weights(cfg.model, seed=8)
    save_model(rewritten, cfg.model, d / "base", overwrite=True)  # e.g. the SFT run redone in place
    rounded = jax.tree.map(lambda x: np.asarray(jax.numpy.asarray(x, jax.numpy.bfloat16), np.float32), rewritten)
    extra: list[str] = []
    for change, more, want in (("checkpoint rewritten", [], rewritten),
                               ("averaging", ["stage.average_log_probs=true"], rewritten),
                               ("dtype", ["model.param_dtype=bfloat16"], rounded),
                               ("data", [f"stage.train={d / 'other_pairs.jsonl'}"], rounded)):
        extra += more
        changed = config(d, extra)
        status, ds = attach(world, changed)
        assert status == "computed", f"{change}: the stale cache was read"
        np.testing.assert_allclose(ds.ref_logps, independent(ds, want, changed), rtol=RTOL, err_msg=change)

    status, ds = attach(world, changed, OtherTokenizer(world["tok"]))
    assert status == "computed", "tokenizer: the stale cache was read"
    assert attach(world, changed)[0] == "computed"  # back to the builtin fingerprint: the cache holds the other's

    cache = d / "run" / "reference" / "train.npz"
    with np.load(cache) as f:
        values, fingerprint = f["ref_logps"], f["fingerprint"]
    np.savez(cache, ref_logps=values + 1.0, fingerprint=fingerprint)  # same data, other values, key untouched
    status, ds = attach(world, changed)
    assert status == "computed", "a values file that does not match its key was read"
    np.testing.assert_allclose(ds.ref_logps, independent(ds, rounded, changed), rtol=RTOL)
