"""Weight-only quantization (model.quant): the formulas against numpy, the quantized forward and
engine against a plain model holding the dequantized weights, loading / converting / serving."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from nemojax.checkpoint import load_model, save_model
from nemojax.config import ConfigError, ModelConfig, QuantConfig
from nemojax.convert.quantize import quantize_model
from nemojax.model import quant
from nemojax.model.reward import make_model

BASE = ModelConfig(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                   ffn_hidden_size=64, init_std=0.1, max_seq_len=64, scan_layers=False)
IDS = jnp.asarray([[2, 5, 9, 33, 17, 100, 4, 8]], jnp.int32)
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)  # QLoRA paper, appendix E


def np_quantize(w: np.ndarray, mode: str, block: int, scale: np.ndarray | None = None,
                ) -> tuple[np.ndarray, np.ndarray]:
    """Reference: w [in, out] (flattened input), blocks of `block` consecutive inputs per output
    column (0: the whole column) -> (values [in, out], scales [in / block, out]). `scale` given:
    the values for that scale (XLA may divide by 127 as a multiply by 1/127: one ulp apart)."""
    n_in, n_out = w.shape
    g = n_in if block == 0 else block
    wb = w.astype(np.float32).reshape(n_in // g, g, n_out)
    absmax = np.abs(wb).max(axis=1)
    qmax = {"int8": 127.0, "fp8": 448.0, "nf4": 1.0}[mode]
    s = np.where(absmax > 0, absmax / np.float32(qmax), 1.0).astype(np.float32)
    x = wb / (s if scale is None else scale)[:, None, :]
    if mode == "int8":
        v = np.clip(np.rint(x), -127, 127).astype(np.int8)
    elif mode == "fp8":
        v = x.astype(ml_dtypes.float8_e4m3fn)
    else:
        v = np.argmin(np.abs(x[..., None] - NF4), axis=-1).astype(np.uint8)
    return v.reshape(n_in, n_out), s


QUANTIZE = jax.jit(quant.quantize, static_argnums=(1, 2, 3), static_argnames=("layered",))


def forward(model: nnx.Module, ids: jax.Array) -> jax.Array:
    """model(ids), compiled once (eager dispatch compiles every op on its own)."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, ids)


def unpack_nf4(v: np.ndarray) -> np.ndarray:
    out = np.empty((*v.shape[:-1], 2 * v.shape[-1]), np.uint8)
    out[..., 0::2], out[..., 1::2] = v & 0xF, v >> 4
    return out


@pytest.mark.parametrize("mode,block", [("int8", 0), ("fp8", 0), ("int8", 4), ("fp8", 16), ("nf4", 8)])
def test_quantize_equals_the_formula_in_numpy(mode, block):
    """Each target layout (1 and 2 input dims; blocks inside and across head_dim) against numpy on
    the flattened [in, out] weight; dequantization error within half a quantization step."""
    rng = np.random.default_rng(0)
    shapes = {"q": (3, 32, 4, 8), "o": (3, 4, 8, 32)}  # [layers, in..., out...]
    for t, shape in shapes.items():
        w = (rng.standard_normal(shape) * rng.uniform(0.01, 3.0, shape[-1])).astype(np.float32)
        w[1, ..., 0] = 0.0  # an all-zero column gets scale 1, values 0
        qa = QUANTIZE(jnp.asarray(w), mode, quant.N_IN[t], block, layered=True)
        n_in = quant.N_IN[t]
        n_flat = int(np.prod(shape[1:1 + n_in]))
        values = np.asarray(qa.values)
        if mode == "nf4":
            assert values.shape == (*shape[:-1], shape[-1] // 2) and values.dtype == np.uint8
            values = unpack_nf4(values)
        for layer in range(shape[0]):
            ref_s = np_quantize(w[layer].reshape(n_flat, -1), mode, block)[1]
            got_s = np.asarray(qa.scale[layer]).reshape(ref_s.shape)
            np.testing.assert_allclose(got_s, ref_s, rtol=2.5e-7, atol=0)
            ref_v = np_quantize(w[layer].reshape(n_flat, -1), mode, block, scale=got_s)[0]
            got_v = values[layer].reshape(n_flat, -1)
            np.testing.assert_array_equal(got_v.astype(np.float32), ref_v.astype(np.float32))
        deq = np.asarray(quant.dequantize(qa))
        s_full = np.repeat(np.asarray(qa.scale).reshape(shape[0], -1, *shape[1 + n_in:]),
                           n_flat // (qa.scale[0].size // int(np.prod(shape[1 + n_in:]))), axis=1).reshape(shape)
        err = np.abs(deq - w)
        if mode == "int8":
            assert np.all(err <= 0.5 * s_full * (1 + 1e-6))
        elif mode == "fp8":  # 3 mantissa bits: half a step is 2^-4 relative (2^-10 s below the normals)
            assert np.all(err <= np.maximum(np.abs(w) * 2.0**-4, 2.0**-10 * s_full) * (1 + 1e-6))
        else:  # half the widest gap between NF4 levels
            assert np.all(err <= 0.5 * np.max(np.diff(NF4)) * s_full * (1 + 1e-6))
        assert np.all(deq[1, ..., 0] == 0)


def test_config_rejects_what_cannot_be_quantized():
    with pytest.raises(ConfigError, match="quant.mode='int4' is unknown"):
        QuantConfig(mode="int4")
    with pytest.raises(ConfigError, match="needs model.quant.block_size > 0"):
        QuantConfig(mode="nf4")
    with pytest.raises(ConfigError, match="must divide every projection's input size"):
        dataclasses.replace(BASE, quant=QuantConfig(mode="int8", block_size=24)).validate()
    # 8 divides hidden 48, FFN 96 and heads x head_dim 48, but a block would split a 12-wide head unevenly
    odd_heads = ModelConfig(vocab_size=128, hidden_size=48, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=12,
                            ffn_hidden_size=96, quant=QuantConfig(mode="int8", block_size=8))
    with pytest.raises(ConfigError, match="cover whole heads or divide head_dim=12"):
        odd_heads.validate()


def with_params(cfg: ModelConfig, params: dict) -> nnx.Module:
    model = make_model(cfg)
    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def test_quantized_model_forward_equals_the_dequantized_weights():
    base = make_model(BASE, seed=1)
    for mode, block in (("fp8", 0), ("int8", 8)):
        qm = quantize_model(base, mode, block)
        assert qm.cfg.quant == QuantConfig(mode=mode, block_size=block)
        params = nnx.to_pure_dict(nnx.state(qm, nnx.Param))
        assert params["blocks"]["q"].dtype == quant.VALUE_DTYPES[mode]
        assert params["blocks"]["q_qscale"].dtype == jnp.float32
        plain = with_params(BASE, {**params, "blocks": quant.dequantize_blocks(params["blocks"], jnp.float32)})
        got = forward(qm, IDS)
        np.testing.assert_allclose(got, forward(plain, IDS), rtol=1e-5, atol=1e-5)
        assert float(jnp.max(jnp.abs(got - forward(base, IDS)))) > 1e-4  # it did change the weights


@pytest.fixture(scope="module")
def quantized_models():
    base = make_model(dataclasses.replace(BASE, scan_layers=True), seed=2)
    return {"fp8": quantize_model(base, "fp8"), "int8_b8": quantize_model(base, "int8", 8)}


@pytest.mark.parametrize("name,layout", [("fp8", "stacked"), ("fp8", "split_fused"), ("int8_b8", "split")])
def test_engine_decode_equals_the_quantized_full_forward(quantized_models, name, layout):
    """The engine's weight layouts transpose and fuse the scales with the values: one decode step
    per slot over prefilled caches gives the quantized model's own full-forward logits."""
    from nemojax.inference.forward import decode_one_token, engine_weights
    from nemojax.model.transformer import KVCache

    model = quantized_models[name]
    cfg = model.cfg
    rng = np.random.default_rng(1)
    lens = [5, 9]
    seqs = [rng.integers(4, 128, size=n + 1).tolist() for n in lens]
    k = jnp.zeros((cfg.num_layers, 2, 16, cfg.num_kv_heads, cfg.head_dim))
    v = jnp.zeros_like(k)
    for s, (seq, n) in enumerate(zip(seqs, lens)):
        _, pre = model.decode(jnp.asarray([seq[:n]]), jnp.arange(n)[None], KVCache.zeros(cfg, 1, n))
        k, v = k.at[:, s, :n].set(pre.k[:, 0]), v.at[:, s, :n].set(pre.v[:, 0])
    weights = engine_weights(model, "stacked" if layout == "stacked" else "split", fuse_qkv=layout == "split_fused")
    if layout != "stacked":
        assert weights["layers"][0][quant.scale_name("qkv" if layout == "split_fused" else "q")].ndim == 3
    logits, _, _ = jax.jit(lambda w, t, p, k, v: decode_one_token(cfg, w, t, p, k, v))(
        weights, jnp.asarray([seq[n] for seq, n in zip(seqs, lens)]), jnp.asarray(lens), k, v)
    for s, (seq, n) in enumerate(zip(seqs, lens)):
        np.testing.assert_allclose(np.asarray(logits[s]), np.asarray(forward(model, jnp.asarray([seq]))[0, n]),
                                   atol=1e-4)


def params_of(model: nnx.Module) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def assert_same_params(a: nnx.Module, b: nnx.Module) -> None:
    pa, pb = params_of(a), params_of(b)
    assert jax.tree.structure(pa) == jax.tree.structure(pb)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x.astype(jnp.float32)), np.asarray(y.astype(jnp.float32)))


def test_quantize_stream_releases_each_source_array():
    """Quantization at load keeps no full-precision projection once it is quantized (peak memory is
    the quantized model plus one parameter): a dropped source array is garbage at the next read."""
    import gc
    import weakref

    from nemojax.convert.quantize import quantize_stream

    src = params_of(make_model(BASE, seed=0))
    flat = [(tuple(k.key for k in p), np.array(x)) for p, x in jax.tree_util.tree_flatten_with_path(src)[0]]
    alive: list = []

    def items():
        for keys, arr in flat:
            ref = weakref.ref(arr)
            flat_idx = [i for i, (k, _) in enumerate(flat) if k == keys][0]
            flat[flat_idx] = (keys, None)
            yield keys, arr
            del arr
            if keys[0] == "blocks" and keys[1] in quant.QUANT_TARGETS:
                gc.collect()  # slow in a worker full of compiled programs: only where it is checked
                alive.append((keys, ref() is not None))

    out = quantize_stream(items(), QuantConfig(mode="int8"))
    assert len(alive) == 6 and not any(a for _, a in alive), alive
    assert out["blocks"]["up"].dtype == jnp.int8 and out["blocks"]["up_qscale"].shape == (2, 1, 64)


def test_quantize_at_load_and_saved_quantized_checkpoints(tmp_path, capsys):
    from nemojax.cli import main

    base = make_model(BASE, seed=3)
    save_model(base, BASE, tmp_path / "base")
    at_load = load_model(tmp_path / "base", quantize="fp8")
    assert_same_params(at_load, quantize_model(base, "fp8"))
    # saved once, loaded without the original: same weights, same config
    assert main(["convert", "quantize", str(tmp_path / "base"), str(tmp_path / "fp8"), "--mode", "fp8",
                 "--quiet"]) == 0
    saved = load_model(tmp_path / "fp8")
    assert saved.cfg.quant == QuantConfig(mode="fp8") and "mode: fp8" in (tmp_path / "fp8/config.yaml").read_text()
    assert_same_params(saved, at_load)
    assert load_model(tmp_path / "fp8", quantize="fp8").cfg.quant.mode == "fp8"  # same mode: as stored
    with pytest.raises(ConfigError, match=r"already quantized \(fp8, block_size 0\)"):
        load_model(tmp_path / "fp8", quantize="int8")
    assert main(["convert", "quantize", str(tmp_path / "base"), str(tmp_path / "bad"), "--mode", "int8",
                 "--block-size", "5", "--quiet"]) == 2  # a config error, like every command's
    assert "config error: model.quant.block_size=5 must divide" in capsys.readouterr().err
    assert main(["convert", "quantize", str(tmp_path / "base"), str(tmp_path / "fp8"), "--mode", "fp8",
                 "--quiet"]) == 2  # exists
    assert "already exists" in capsys.readouterr().err


@pytest.mark.heavy
def test_generate_quantized_at_load_equals_the_converted_checkpoint(tmp_path, capsys):
    """`generate --quantize int8` on a Hugging Face directory (quantized while streamed) and on the
    checkpoint `convert quantize` wrote from it produce the same tokens; bad options are one line."""
    from hf_tiny import save_tiny_hf

    from nemojax.cli import main

    _, hf = save_tiny_hf(tmp_path / "hf", seed=1, vocab_size=4096)
    assert main(["convert", "quantize", str(hf), str(tmp_path / "int8"), "--mode", "int8", "--quiet"]) == 0
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": p, "temperature": 0, "max_tokens": 6}) + "\n"
                           for i, p in enumerate(["The quick brown fox", "Once upon a time"])))

    def gen(ckpt, out, *extra):
        return main(["generate", "--checkpoint", str(ckpt), "--input", str(inp), "--output", str(out),
                     "--max-len", "64", "--batch-slots", "2", "--no-progress", *extra])

    assert gen(hf, tmp_path / "a.jsonl", "--quantize", "int8") == 0
    assert gen(tmp_path / "int8", tmp_path / "b.jsonl") == 0
    a, b = ([json.loads(l)["output_ids"] for l in (tmp_path / f).read_text().splitlines()] for f in ("a.jsonl", "b.jsonl"))
    assert a == b and all(len(x) == 6 for x in a)
    capsys.readouterr()
    assert gen(hf, tmp_path / "c.jsonl", "--quant-block-size", "16") == 2
    assert "--quant-block-size applies to --quantize" in capsys.readouterr().err
    assert gen(tmp_path / "int8", tmp_path / "c.jsonl", "--quantize", "fp8") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already quantized (int8" in err[0]


@pytest.mark.heavy
def test_eval_and_the_sdg_engine_client_quantize_at_load(tmp_path):
    """`nemojax eval --quantize` scores the quantized weights (its held-out loss is the quantized
    model's, not the checkpoint's); an SDG engine client with `quantize: fp8` serves fp8 weights."""
    from nemojax.config import ConfigError as CfgError
    from nemojax.evaluation.runner import EvalSpec, evaluate_model
    from nemojax.evaluation.suites import loss_suite
    from nemojax.data.tokenizer import load_tokenizer
    from nemojax.sdg.clients import make_engine
    from nemojax.sdg.config import ClientConfig

    cfg = dataclasses.replace(BASE, vocab_size=4096)
    save_model(make_model(cfg, seed=5), cfg, tmp_path / "base")
    rows = tmp_path / "val.jsonl"
    rows.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Compute {i} + {i}."},
                                                     {"role": "assistant", "content": f"The answer is {2 * i}."}]})
                            + "\n" for i in range(4)))
    spec = EvalSpec(suites={"loss": str(rows)}, checkpoint=str(tmp_path / "base"), max_len=64, quantize="int8")
    got = evaluate_model(spec)["suites"]["loss"]["score"]
    tok = load_tokenizer("builtin")
    records = [json.loads(x) for x in rows.read_text().splitlines()]
    want = loss_suite(quantize_model(load_model(tmp_path / "base"), "int8"), tok, records, seq_len=64).score
    plain = loss_suite(load_model(tmp_path / "base"), tok, records, seq_len=64).score
    assert got == pytest.approx(want, abs=1e-6) and got != pytest.approx(plain, abs=1e-6)

    client = ClientConfig(checkpoint=str(tmp_path / "base"), quantize="fp8", max_slots=1, max_len=32,
                          program_cache=False)
    client.validate("clients.gen")
    engine, _ = make_engine(client)
    assert engine.cfg.quant == QuantConfig(mode="fp8") and engine.weights["layers"][0]["up"].dtype == jnp.float8_e4m3fn
    with pytest.raises(CfgError, match="quantize='nf4'"):
        ClientConfig(checkpoint="x", quantize="nf4").validate("clients.gen")


def test_scales_shard_like_the_output_dims_and_tensor_parallel_decode_matches(quantized_models):
    """Placed by logical-axis rules over a 2-device tensor axis, the values shard like the float
    weights and the scales like their output dims; the sharded engine layout decodes the same logits."""
    from jax.sharding import Mesh, NamedSharding

    from nemojax.inference.forward import decode_one_token, engine_weights
    from nemojax.model.axes import logical_to_spec
    from nemojax.model.transformer import logical_axes

    model = quantized_models["fp8"]
    cfg = model.cfg
    mesh = Mesh(np.array(jax.devices()[:2]), ("tensor",))
    rules = {"heads": ("tensor",), "kv_heads": ("tensor",), "mlp": ("tensor",), "vocab": ("tensor",)}
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    axes = jax.tree.leaves(logical_axes(model), is_leaf=lambda x: isinstance(x, tuple))
    placed = [jax.device_put(x, NamedSharding(mesh, logical_to_spec(a, rules, mesh))) for x, a in zip(leaves, axes)]
    sharded = nnx.merge(graphdef, jax.tree.unflatten(treedef, placed))
    up_scale = sharded.blocks.up_qscale[...]
    assert up_scale.sharding.spec == logical_to_spec(("layers", "quant_block", "mlp"), rules, mesh)
    assert up_scale.addressable_shards[0].data.shape == (cfg.num_layers, 1, cfg.ffn_hidden_size // 2)
    weights = engine_weights(sharded, "split")
    toks, pos = jnp.asarray([7, 9]), jnp.asarray([0, 0])
    k = jnp.zeros((cfg.num_layers, 2, 16, cfg.num_kv_heads, cfg.head_dim))
    got = jax.jit(lambda w, t, p, k, v: decode_one_token(cfg, w, t, p, k, v))(weights, toks, pos, k, k)[0]
    want = forward(model, toks[:, None])[:, 0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4)
