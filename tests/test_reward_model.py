"""The reward model (head on the last token, weights, checkpoints, init from a base) and RewardScorer."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nemojax
from nemojax.checkpoint import CheckpointError, load_base_params, save_model
from nemojax.config import ConfigError, ModelConfig, RewardConfig, load_config
from nemojax.data.chat import encode_reward_input
from nemojax.data.chat_template import ChatFormatError
from nemojax.data.tokenizer import load_tokenizer
from nemojax.inference.reward import RewardScorer, length_buckets
from nemojax.model.reward import NemotronRewardModel, make_model
from nemojax.model.transformer import NemotronLM, logical_axes

TOK = load_tokenizer("builtin")
BASE = ModelConfig(vocab_size=4096, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                   ffn_hidden_size=128, init_std=0.05, max_seq_len=128, scan_layers=False)
RCFG = dataclasses.replace(BASE, reward=RewardConfig(enabled=True))
CONVS = [
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello there, how are you today?"},
     {"role": "assistant", "content": "Fine, thanks for asking! " * 3}],
    [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
]


@pytest.fixture(scope="module")
def reward_model() -> NemotronRewardModel:
    model = make_model(RCFG, seed=3)
    # A non-zero bias so tests see it is applied.
    model.reward_head.bias[...] = jnp.arange(5, dtype=jnp.float32) * 0.1
    return model


def test_every_param_has_logical_axes_and_there_is_no_lm_head(reward_model) -> None:
    axes = logical_axes(reward_model)
    state = nnx.to_pure_dict(nnx.state(reward_model, nnx.Param))
    assert "lm_head" not in state
    assert axes["reward_head"]["kernel"] == ("embed", None) and axes["reward_head"]["bias"] == (None,)
    assert state["reward_head"]["kernel"].shape == (64, 5)
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        ax = axes
        for k in path:
            ax = ax[k.key]
        assert len(ax) == leaf.ndim, path


def test_scores_come_from_the_last_token_with_bias(reward_model) -> None:
    ids = jnp.asarray([[2, 17, 99, 5, 6, 0, 0], [2, 40, 41, 42, 43, 44, 45]], jnp.int32)
    mask = jnp.asarray([[1, 1, 1, 1, 1, 0, 0], [1] * 7], jnp.int32)
    scores = reward_model(ids, attention_mask=mask)
    assert scores.shape == (2, 5) and scores.dtype == jnp.float32
    h, _ = reward_model.hidden(ids, segment_ids=mask)
    k, b = reward_model.reward_head.kernel[...], reward_model.reward_head.bias[...]
    np.testing.assert_allclose(scores[0], h[0, 4] @ k + b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores[1], h[1, 6] @ k + b, rtol=1e-5, atol=1e-6)
    # Padding after the last token changes nothing; the unpadded row alone gives the same scores.
    other = ids.at[0, 5:].set(jnp.asarray([77, 78]))
    np.testing.assert_allclose(reward_model(other, attention_mask=mask)[0], scores[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(reward_model(ids[:1, :5])[0], scores[0], rtol=1e-5, atol=1e-6)


def test_default_weights_are_nemotron4_340b_reward_and_nine_outputs_fit() -> None:
    scores = jnp.asarray([[1.0, 2.0, 3.0, 4.0, 5.0]])
    model_cfg = RCFG
    expected = 0.3 * 1 + 0.74 * 2 + 0.46 * 3 + 0.47 * 4 - 0.33 * 5
    from nemojax.model.reward import aggregate

    assert float(aggregate(scores, model_cfg)[0]) == pytest.approx(expected, rel=1e-6)
    nine = RewardConfig(enabled=True, attributes=["quality", "toxicity", "humor", "creativity", "helpfulness",
                                                  "correctness", "coherence", "complexity", "verbosity"])
    assert nine.weight_vector() == [0, 0, 0, 0, 0.3, 0.74, 0.46, 0.47, -0.33]
    cfg = load_config("configs/models/tiny.yaml", ["model.reward.enabled=true",
                                                   "model.reward.attributes=[a, b]", "model.reward.weights={a: 2}"])
    assert cfg.model.reward.weight_vector() == [2.0, 0.0]
    with pytest.raises(ConfigError, match="model.reward.weights"):
        load_config("configs/models/tiny.yaml", ["model.reward.attributes=[a, b]"])  # default weights name others


def test_save_and_nemojax_load_round_trip(reward_model, tmp_path) -> None:
    save_model(reward_model, RCFG, tmp_path / "rm")
    loaded = nemojax.load(str(tmp_path / "rm"))
    assert isinstance(loaded, NemotronRewardModel) and loaded.attributes == list(RCFG.reward.attributes)
    ids = jnp.asarray([[2, 5, 6, 7]], jnp.int32)
    np.testing.assert_array_equal(loaded(ids), reward_model(ids))
    # A reward checkpoint read as a language model fails with a message naming the cause.
    (tmp_path / "rm" / "config.yaml").write_text(
        (tmp_path / "rm" / "config.yaml").read_text().replace("enabled: true", "enabled: false"))
    with pytest.raises(CheckpointError, match="reward_head"):
        nemojax.load(str(tmp_path / "rm"))


def test_init_from_a_language_model_checkpoint_copies_the_trunk(tmp_path) -> None:
    lm = make_model(BASE, seed=7)
    save_model(lm, BASE, tmp_path / "lm")
    params, missing = load_base_params(tmp_path / "lm", RCFG)
    assert sorted(missing) == ["reward_head.bias", "reward_head.kernel"]
    rm = make_model(RCFG, seed=0)
    state = nnx.state(rm, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(rm, state)
    ids = jnp.asarray([[2, 9, 10, 11, 12]], jnp.int32)
    np.testing.assert_array_equal(rm.hidden(ids)[0], lm.hidden(ids)[0])
    # Incompatible shapes are refused by name.
    with pytest.raises(CheckpointError, match="embed"):
        load_base_params(tmp_path / "lm", dataclasses.replace(RCFG, vocab_size=5000))


def test_init_from_a_hugging_face_base(tmp_path) -> None:
    pytest.importorskip("transformers")
    from hf_tiny import save_tiny_hf

    save_tiny_hf(tmp_path / "hf", seed=1)
    lm = nemojax.load(str(tmp_path / "hf"), progress=False)
    cfg = dataclasses.replace(lm.cfg, reward=RewardConfig(enabled=True, attributes=["a", "b", "c"], weights={"a": 1}))
    params, missing = load_base_params(tmp_path / "hf", cfg, progress=False)
    assert sorted(missing) == ["reward_head.bias", "reward_head.kernel"]
    np.testing.assert_array_equal(params["blocks"]["q"], lm.blocks.q[...])
    np.testing.assert_array_equal(params["embed"], lm.embed[...])


def test_scorer_matches_the_model_keeps_order_and_compiles_once_per_bucket(reward_model) -> None:
    scorer = RewardScorer(reward_model, TOK, batch_size=2, max_len=64)
    assert scorer.buckets == [32, 64] and length_buckets(100) == [32, 64, 100]
    out = scorer.score(CONVS)
    assert [list(d) for d in out] == [scorer.attributes + ["reward"]] * 3
    # The model's own call on one right-padded batch is the reference.
    seqs = [encode_reward_input(TOK, conv) for conv in CONVS]
    ids, mask = np.zeros((3, 64), np.int32), np.zeros((3, 64), np.int32)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    direct = np.asarray(reward_model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    for d, want in zip(out, direct):
        np.testing.assert_allclose([d[a] for a in scorer.attributes], want, rtol=2e-5, atol=2e-5)
        assert d["reward"] == pytest.approx(float(np.dot(RCFG.reward.weight_vector(), want)), abs=1e-4)
    again = scorer.score(CONVS[::-1])  # new order, same results: batching does not leak between rows
    for a, b in zip(again[::-1], out):
        assert a == pytest.approx(b, abs=1e-5)
    assert all(v == 1 for v in scorer.compile_counts().values())
    json.dumps(out)  # plain floats


def test_scorer_truncates_from_the_left_and_rejects_bad_conversations(reward_model) -> None:
    scorer = RewardScorer(reward_model, TOK, batch_size=2, max_len=32)
    long_conv = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "short"}]
    ids, cut = scorer.encode(long_conv)
    full = encode_reward_input(TOK, long_conv)
    assert cut and len(ids) == 32 and ids[0] == TOK.bos_id and ids[1:] == full[-31:]
    scorer.score([long_conv])
    assert scorer.stats["truncated"] == 1
    scorer.score([long_conv, CONVS[0], long_conv])  # counted per conversation, across calls
    assert scorer.stats["truncated"] == 3
    exact = scorer.encode(long_conv)[0]  # exactly max_len tokens: scored whole, not truncated
    fit = RewardScorer(reward_model, TOK, batch_size=2, max_len=len(encode_reward_input(TOK, CONVS[1])))
    assert fit.encode(CONVS[1]) == (encode_reward_input(TOK, CONVS[1]), False) and len(exact) == 32
    with pytest.raises(ChatFormatError, match=r"conversations\[1\].*assistant"):
        scorer.score([CONVS[0], [{"role": "user", "content": "no answer"}]])
    with pytest.raises(ValueError, match="language model"):
        RewardScorer(make_model(BASE), TOK)


def test_last_true_and_the_scored_position_without_a_mask(reward_model) -> None:
    """Which token is scored when the caller gives no `last_index`: the last 1 of the mask, the
    last segment id > 0, or (no mask at all) the last position; a row with no real token reads
    its last position. Guards `seq - 1` / `[:, ::-1]` slips in `last_true` and the fallbacks."""
    from nemojax.model.reward import last_true
    mask = jnp.asarray([[1, 1, 0, 0], [0, 1, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0]], bool)
    assert np.asarray(last_true(mask)).tolist() == [1, 3, 3, 2] and last_true(mask).dtype == jnp.int32
    ids = jnp.asarray([[2, 17, 99, 5, 6]], jnp.int32)
    h, _ = reward_model.hidden(ids)
    want = np.asarray(reward_model.reward_head(h[:, 4]))
    np.testing.assert_allclose(reward_model(ids), want, rtol=1e-5, atol=1e-6)
    seg = jnp.asarray([[1, 1, 1, 0, 0]], jnp.int32)
    h, _ = reward_model.hidden(ids, segment_ids=seg)
    np.testing.assert_allclose(reward_model(ids, segment_ids=seg), reward_model.reward_head(h[:, 2]),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(reward_model.reward(jnp.ones((1, 5))),
                               [sum(RCFG.reward.weight_vector())], rtol=1e-6)


def test_scorer_arguments_buckets_and_counters(reward_model) -> None:
    """RewardScorer's refusals name the value to fix; the bucket bounds are inclusive; `stats`
    counts what was scored. Guards moved bounds (`< 1`, `2 <=`, `b >= length`), dropped
    messages and counters."""
    assert length_buckets(32) == [32] and length_buckets(33) == [32, 33] and length_buckets(64, 16) == [16, 32, 64]
    with pytest.raises(ValueError) as e:
        RewardScorer(reward_model, TOK, batch_size=0)
    assert str(e.value) == "batch_size must be >= 1, got 0"
    for bad in (1, 129):
        with pytest.raises(ValueError) as e:
            RewardScorer(reward_model, TOK, max_len=bad)
        assert str(e.value) == f"max_len={bad} must be in [2, model.max_seq_len=128]"
    assert RewardScorer(reward_model, TOK, max_len=2).max_len == 2
    assert RewardScorer(reward_model, TOK).max_len == 128
    scorer = RewardScorer(reward_model, TOK, batch_size=2, max_len=64)
    assert scorer.score([]) == [] and scorer.score_ids([]).shape == (0, 5)
    for lengths in ([0, 3], [3, 65]):
        with pytest.raises(ValueError) as e:
            scorer.score_ids([[7] * n for n in lengths])
        assert str(e.value) == f"token sequences must have 1..64 tokens, got lengths {min(lengths)}..{max(lengths)}"
    seqs = [[2] + [40] * 31, [2] + [41] * 32, [2, 5], [9]]  # 32 tokens fit bucket 32; 33 need 64; 1 is legal
    got = scorer.score_ids(seqs)
    assert got.dtype == np.float32
    assert scorer.compile_counts() == {32: 1, 64: 1} and scorer.stats == {"scored": 4, "truncated": 0}
    ids, mask = np.zeros((4, 33), np.int32), np.zeros((4, 33), np.int32)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    np.testing.assert_allclose(got, reward_model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)),
                               rtol=2e-5, atol=2e-5)


def test_scorer_from_checkpoint_with_a_tokenizer_path_and_a_dtype(reward_model, tmp_path) -> None:
    """`from_checkpoint`: a tokenizer given as a path is loaded, the dtype override reaches the
    model, and the batch size / max_len are passed on."""
    save_model(reward_model, RCFG, tmp_path / "rm")
    scorer = RewardScorer.from_checkpoint(tmp_path / "rm", tokenizer=str(TOK.path), batch_size=3, max_len=40,
                                          dtype="bfloat16")
    assert (scorer.batch_size, scorer.max_len, scorer.buckets) == (3, 40, [32, 40])
    assert scorer.model.cfg.param_dtype == "bfloat16" and scorer.model.embed[...].dtype == jnp.bfloat16
    assert scorer.tokenizer.encode("hello") == TOK.encode("hello")
    plain = RewardScorer.from_checkpoint(tmp_path / "rm")  # no tokenizer.model saved: the builtin one
    assert plain.model.cfg.param_dtype == RCFG.param_dtype and (plain.max_len, plain.batch_size) == (128, 8)
    assert plain.tokenizer.encode("hello") == TOK.encode("hello")
    # a checkpoint's own tokenizer.model wins over the builtin one
    from nemojax.data.tokenizer import train_tokenizer
    own = train_tokenizer([f"hello world {i} reward model {7 * i} quick brown fox" for i in range(300)],
                          tmp_path / "tok", vocab_size=320)
    (tmp_path / "rm" / "tokenizer.model").write_bytes(own.read_bytes())
    mine = RewardScorer.from_checkpoint(tmp_path / "rm").tokenizer
    assert mine.encode("hello world") == load_tokenizer(own).encode("hello world") != TOK.encode("hello world")


def test_scorer_edges_left_by_the_mutation_run(reward_model) -> None:
    """The smallest batch is accepted; the counter accumulates over calls; a batch of B forward
    passes covers B sequences (not one pass per sequence); a language model is refused with the
    whole message. Kills: `batch_size <= 1` / `< 2`, `stats["scored"] = n`, `range(0, n, )`
    (overlapping batches: the same scores from B times the work), the refusal's message mangled
    (scripts/mutation.py reward)."""
    one = RewardScorer(reward_model, TOK, batch_size=1, max_len=32)
    seqs = [[2, 5, 6], [2, 7], [2, 8, 9, 10], [2, 11, 12]]
    np.testing.assert_allclose(one.score_ids(seqs), RewardScorer(reward_model, TOK, batch_size=4, max_len=32)
                               .score_ids(seqs), rtol=2e-5, atol=2e-5)
    scorer = RewardScorer(reward_model, TOK, batch_size=2, max_len=32)
    calls = []
    forward = scorer._forward
    scorer._forward = lambda *a: calls.append(1) or forward(*a)
    scorer.score_ids(seqs)
    scorer.score_ids(seqs[:3])
    assert len(calls) == 2 + 2 and scorer.stats["scored"] == 7
    with pytest.raises(ValueError) as e:
        RewardScorer(NemotronLM(BASE, rngs=nnx.Rngs(0)), TOK)
    assert str(e.value) == ("RewardScorer needs a reward model (a checkpoint trained with model.reward.enabled: "
                            "true); this one is a language model")


def test_reward_head_is_stored_in_the_param_dtype() -> None:
    """A bf16 reward model keeps its head in bf16 like every other weight (checkpoints, memory),
    and computes the scores in fp32. Kills: the head's kernel / bias created in the default
    dtype (`_param(..., None)`, `_const(..., None)`)."""
    model = make_model(dataclasses.replace(RCFG, param_dtype="bfloat16"), seed=0)
    assert model.reward_head.kernel[...].dtype == jnp.bfloat16 and model.reward_head.bias[...].dtype == jnp.bfloat16
    scores = model(jnp.asarray([[2, 5, 6, 7]], jnp.int32))
    assert scores.dtype == jnp.float32 and scores.shape == (1, 5)


def test_the_trunk_is_the_language_models_in_shape_dtype_and_sharding_axes() -> None:
    """Every trunk parameter of the reward model has the language model's shape, dtype (bf16
    here) and logical axes, so a language-model checkpoint and the LM's sharding rules apply
    unchanged. Kills (found after mutmut's `apply` was fixed to mutate the right class): the
    embedding's or the final norm's logical axes renamed, the final norm created in the default
    fp32 instead of the param dtype."""
    cfg = dataclasses.replace(RCFG, param_dtype="bfloat16")
    rm = make_model(cfg, seed=0)
    lm = NemotronLM(dataclasses.replace(cfg, reward=RewardConfig()), rngs=nnx.Rngs(0))
    rm_state = nnx.to_pure_dict(nnx.state(rm, nnx.Param))
    lm_state = nnx.to_pure_dict(nnx.state(lm, nnx.Param))
    rm_axes, lm_axes = logical_axes(rm), logical_axes(lm)
    for name in ("embed", "blocks", "final_norm_scale", "final_norm_bias"):
        ours, theirs = jax.tree_util.tree_leaves_with_path(rm_state[name]), jax.tree_util.tree_leaves_with_path(lm_state[name])
        assert [(p, x.shape, x.dtype) for p, x in ours] == [(p, x.shape, x.dtype) for p, x in theirs], name
        assert rm_axes[name] == lm_axes[name], name
    assert rm_state["final_norm_scale"].dtype == jnp.bfloat16


def test_positions_reach_the_trunk(reward_model) -> None:
    """Explicit positions are the ones RoPE uses: the scores equal the trunk's hidden state at
    those positions through the head, and differ from the default positions'. Kills: the
    positions dropped (`positions=None`, or not passed) on the way to the trunk."""
    ids = jnp.asarray([[2, 17, 99, 5, 6, 7]], jnp.int32)
    shifted = jnp.arange(6, dtype=jnp.int32)[None] * 3 + 5
    h, _ = reward_model.hidden(ids, positions=shifted)
    want = reward_model.reward_head(h[:, -1])
    got = reward_model(ids, positions=shifted)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(got), np.asarray(reward_model(ids)), atol=1e-4)
