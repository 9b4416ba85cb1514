"""The SDG pipeline against a real `nemojax serve` process over HTTP (OpenAI-compatible API):
greedy answers through the server equal the in-process engine's, seeded samples are
reproducible, and SFT export works on them. (Judges over HTTP use the same client; they are
covered against a scripted server in test_sdg_http_client.py and scripted LLMs elsewhere.)"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from nemojax.sdg.config import build_pipeline
from nemojax.sdg.runner import Runner
from tests.sdg_helpers import read, save_random_lm
from xla_flags import xla_flags

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = save_random_lm(tmp_path_factory.mktemp("serve") / "lm")
    port = free_port()
    env = dict(os.environ, XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu")
    log = tmp_path_factory.mktemp("serve_log") / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "nemojax.cli", "serve", "--checkpoint", str(ckpt), "--port",
                                 str(port), "--batch-slots", "4", "--max-len", "256", "--model-name", "tiny",
                                 "--log-level", "warning"], stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"server did not come up: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield f"{url}/v1", ckpt
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_pipeline_over_http_matches_in_process(server, tmp_path):
    base_url, ckpt = server
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                               ["Tell me about rivers.", "What is two plus two?", "Name a colour."]))
    tree = {
        "run_dir": str(tmp_path / "run"), "seed": 0, "progress": False,
        "clients": {
            "http": {"type": "openai", "base_url": base_url, "model": "tiny", "max_concurrency": 4},
            "local": {"type": "engine", "checkpoint": str(ckpt), "max_len": 256, "max_slots": 4,
                      "min_bucket": 256},
        },
        "stages": {
            "prompts": {"kind": "read", "path": str(prompts)},
            "http_greedy": {"kind": "respond", "client": "http", "max_tokens": 12},
            "local_greedy": {"kind": "respond", "input": "prompts", "client": "local", "max_tokens": 12},
            "sampled": {"kind": "respond", "input": "prompts", "client": "http", "n": 2, "temperature": 0.9,
                        "max_tokens": 12},
            "sft": {"kind": "export_sft", "input": "sampled"},
        },
    }
    summaries = Runner(build_pipeline(tree), log=io.StringIO()).run()
    run = tmp_path / "run"
    http = [r["responses"][0]["messages"] for r in read(run, "http_greedy")]
    local = [r["responses"][0]["messages"] for r in read(run, "local_greedy")]
    assert len(http) == 3 and http == local  # same model, same template, same greedy tokens
    assert summaries["sampled"]["kept"] == 3 and summaries["sampled"]["tokens"] > 0
    assert all(len(r["responses"]) == 2 for r in read(run, "sampled"))
    assert len(read(run, "sft")) == 6
    # sampled requests carry derived seeds: the same pipeline elsewhere gives the same samples
    tree2 = dict(tree, run_dir=str(tmp_path / "run2"))
    tree2["stages"] = {k: tree["stages"][k] for k in ("prompts", "sampled")}
    Runner(build_pipeline(tree2), log=io.StringIO()).run()
    assert read(tmp_path / "run2", "sampled") == read(run, "sampled")
