"""The engine's on-disk program cache in processes with several devices (8 fake CPU devices, as
on an 8-GPU host serving a one-device model).

A serialized executable does not record where it runs; loaded for all of the process's devices,
its first call failed ("Expected args to execute_sharded_on_local_devices to have 8 shards").
Entries are now keyed by, and loaded onto, the one device their arguments live on, so a later
process loads the programs of its own placement and never another placement's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from nemojax.checkpoint import save_model
from nemojax.config import ModelConfig
from nemojax.inference.programs import Programs
from nemojax.model.transformer import init_model
from xla_flags import xla_flags

ROOT = Path(__file__).resolve().parent.parent
CFG = ModelConfig(vocab_size=256, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                  ffn_hidden_size=64, init_std=0.2, max_seq_len=64)


def _scaled_sum(w, x):
    return (w * x).sum(), w + 1


@pytest.mark.parametrize("where", ["device 0", "device 3", "host"])
def test_a_fresh_cache_loads_a_saved_program_onto_the_arguments_device(tmp_path, where):
    assert len(jax.devices()) == 8
    w = np.arange(4, dtype=np.float32)
    if where != "host":
        w = jax.device_put(w, jax.devices()[int(where[-1])])  # committed, like the engine's weights
    args = (w, np.full(4, 2, np.float32))
    want = Programs(tmp_path, "ctx")("f", (), lambda: _scaled_sum, args, ())
    later = Programs(tmp_path, "ctx")  # what a later process starts with: only the directory
    total, w1 = later("f", (), lambda: _scaled_sum, args, ())
    assert later.stats["loaded"] == 1 and later.stats["compiled"] == 0
    assert float(total) == float(want[0]) == 12.0
    expected = jax.devices()[int(where[-1])] if where != "host" else jax.devices()[0]
    assert w1.devices() == {expected}


def test_each_device_placement_has_its_own_entry(tmp_path):
    for d in (0, 3, 0, 3):
        args = (jax.device_put(np.ones(4, np.float32), jax.devices()[d]), np.ones(4, np.float32))
        Programs(tmp_path, "ctx")("f", (), lambda: _scaled_sum, args, ())
    assert len(list(tmp_path.glob("f-*.bin"))) == 2  # never one placement's entry overwritten by another's


SCRIPT = r"""
import json, sys
import jax
from nemojax.checkpoint import load_model
from nemojax.data.tokenizer import load_tokenizer
from nemojax.inference import Engine, Request, SamplingParams
from nemojax.sdg.clients import make_engine
from nemojax.sdg.config import ClientConfig

ckpt = sys.argv[1]
settings = dict(max_slots=2, max_len=64, decode_steps=4, min_bucket=64)
invariant = dict(max_prefill_batch=1, prefix_cache_tokens=0, min_window=64)  # what make_engine's default adds
requests = [Request("greedy", [5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=6)),
            Request("sampled", [9, 10, 11], SamplingParams(temperature=1.0, max_tokens=6, seed=3, n=2))]
report = {"devices": len(jax.devices()), "engines": []}
for placement in sys.argv[2:]:
    if placement == "sdg":  # the SDG engine client, as `nemojax sdg run` builds it
        engine, _ = make_engine(ClientConfig(checkpoint=ckpt, tokenizer="builtin", **settings))
    else:  # nemojax.load-style placement on another device of the host
        device = jax.devices()[int(placement[len("device"):])]
        model = load_model(ckpt, progress=False, sharding=jax.sharding.SingleDeviceSharding(device))
        engine = Engine(model, **settings, **invariant,
                        stop_token_ids=sorted({model.cfg.eos_id, load_tokenizer("builtin").eos_id}))
    outs = engine.generate_all(requests)
    stats = engine.compile_stats()
    report["engines"].append({"outputs": [c.output_ids for c in outs], "compiled": stats["compiled"],
                              "loaded": stats["loaded"], "device": next(iter(engine.cache["k"].devices())).id})
print("REPORT " + json.dumps(report))
"""


def _run(ckpt: Path, cache: Path, *placements: str) -> dict:
    env = dict(os.environ, XLA_FLAGS=xla_flags(8), JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(cache))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(ckpt), *placements], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("REPORT ")][-1]
    return json.loads(line[len("REPORT "):])


def test_a_later_process_with_eight_devices_loads_the_sdg_engines_programs(tmp_path):
    ckpt = tmp_path / "lm"
    save_model(init_model(CFG, seed=0), CFG, ckpt)
    cache = tmp_path / "jax_cache"
    report = _run(ckpt, cache, "sdg")
    assert report["devices"] == 8
    (sdg,) = report["engines"]
    assert sdg["device"] == 0 and sdg["compiled"] >= 3 and sdg["loaded"] == 0  # weights, prefill, decode (+ copy)
    assert list((cache / "nemojax-engine").glob("*.bin"))
    # A later process: a model on another device first (its own programs, kept beside the SDG
    # engine's), then the SDG client's engine again, then a second engine on device 3.
    on3, sdg_again, on3_again = _run(ckpt, cache, "device3", "sdg", "device3")["engines"]
    assert on3["device"] == on3_again["device"] == 3 and on3["compiled"] == sdg["compiled"]
    assert sdg_again["compiled"] == 0 and sdg_again["loaded"] == sdg["compiled"]
    assert on3_again["compiled"] == 0 and on3_again["loaded"] == on3["compiled"]
    for engine in (on3, sdg_again, on3_again):  # same model and seeds: the same tokens everywhere
        assert engine["outputs"] == sdg["outputs"]
