"""benchmarks/generate_throughput.py runs end to end and prints the figures it promises (slow:
it starts the CLI and a transformers script as subprocesses and compiles from an empty cache)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_benchmark_prints_whole_process_and_prefix_sharing_figures():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "generate_throughput.py"), "--repeats", "1",
                          "--only", "whole_process", "--only", "prefix_sharing", "--batches", "2",
                          "--cb-requests", "0", "--new-tokens", "8", "--sdg-prompts", "4", "--template-len", "64",
                          "--sdg-tokens", "4"], capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    run = result["whole_process"]["batch_2"]
    assert run["greedy_outputs_equal_hf"] == "2/2"  # same weights, same greedy tokens as transformers
    assert run["cold_programs"]["compiled"] >= 3 and run["warm_programs"]["compiled"] == 0  # the cache works
    assert run["engine_warm_s"] > 0 and run["hf_s"] > 0 and run["cpu_ratio"] > 0
    share = result["prefix_sharing"]
    assert share["outputs_identical"] and share["prompt_tokens_computed"]["shared"] < \
        share["prompt_tokens_computed"]["unshared"]
