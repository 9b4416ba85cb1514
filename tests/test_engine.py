"""The sampling engine against references nobody here wrote (HF generate) and the model's forward.

One tiny random HF Nemotron (GQA, partial RoPE) is converted once; one 3-slot engine is shared
by the tests so its compiled prefill/decode functions are reused (compile time dominates).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_tiny import save_tiny_hf
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nemojax.checkpoint import load_model
from nemojax.inference import Engine, Request, SamplingParams
from nemojax.inference.decode import LAYOUTS, decode_one_token, split_weights
from nemojax.model import KVCache, logical_axes

MAX_LEN = 64
PROMPT_LENS = [1, 2, 4, 7, 11, 16, 23, 30]
MAX_TOKENS = [20, 9, 15, 30, 12, 25, 18, 33]


class ToyTokenizer:
    """One letter per token id, so stop-string positions map exactly onto tokens."""

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf, path = save_tiny_hf(tmp_path_factory.mktemp("hf") / "tiny", seed=3)
    model = load_model(path, progress=False)
    return hf, model


@pytest.fixture(scope="module")
def engine(models):
    return Engine(models[1], max_slots=3, max_len=MAX_LEN, decode_steps=4, max_prefill_batch=2,
                  min_bucket=32, tokenizer=ToyTokenizer())


def prompts(seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(4, 128, size=n).tolist() for n in PROMPT_LENS]


def test_greedy_equals_hf_generate_in_one_continuous_batch(models, engine):
    hf, model = models
    forward = jax.jit(model.__call__)  # right padding cannot change causal logits
    reqs = [Request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=m, logprobs=True))
            for i, (p, m) in enumerate(zip(prompts(), MAX_TOKENS))]
    outs = engine.generate_all(reqs)  # 8 requests through 3 slots: slots are reused
    assert len(outs) == 8
    for req, out in zip(reqs, outs):
        ids = torch.tensor([req.prompt_ids])
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=req.params.max_tokens, eos_token_id=3, pad_token_id=0)
        ref = ref[0, len(req.prompt_ids):].tolist()
        if 3 in ref:  # HF keeps eos in its output; the engine reports finish_reason "stop"
            ref = ref[:ref.index(3)]
            assert out.finish_reason == "stop"
        else:
            assert out.finish_reason == "length"
        assert out.output_ids == ref, f"{req.id}: {out.output_ids} != HF {ref}"
        assert out.prompt_tokens == len(req.prompt_ids)
        # The cached path's log-probs equal the full (uncached) forward's within 1e-4.
        seq = req.prompt_ids + out.output_ids
        full = jax.nn.log_softmax(forward(jnp.asarray([seq + [0] * (MAX_LEN - len(seq))]))[0], axis=-1)
        n = len(req.prompt_ids)
        want = [float(full[n - 1 + t, tok]) for t, tok in enumerate(out.output_ids)]
        np.testing.assert_allclose(out.logprobs, want, atol=1e-4)


@pytest.mark.parametrize("layout", [*LAYOUTS, "split_fused"])
def test_decode_step_logits_equal_full_forward(models, layout):
    """decode_one_token (both weight layouts) over a cache with stale garbage past the live rows."""
    _, model = models
    cfg = model.cfg
    rng = np.random.default_rng(1)
    lens = [5, 12]
    seqs = [rng.integers(4, 128, size=n + 3).tolist() for n in lens]
    S, W = 2, 32
    cache = KVCache(jnp.asarray(rng.normal(size=(cfg.num_layers, S, W, cfg.num_kv_heads, cfg.head_dim)),
                                jnp.float32), jnp.zeros((cfg.num_layers, S, W, cfg.num_kv_heads, cfg.head_dim)))
    # prefill each prompt with the model's own cached forward, then 3 one-token steps
    for s, (seq, n) in enumerate(zip(seqs, lens)):
        pre = KVCache.zeros(cfg, 1, n)
        _, pre = model.decode(jnp.asarray([seq[:n]]), jnp.arange(n)[None], pre)
        cache = KVCache(cache.k.at[:, s, :n].set(pre.k[:, 0]), cache.v.at[:, s, :n].set(pre.v[:, 0]))
    graphdef = nnx.graphdef(model)
    weights = None if layout == "stacked" else split_weights(model, fuse_qkv=layout == "split_fused")
    step = jax.jit(lambda p, w, t, pos, k, v: decode_one_token(nnx.merge(graphdef, p), t, pos, k, v, w))
    ck, cv = cache
    fulls = [model(jnp.asarray([seq]))[0] for seq in seqs]  # causal: prefix logits = prefix rows
    for j in range(3):
        toks = jnp.asarray([seq[n + j] for seq, n in zip(seqs, lens)])
        pos = jnp.asarray([n + j for n in lens])
        logits, ck, cv = step(nnx.state(model), weights, toks, pos, ck, cv)
        for s, (seq, n) in enumerate(zip(seqs, lens)):
            full = fulls[s][n + j]
            np.testing.assert_allclose(np.asarray(logits[s]), np.asarray(full), atol=1e-4)


def test_new_requests_join_free_slots_without_recompiling(engine):
    # The HF test above ran the same buckets; warm every shape this test uses first.
    warm = [Request(f"w{i}", p, SamplingParams(temperature=0, max_tokens=m))
            for i, (p, m) in enumerate(zip(prompts(5), MAX_TOKENS))]
    engine.generate_all(warm)
    before = dict(engine.trace_counts)
    assert all(v == 1 for v in before.values()), before  # each shape traced exactly once
    compiled = engine.compile_counts()  # jit's executable cache: catches retrace-free recompiles
    assert compiled == {"prefill": sum(k.startswith("prefill") for k in before),
                        "decode": sum(k.startswith("decode") for k in before)}, (compiled, before)
    assert sum(k.startswith("decode") for k in before) <= len(engine.len_buckets)
    # A second wave with different lengths, sampling settings and finishing times.
    wave = [Request(f"x{i}", p, SamplingParams(temperature=0.5 + 0.1 * i, top_k=i, top_p=0.9,
                                               min_p=0.01 * i, seed=i, max_tokens=m))
            for i, (p, m) in enumerate(zip(prompts(6), reversed(MAX_TOKENS)))]
    outs = engine.generate_all(wave)
    assert [len(o.output_ids) for o in outs if o.finish_reason == "length"] == \
        [m for o, m in zip(outs, reversed(MAX_TOKENS)) if o.finish_reason == "length"]
    assert dict(engine.trace_counts) == before
    assert engine.compile_counts() == compiled


def test_seed_reproduces_whatever_the_slot_and_batch(engine):
    params = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=1234, max_tokens=12)
    target = Request("t", prompts(7)[4], params)
    alone = engine.generate_all([target])[0]
    others = [Request(f"o{i}", p, SamplingParams(temperature=1.0, seed=i, max_tokens=3 + i))
              for i, p in enumerate(prompts(8)[:4])]
    mixed = {c.request_id: c for c in engine.generate_all(others + [target])}["t"]
    assert mixed.output_ids == alone.output_ids
    # n samples: distinct draws; sample 0 is the n=1 draw (same seed, sample index 0)
    multi = engine.generate_all([Request("m", target.prompt_ids, SamplingParams(
        temperature=0.9, top_k=50, top_p=0.95, seed=1234, max_tokens=12, n=3))])
    assert [c.sample_index for c in multi] == [0, 1, 2]
    assert multi[0].output_ids == alone.output_ids
    assert len({tuple(c.output_ids) for c in multi}) == 3


def test_stop_strings_stop_tokens_and_length(engine):
    prompt = prompts(9)[5]
    base = engine.generate_all([Request("b", prompt, SamplingParams(temperature=0, max_tokens=20))])[0]
    ids, text = base.output_ids, base.text
    assert text == ToyTokenizer().decode(ids) and len(ids) >= 10
    stop = text[6:8]
    cut = text.find(stop)
    got = engine.generate_all([Request("s", prompt, SamplingParams(temperature=0, max_tokens=20,
                                                                   stop=["zzzz", stop]))])[0]
    assert (got.text, got.output_ids, got.finish_reason) == (text[:cut], ids[:cut], "stop")
    first = ids.index(ids[4])
    got = engine.generate_all([Request("t", prompt, SamplingParams(temperature=0, max_tokens=20,
                                                                   stop_token_ids=[ids[4]]))])[0]
    assert (got.output_ids, got.finish_reason) == (ids[:first], "stop")
    got = engine.generate_all([Request("l", prompt, SamplingParams(temperature=0, max_tokens=5))])[0]
    assert (got.output_ids, got.finish_reason) == (ids[:5], "length")
    # the cache bounds prompt + completion: 60-token prompt, 64-row cache -> 4 tokens, "length"
    long = engine.generate_all([Request("c", prompts(10)[0] * 60, SamplingParams(temperature=0,
                                                                                  max_tokens=50))])[0]
    assert (len(long.output_ids) == 4 or long.finish_reason == "stop")


def test_bad_requests_raise_or_are_reported(engine):
    with pytest.raises(ValueError, match="max_len"):
        list(engine.generate([Request("big", [5] * MAX_LEN)]))
    with pytest.raises(ValueError, match="vocabulary"):
        list(engine.generate([Request("v", [5, 100000])]))
    errors = []
    outs = list(engine.generate([Request("big", [5] * MAX_LEN),
                                 Request("ok", [5, 6], SamplingParams(temperature=0, max_tokens=2))],
                                on_error=lambda r, e: errors.append(r.id)))
    assert errors == ["big"] and [o.request_id for o in outs] == ["ok"]


def _shard_tensor_parallel(model, mesh):
    """heads / kv_heads / mlp / vocab dims over `tensor` (Megatron-style), the rest replicated."""
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    axes = jax.tree.leaves(logical_axes(model), is_leaf=lambda x: isinstance(x, tuple))
    tp = {"heads", "kv_heads", "mlp", "vocab"}
    placed = [jax.device_put(x, NamedSharding(mesh, P(*[("tensor" if a in tp else None) for a in ax])))
              for x, ax in zip(leaves, axes)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, placed))


def test_tensor_parallel_engine_matches_unsharded(models, engine):
    _, model = models
    mesh = Mesh(np.array(jax.devices()[:2]), ("tensor",))
    sharded = _shard_tensor_parallel(model, mesh)
    tp = Engine(sharded, max_slots=3, max_len=MAX_LEN, decode_steps=4, max_prefill_batch=2, min_bucket=32)
    assert tp.decode_layout == "split"
    q0 = tp.decode_weights["layers"][0]["q"]  # [heads, head_dim, embed]: heads stay sharded
    assert q0.addressable_shards[0].data.shape[0] == model.cfg.num_heads // 2
    k = tp.state["k"]
    assert k.sharding.spec == P(None, None, None, "tensor", None)
    assert k.addressable_shards[0].data.shape[3] == model.cfg.num_kv_heads // 2
    reqs = [Request(i, p, SamplingParams(temperature=0 if i % 2 else 0.8, seed=i, max_tokens=10,
                                         logprobs=True))
            for i, p in enumerate(prompts(11)[3:8])]
    want = engine.generate_all(reqs)
    got = tp.generate_all(reqs)
    assert [g.output_ids for g in got] == [w.output_ids for w in want]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-4)
    assert tp.state["k"].sharding.is_equivalent_to(tp.cache_sharding, 5)  # still sharded after decode
