"""benchmarks/gpu_check.py runs on the CPU (`--tiny`) and its JSON holds up to hand arithmetic.

The script is written for a first run on a GPU; this makes sure every part of it (attention
check, training MFU per backend with both FLOP counts, decode against the bandwidth bound)
works and reports consistent numbers before one is at hand. Given --peak-tflops and
--hbm-tbps, MFU and the bound are checked against counts derived here from the model's shape.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.heavy  # .ci/run runs it after the default suite (-m heavy)

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
# the --tiny model (gpu_check.TINY_MODEL): hidden 64, 2 layers, 4 heads / 2 KV heads of 16, FFN 128, vocab 256
D, L, H, KV, HD, F, V, SEQ = 64, 2, 4, 2, 16, 128, 256, 64
PEAK_TFLOPS, HBM_TBPS = 0.5, 0.05


def _load_module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def tiny() -> dict:
    # cudnn cannot run here (fp32 tiny model, no GPU): a failing candidate must be reported, not stop the run
    proc = _run("--tiny", "--peak-tflops", str(PEAK_TFLOPS), "--hbm-tbps", str(HBM_TBPS),
                "--backends", "xla,dot_product,cudnn")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_training_reports_both_flop_counts_and_the_fastest_backend(tiny):
    assert tiny["device"]["platform"] == "cpu" and tiny["settings"]["backends"] == ["xla", "dot_product", "cudnn"]
    train = tiny["training"]
    assert "compute_dtype=bfloat16" in train["candidates"]["cudnn"]["error"]
    assert "cuDNN" in tiny["attention_check"]["cudnn"]["error"]  # bf16 inputs there: JAX finds no cuDNN
    # Megatron counts the whole score matrix (scores + values: 2 matmuls x 2 FLOPs x seq x heads
    # x head_dim per layer, x3 for forward + backward); MaxText the causal half.
    attention = 3 * 2 * 2 * SEQ * H * HD * L
    weights = L * (D * H * HD + 2 * D * KV * HD + H * HD * D + 2 * D * F) + D * V
    assert train["flops_per_token"]["megatron"] == 6 * weights + attention
    assert train["flops_per_token"]["maxtext"] == 6 * weights + attention / 2
    timed = {k: v for k, v in train["candidates"].items() if "tokens_per_sec" in v}
    assert set(timed) == {"xla", "dot_product"}
    assert train["best_backend"] == max(timed, key=lambda k: timed[k]["tokens_per_sec"])
    for name, c in timed.items():
        assert c["tokens_per_sec"] > 0 and c["tokens_per_step"] == 2 * SEQ
        assert math.isfinite(c["loss"]) and abs(c["loss"] - math.log(V)) < 0.5  # random tokens, fresh init
        for count in ("maxtext", "megatron"):
            tflops = c["tokens_per_sec"] * train["flops_per_token"][count] / 1e12
            assert c[f"tflops_{count}"] == pytest.approx(tflops)
            assert c[f"mfu_{count}"] == pytest.approx(tflops / PEAK_TFLOPS)
    assert train["mfu_maxtext"] < train["mfu_megatron"]
    check = tiny["attention_check"]["dot_product"]
    assert check["max_abs_diff_output"] < 1e-5 and check["max_abs_diff_grads"] < 1e-5


def test_decode_bytes_and_bound_from_the_model_shape(tiny):
    """Mutants: a quantized mode that reads its projections as floats (or drops the scales from
    the byte count); a bound not from batch x bandwidth / bytes."""
    assert set(tiny["decode"]) == {"none", "fp8"}  # the default formats, side by side
    projections = L * (D * H * HD + 2 * D * KV * HD + H * HD * D + 2 * D * F)
    rest = L * 4 * D + 2 * D + D * V  # norms, final norm, LM head: the compute dtype (fp32 here)
    channels = L * (H * HD + 2 * KV * HD + D + F + D)  # one fp32 scale per output channel
    expect = {"none": 4 * (projections + rest), "fp8": projections + 4 * channels + 4 * rest}
    for mode, dec in tiny["decode"].items():
        assert dec["quantize"] == mode
        assert dec["weight_bytes"] == expect[mode]
        assert dec["kv_bytes_per_token"] == 2 * L * KV * HD * 4
        assert [r["batch"] for r in dec["results"]] == [1, 4]
        for r in dec["results"]:
            b = r["batch"]
            assert r["bytes_per_step"] == dec["weight_bytes"] + b * D * 4 + b * dec["window"] * dec["kv_bytes_per_token"]
            assert r["bound_tokens_per_sec"] == pytest.approx(b * HBM_TBPS * 1e12 / r["bytes_per_step"])
            assert r["fraction_of_bound"] == pytest.approx(r["tokens_per_sec"] / r["bound_tokens_per_sec"])
            assert r["tokens_per_sec"] > 0


def test_quantized_decode_weights_are_what_the_engine_serves():
    """The fp8 / int8 decode weights hold the block projections as model.quant stores them (one
    byte per weight, fp32 scales) and decode to within the format's rounding of the bf16 weights."""
    mod = _load_module()
    from nemojax.config import load_config
    from nemojax.model import quant

    cfg = load_config("tiny", [*mod.TINY_MODEL, "data.seq_len=64"]).model
    plain = mod.decode_weights(cfg, "none", 0)["stacked"]
    for mode, dtype, tol in (("fp8", "float8_e4m3fn", 2 ** -3), ("int8", "int8", 1 / 127)):
        w = mod.decode_weights(cfg, mode, 0)["stacked"]
        for t in quant.QUANT_TARGETS:
            assert str(w[t].dtype) == dtype and str(w[quant.scale_name(t)].dtype) == "float32"
            back = np.asarray(quant.dequantize(quant.QArray(w[t], w[quant.scale_name(t)])))
            ref = np.asarray(plain[t], np.float32)
            amax = np.abs(ref).max()
            assert np.abs(back - ref).max() <= tol * amax, (mode, t)
        assert w["attn_norm_scale"].dtype == plain["attn_norm_scale"].dtype  # the rest: compute dtype


def test_budget_bounds_the_run_and_bad_options_are_refused():
    proc = _run("--tiny", "--budget-s", "0")
    out = json.loads(proc.stdout)
    assert proc.returncode == 1  # nothing measured is not a success
    assert {s.split(":")[0] for s in out["skipped"]} == {"attention_check", "training[xla]",
                                                          "training[dot_product]", "decode[none]", "decode[fp8]"}
    assert out["training"]["best_backend"] is None
    proc = _run("--tiny", "--quantize", "none,fp4")
    assert proc.returncode == 2 and "--quantize" in proc.stderr and "fp4" in proc.stderr
    proc = _run("--tiny", "--backends", "xla,flash")
    assert proc.returncode == 2 and "flash" in proc.stderr


def test_hbm_table_and_packed_rows():
    mod = _load_module()
    assert mod.hbm_bandwidth("NVIDIA H100 80GB HBM3", 0) == 3.35e12
    assert mod.hbm_bandwidth("NVIDIA H100 PCIe", 0) == 2.0e12
    assert mod.hbm_bandwidth("NVIDIA H200", 0) == 4.8e12
    assert mod.hbm_bandwidth("NVIDIA H200", 2.5) == 2.5e12  # the override wins
    assert mod.hbm_bandwidth("cpu", 0) is None
    rows = mod.packed_rows(np.random.default_rng(0), 3, 100, 50, (7, 30))
    for seg, pos in zip(rows["segment_ids"], rows["positions"]):
        starts = np.flatnonzero(np.diff(seg)) + 1
        assert seg[0] == 1 and np.all(np.diff(seg) >= 0) and np.all(seg > 0)  # 1, 2, 3, ... end to end
        assert np.all(pos[np.r_[0, starts]] == 0)  # positions restart at every document
        assert np.all(np.diff(np.r_[0, starts, 100])[:-1] >= 7)  # all but the row's last piece are whole
    assert np.array_equal(rows["input_ids"][:, 1:], rows["targets"][:, :-1])
