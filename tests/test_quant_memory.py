"""Serving memory per quantization (nemojax.parallel.serving_memory, `nemojax info --serve`,
`nemojax compile --decode`) against the byte count written out by hand, and the agreement metrics
(nemojax.evaluation.agreement) against numpy."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nemojax.config import MeshConfig, load_config
from nemojax.parallel.mesh import make_abstract_mesh
from nemojax.parallel.rules import resolve_rules
from nemojax.parallel.serving_memory import kv_cache_bytes, weight_bytes


def by_hand(m, tp: int, value_bytes: int, scales: bool) -> int:
    """Per-device weight bytes of the engine tensor parallel over `tp` devices: q/k/v/up split by
    output (heads, mlp), o/down by input; embeddings and LM head by vocab; norms replicated (bf16)."""
    D, H, KV, hd, F, V, L = (m.hidden_size, m.num_heads, m.num_kv_heads, m.head_dim, m.ffn_hidden_size,
                             m.vocab_size, m.num_layers)
    proj = (D * H * hd + 2 * D * KV * hd + H * hd * D + 2 * D * F) // tp
    scale = ((H * hd + 2 * KV * hd + F) // tp + 2 * D) * 4 if scales else 0  # o, down: out = embed, replicated
    norms = 4 * D * 2
    return L * (proj * value_bytes + scale + norms) + 2 * (V // tp) * D * 2 + 2 * D * 2


@pytest.mark.parametrize("mode,value_bytes", [("bf16", 2), ("fp8", 1), ("int8", 1)])
def test_340b_tensor_parallel_weight_bytes_equal_the_hand_count(mode, value_bytes):
    cfg = load_config("nemotron4-340b")
    mesh = make_abstract_mesh(MeshConfig(data=1, fsdp=1, pipeline=1, tensor=8), 8)
    got = weight_bytes(cfg.model, mode, mesh, resolve_rules(cfg.sharding))
    assert got["total"] == by_hand(cfg.model, 8, value_bytes, scales=mode != "bf16")
    m = cfg.model
    assert kv_cache_bytes(m, 32, 4096, mesh, resolve_rules(cfg.sharding)) == \
        2 * m.num_layers * 32 * 4096 * (m.num_kv_heads // 8) * m.head_dim * 2


def test_info_serve_reports_the_340b_fp8_fit_on_8_devices(capsys):
    from nemojax.cli import main

    assert main(["info", "nemotron4-340b", "--serve", "8", "--serve-batch", "32", "--serve-context", "4096"]) == 0
    serving = json.loads(capsys.readouterr().out)["serving"]
    fp8, bf16 = serving["modes"]["fp8"], serving["modes"]["bf16"]
    assert fp8["fits"] and not bf16["fits"]  # the paper: FP8 on 8 x 80 GB, BF16 needs twice the devices
    assert fp8["weights"]["total"] < bf16["weights"]["total"] * 0.52
    assert fp8["total"] == fp8["weights"]["total"] + fp8["kv_cache"] + fp8["prefix_pool"]
    assert main(["info", "nemotron4-340b", "--serve", "7"]) != 0
    assert "not divisible by mesh.tensor=7" in capsys.readouterr().err


def test_compiled_decode_arguments_are_the_counted_weights_and_cache():
    """XLA's own accounting of the decode program's arguments (tensor parallel over 2 CPU devices)
    equals the counted fp8 weights + KV cache + the per-slot host arrays."""
    from nemojax.inference.aot_decode import compile_decode

    cfg = load_config("tiny")
    out = compile_decode(cfg, "cpu", batch=4, context=64, tensor=2, quantize="fp8", steps=2)
    mesh = make_abstract_mesh(MeshConfig(data=1, fsdp=1, pipeline=1, tensor=2), 2)
    rules = resolve_rules(cfg.sharding)
    weights = weight_bytes(cfg.model, "fp8", mesh, rules)["total"]
    cache = kv_cache_bytes(cfg.model, 4, 64, mesh, rules) + kv_cache_bytes(cfg.model, 1, 16, mesh, rules)
    slots = 4 * (12 * 4 + 8 * 4)  # 12 four-byte fields (one bool byte: live) and 8 stop ids per slot
    args = out["memory_per_device"]["argument_bytes"]
    assert weights + cache <= args <= weights + cache + slots


def test_agreement_metrics_equal_numpy():
    import jax.numpy as jnp

    from nemojax.evaluation.agreement import agreement_sums, greedy_agreement

    rng = np.random.default_rng(0)
    ref, other = rng.normal(size=(2, 5, 11)), rng.normal(size=(2, 5, 11))
    other[0, 0] = ref[0, 0] * 1.01  # a position where the argmax agrees
    targets = rng.integers(0, 11, size=(2, 5))
    mask = (rng.random((2, 5)) > 0.3).astype(np.float32)
    got = {k: float(v) for k, v in agreement_sums(jnp.asarray(ref), jnp.asarray(other), jnp.asarray(targets),
                                                  jnp.asarray(mask)).items()}

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lr, lq = log_softmax(ref), log_softmax(other)
    kl = (np.exp(lr) * (lr - lq)).sum(-1)
    assert got["kl"] == pytest.approx((kl * mask).sum(), rel=1e-5)
    assert got["top1"] == ((ref.argmax(-1) == other.argmax(-1)) * mask).sum()
    nll = -np.take_along_axis(lq, targets[..., None], -1)[..., 0]
    assert got["nll"] == pytest.approx((nll * mask).sum(), rel=1e-5) and got["count"] == mask.sum()
    g = greedy_agreement([[1, 2, 3, 4], [5, 6], [7, 8]], [[1, 2, 9, 4], [5, 6], [0, 8]])
    assert g == {"identical": pytest.approx(1 / 3), "prefix_match": pytest.approx((0.5 + 1 + 0) / 3), "outputs": 3}
    with pytest.raises(ValueError, match="2 reference outputs but 1"):
        greedy_agreement([[1], [2]], [[1]])


def test_info_shows_qlora_training_state_and_weights_per_quantization(capsys):
    """`nemojax info` of a LoRA stage: gradients and optimizer state for the adapters alone, the frozen
    base's bytes shrinking with its quantization; and the weights in bf16 / fp8 / int8 per device."""
    from nemojax.cli import main

    def info(*extra):
        argv = ["info", "tiny", "stage.kind=sft", "stage.train=configs/data/sft_general.jsonl", "model.lora.rank=4",
                "model.param_dtype=bfloat16", *extra, "--mesh-devices", "2", "mesh.data=1", "mesh.tensor=2"]
        assert main(argv) == 0
        return json.loads(capsys.readouterr().out)

    bf16, int8 = info(), info("model.quant.mode=int8")
    m = load_config("tiny").model
    per_layer = m.hidden_size * (m.num_heads * m.head_dim + 2 * m.num_kv_heads * m.head_dim) \
        + m.num_heads * m.head_dim * m.hidden_size + 2 * m.hidden_size * m.ffn_hidden_size
    saved = m.num_layers * per_layer // 2  # one byte less per projection weight, split over tensor=2
    b, q = bf16["memory"]["per_device_bytes"], int8["memory"]["per_device_bytes"]
    assert q["gradients"] == b["gradients"] < b["params"] / 10  # adapters only
    assert 0 < b["params"] - q["params"] <= saved  # minus what the fp32 scales take back
    assert b["params"] - q["params"] > 0.9 * saved
    w = bf16["weights_by_quantization"]["per_device"]
    assert w["fp8"]["bytes"] == w["int8"]["bytes"] < w["bf16"]["bytes"]
