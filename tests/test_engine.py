"""The sampling engine against references nobody here wrote (HF generate) and the model's forward.

One tiny random HF Nemotron (GQA, partial RoPE) is converted once; one 3-slot engine is shared
by the tests so its compiled programs are reused (compile time dominates). Its prefill chunk is
16 tokens, so every prompt longer than 17 tokens is prefilled over several chunks, and its
prefix cache works in 4-token blocks.
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
from nemojax.inference.forward import LAYOUTS, decode_one_token, engine_weights
from nemojax.model import KVCache, logical_axes

MAX_LEN = 64
PROMPT_LENS = [1, 2, 4, 7, 11, 16, 23, 30]
MAX_TOKENS = [20, 9, 15, 30, 12, 25, 18, 33]


class ToyTokenizer:
    """One letter per token id, so stop-string positions map exactly onto tokens."""

    eos_id = 3

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
                  min_bucket=16, prefill_chunk=16, min_window=32, block_size=4, tokenizer=ToyTokenizer())


def prompts(seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(4, 128, size=n).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def forward(models):
    return jax.jit(models[1].__call__)  # right padding cannot change causal logits


def full_logprobs(forward, seq: list[int]) -> np.ndarray:
    return np.asarray(jax.nn.log_softmax(forward(jnp.asarray([seq + [0] * (MAX_LEN - len(seq))]))[0], axis=-1))


def test_greedy_equals_hf_generate_in_one_continuous_batch(models, engine, forward):
    hf, model = models
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
        full = full_logprobs(forward, req.prompt_ids + out.output_ids)
        n = len(req.prompt_ids)
        want = [float(full[n - 1 + t, tok]) for t, tok in enumerate(out.output_ids)]
        np.testing.assert_allclose(out.logprobs, want, atol=1e-4)
    assert engine.stats["prefill_calls"] > 0


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
    weights = engine_weights(model, "stacked" if layout == "stacked" else "split", fuse_qkv=layout == "split_fused")
    step = jax.jit(lambda w, t, pos, k, v: decode_one_token(cfg, w, t, pos, k, v))
    ck, cv = cache
    fulls = [model(jnp.asarray([seq]))[0] for seq in seqs]  # causal: prefix logits = prefix rows
    for j in range(3):
        toks = jnp.asarray([seq[n + j] for seq, n in zip(seqs, lens)])
        pos = jnp.asarray([n + j for n in lens])
        logits, ck, cv = step(weights, toks, pos, ck, cv)
        for s, (seq, n) in enumerate(zip(seqs, lens)):
            np.testing.assert_allclose(np.asarray(logits[s]), np.asarray(fulls[s][n + j]), atol=1e-4)


def test_new_requests_join_free_slots_without_recompiling(engine):
    # Warm every shape this test uses first (sampled requests: the sampling decode programs).
    warm = [Request(f"w{i}", p, SamplingParams(temperature=0.7, seed=i, max_tokens=m))
            for i, (p, m) in enumerate(zip(prompts(5), MAX_TOKENS))]
    engine.generate_all(warm)
    compiled = engine.compile_counts()
    assert compiled["decode"] <= 2 * len(engine.window_buckets)  # greedy and sampling variants
    # A second wave with different lengths, sampling settings and finishing times.
    wave = [Request(f"x{i}", p, SamplingParams(temperature=0.5 + 0.1 * i, top_k=i, top_p=0.9,
                                               min_p=0.01 * i, seed=i, max_tokens=m))
            for i, (p, m) in enumerate(zip(prompts(6), reversed(MAX_TOKENS)))]
    outs = engine.generate_all(wave)
    assert [len(o.output_ids) for o in outs if o.finish_reason == "length"] == \
        [m for o, m in zip(outs, reversed(MAX_TOKENS)) if o.finish_reason == "length"]
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


def test_prefix_sharing_and_forks_match_unshared_runs(engine):
    """n samples of a prompt prefill once; prompts sharing a template reuse its blocks; outputs
    (greedy and seeded) are exactly those of an engine that computes every prompt in full."""
    rng = np.random.default_rng(12)
    template = rng.integers(4, 128, size=26).tolist()
    reqs = [Request(f"p{i}", template + rng.integers(4, 128, size=3 + i).tolist(),
                    SamplingParams(temperature=0 if i % 2 else 0.8, seed=i, max_tokens=10, n=3, logprobs=True))
            for i in range(4)]
    engine.share_prefixes = False
    try:
        before = engine.stats["prefill_tokens"]
        plain = engine.generate_all(reqs)
        plain_prefill = engine.stats["prefill_tokens"] - before
    finally:
        engine.share_prefixes = True
    engine.prefix_cache.clear()
    before = engine.stats["prefill_tokens"]
    shared = engine.generate_all(reqs)
    shared_prefill = engine.stats["prefill_tokens"] - before
    assert [c.output_ids for c in shared] == [c.output_ids for c in plain]
    for a, b in zip(shared, plain):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    assert [c.cached_tokens for c in plain] == [0] * 12
    # forks reuse their first sample's whole prompt; later prompts reuse the template's full blocks
    assert all(c.cached_tokens == len(r.prompt_ids) - 1 for r in reqs for c in shared
               if c.request_id == r.id and c.sample_index > 0 and c.cached_tokens)
    assert sum(c.cached_tokens >= 24 for c in shared if c.sample_index == 0) >= 2
    assert shared_prefill < plain_prefill / 2, (shared_prefill, plain_prefill)


def test_prompt_logprobs_and_top_logprobs_equal_the_full_forward(engine, forward):
    prompt = prompts(13)[7]  # 30 tokens: two prefill chunks
    [c] = engine.generate_all([Request("lp", prompt, SamplingParams(
        temperature=0, max_tokens=6, logprobs=True, top_logprobs=5, prompt_logprobs=True))])
    full = full_logprobs(forward, prompt + c.output_ids)
    assert c.prompt_logprobs[0] is None and c.prompt_top_logprobs[0] is None
    np.testing.assert_allclose(c.prompt_logprobs[1:], [full[i - 1, t] for i, t in enumerate(prompt) if i],
                               atol=1e-4)
    for i in range(1, len(prompt)):
        top = c.prompt_top_logprobs[i]
        assert [t for t, _ in top] == list(np.argsort(-full[i - 1])[:5])
        np.testing.assert_allclose([v for _, v in top], np.sort(full[i - 1])[::-1][:5], atol=1e-4)
    n = len(prompt)
    for t, top in enumerate(c.top_logprobs):
        assert top[0][0] == c.output_ids[t]  # greedy: the chosen token is the most likely
        np.testing.assert_allclose([v for _, v in top], np.sort(full[n - 1 + t])[::-1][:5], atol=1e-4)
    # max_tokens=0 scores the prompt without generating
    [s] = engine.generate_all([Request("score", prompt, SamplingParams(max_tokens=0, prompt_logprobs=True))])
    assert s.output_ids == [] and s.finish_reason == "length"
    np.testing.assert_allclose(s.prompt_logprobs[1:], c.prompt_logprobs[1:], atol=1e-6)


def test_long_prompt_is_prefilled_in_chunks_while_others_keep_decoding(engine):
    # a running sample that does not stop by itself meanwhile (greedy: checked first)
    candidates = [Request(f"c{i}", p, SamplingParams(temperature=0, max_tokens=30)) for i, p in enumerate(prompts(14))]
    runs = engine.generate_all(candidates[:3])
    pick = next(r for r, c in zip(candidates, runs) if c.finish_reason == "length")
    engine.submit(Request("short", pick.prompt_ids, pick.params))
    engine.step()
    engine.take_deltas()
    long = Request("long", (prompts(14)[7] * 2)[:60], SamplingParams(temperature=0, max_tokens=3))
    engine.submit(long)
    calls = engine.stats["prefill_calls"]
    grew = []
    while engine.has_work:
        before = {rid: len(ids) for rid, _, ids in engine.in_flight()}
        done = engine.step()
        after = {rid: len(ids) for rid, _, ids in engine.in_flight()}
        after.update({c.request_id: c.completion_tokens for c in done})
        if "short" in before:
            grew.append(after["short"] > before["short"])
        if engine.stats["prefill_calls"] - calls >= 4:  # 59 prompt rows / 16-token chunks
            break
    assert grew and all(grew), grew  # no step stalled the running sample
    list(engine.generate([]))  # drain


def test_stop_strings_stop_tokens_length_and_streaming_deltas(engine):
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
    # Streaming: one delta per kept token, in order, released before the completion; their
    # texts add up to the final text and never include the stop string.
    engine.submit(Request("st", prompt, SamplingParams(temperature=0, max_tokens=20, stop=[stop],
                                                       logprobs=True), stream=True))
    deltas, done = [], []
    while engine.has_work:
        finished = engine.step()
        deltas += engine.take_deltas()
        if finished:
            assert len(deltas) == len(finished[0].output_ids)  # all deltas came first
        done += finished
    [c] = done
    assert [d.token_id for d in deltas] == c.output_ids == ids[:cut]
    assert "".join(d.text for d in deltas) == c.text == text[:cut]
    assert [d.logprob for d in deltas] == c.logprobs


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


def test_cancel_frees_slots_and_drops_every_sample(engine):
    engine.submit(Request("gone", prompts(15)[6], SamplingParams(temperature=1.0, max_tokens=40, n=3)))
    engine.step()
    assert {rid for rid, _, _ in engine.in_flight()} == {"gone"}
    assert engine.cancel("gone") == 3
    assert not engine.has_work and engine.free_slots() == 3
    [ok] = engine.generate_all([Request("after", [5, 6], SamplingParams(temperature=0, max_tokens=2))])
    assert ok.completion_tokens == 2


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
    tp = Engine(sharded, max_slots=3, max_len=MAX_LEN, decode_steps=4, max_prefill_batch=2, min_bucket=16,
                prefill_chunk=16, min_window=32, block_size=4)
    assert tp.decode_layout == "split"
    q0 = tp.weights["layers"][0]["q"]  # [heads, head_dim, embed]: heads stay sharded
    assert q0.addressable_shards[0].data.shape[0] == model.cfg.num_heads // 2
    k = tp.cache["k"]
    assert k.sharding.spec == P(None, None, None, "tensor", None)
    assert k.addressable_shards[0].data.shape[3] == model.cfg.num_kv_heads // 2
    reqs = [Request(i, p, SamplingParams(temperature=0 if i % 2 else 0.8, seed=i, max_tokens=10,
                                         logprobs=True, n=1 + i % 2))
            for i, p in enumerate(prompts(11)[3:8])]
    want = engine.generate_all(reqs)
    got = tp.generate_all(reqs)
    assert [g.output_ids for g in got] == [w.output_ids for w in want]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-4)
    assert tp.cache["k"].sharding.is_equivalent_to(tp.cache_sharding, 5)  # still sharded after decode
