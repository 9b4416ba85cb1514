"""SDG on the real in-process engine resumes byte for byte.

Why it could not before: on XLA:CPU a matmul row's result depends on how many rows the call has,
so a prompt prefilled beside other prompts, or reusing keys/values another prompt's prefill
computed (prefix cache), got slightly different logits than the same prompt in the uninterrupted
run, and a sampled token could flip. Pipeline engine clients now prefill one prompt per call with
no prefix cache (ClientConfig defaults), which makes each request's numbers independent of its
neighbours (benchmarks/sdg_batch_invariance.py shows the cause and the cost).

The model is a random one wide enough (hidden 256, ffn 1024) for XLA:CPU's matmuls to change
kernels with the row count; the 64-wide test model of the other SDG tests is batch-invariant
whatever the settings, so it could not catch a regression here.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from nemojax.checkpoint import save_model
from nemojax.config import ModelConfig
from nemojax.model.transformer import init_model
from nemojax.sdg.config import ClientConfig
from xla_flags import xla_flags

CFG = ModelConfig(vocab_size=4096, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
                  ffn_hidden_size=1024, init_std=0.2, max_seq_len=256)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_model(init_model(CFG, seed=0), CFG, tmp_path_factory.mktemp("det") / "lm")


def prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = "river mountain cook star sky blue green answer question write short long poem essay".split()
    return [f"Question {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(3, 60))) for i in range(n)]


@pytest.mark.heavy
def test_pipeline_engine_gives_each_request_the_same_numbers_whatever_runs_beside_it(ckpt):
    """Twelve seeded requests (mixed prompt lengths, n = 4 or 1, temperature 0.8, top_p 0.95,
    8-48 tokens) on an engine built as a pipeline builds it, all together and then only the
    second half (what a resumed stage submits): each sample's tokens and log-prob bits agree.
    Mutants killed (each changes the bits of 1-6 samples here): batched prefill
    (`max_prefill_batch` 8), a prefix cache across requests, decode windows sized to the
    longest running sample (the engine's defaults, i.e. `batch_invariant: false`)."""
    from nemojax.data.chat import prompt_ids
    from nemojax.inference import Request, SamplingParams
    from nemojax.sdg.clients import make_engine

    spec = ClientConfig(type="engine", checkpoint=str(ckpt), max_slots=4, max_len=256, decode_steps=8)
    texts = prompts(12)
    rng = random.Random(0)
    budgets = [rng.randint(8, 48) for _ in texts]

    def run(idx: range) -> dict:
        engine, tok = make_engine(spec)
        reqs = [Request(i, prompt_ids(tok, [{"role": "user", "content": texts[i]}]),
                        SamplingParams(temperature=0.8, top_p=0.95, max_tokens=budgets[i], n=4 if i % 3 == 0 else 1,
                                       seed=100 + i, logprobs=True))
                for i in idx]
        return {(c.request_id, c.sample_index): (c.output_ids, np.asarray(c.logprobs, np.float32).view(np.uint32))
                for c in engine.generate_all(reqs)}

    full, resumed = run(range(12)), run(range(6, 12))
    assert len(resumed) == 12
    for key, (ids, bits) in resumed.items():
        assert full[key][0] == ids, key
        assert np.array_equal(full[key][1], bits), key


N = 8


def write_pipeline(tmp: Path, ckpt: Path, run_dir: Path) -> Path:
    src = tmp / "prompts.jsonl"
    src.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts(N))))
    cfg = {"run_dir": str(run_dir), "seed": 1, "max_in_flight": 4, "progress": False,
           "clients": {"gen": {"type": "engine", "checkpoint": str(ckpt), "max_slots": 4, "max_len": 256,
                               "decode_steps": 4}},
           "stages": {"prompts": {"kind": "read", "path": str(src)},
                      "answers": {"kind": "respond", "n": 2, "temperature": 0.9, "top_p": 0.95, "max_tokens": 16},
                      "sft": {"kind": "export_sft"}}}
    path = tmp / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def cli(path: Path) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1),
               JAX_COMPILATION_CACHE_DIR=str(ROOT / ".jax_cache"))
    return subprocess.Popen([sys.executable, "-m", "nemojax.cli", "sdg", "run", str(path), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def test_engine_sigkill_mid_stage_then_rerun_writes_the_uninterrupted_bytes(ckpt, tmp_path):
    """`nemojax sdg run` on the in-process engine, SIGKILLed with 3 of 8 answers in the ledger,
    then rerun: every output file equals an uninterrupted run's, byte for byte. Mutants killed:
    request seeds not derived from (seed, stage, item, call) (e.g. left to the engine), a ledger
    that loses or repeats items, outputs written in completion order."""
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref = cli(write_pipeline(tmp_path, ckpt, ref_dir))
    out, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err.decode()[-3000:]

    path = write_pipeline(tmp_path, ckpt, run_dir)
    ledger = run_dir / ".work" / "answers.ledger.jsonl"
    proc = cli(path)
    deadline = time.time() + 300
    while not ledger.exists() or ledger.read_bytes().count(b"\n") < 1 + 3:
        assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = ledger.read_bytes().count(b"\n") - 1
    assert 3 <= done_before < N and not (run_dir / "answers.jsonl").exists()

    last = cli(path)
    out, err = last.communicate(timeout=300)
    assert last.returncode == 0, err.decode()[-3000:]
    files = sorted(p.name for p in ref_dir.glob("*.jsonl"))
    assert files == ["answers.jsonl", "prompts.jsonl", "sft.jsonl"]
    for name in files:
        assert (run_dir / name).read_bytes() == (ref_dir / name).read_bytes(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["answers"]["resumed_items"] == done_before and summary["answers"]["items_in"] == N
    answers = [json.loads(line) for line in (run_dir / "answers.jsonl").read_text().splitlines()]
    texts = [r["messages"][-1]["content"] for a in answers for r in a["responses"]]
    assert len(texts) == 2 * N and len(set(texts)) > N  # sampled: the samples differ
