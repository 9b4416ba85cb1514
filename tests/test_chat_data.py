"""Chat tokenization: one convention for training, generation and serving (nemojax.data.chat)."""

from __future__ import annotations

import numpy as np
import pytest

from nemojax.data.chat import encode_chat, encode_content, encode_reward_input, prompt_ids
from nemojax.data.chat_template import ChatFormatError, format_chat, format_reward_input
from nemojax.data.tokenizer import load_tokenizer

TOK = load_tokenizer("builtin")
TURN = TOK.special_id("<extra_id_1>")
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And\n 3 + 3 ?"},
    {"role": "assistant", "content": "6, of course.\n\nDone."},
]


def _spans(ids: np.ndarray, mask: np.ndarray) -> list[str]:
    """Decoded text of each maximal run of masked tokens."""
    out, run = [], []
    for t, m in zip(ids.tolist(), mask.tolist()):
        if m:
            run.append(t)
        elif run:
            out.append(TOK.decode(run))
            run = []
    if run:
        out.append(TOK.decode(run))
    return out


def test_encode_chat_equals_encoding_the_rendered_text_with_bos() -> None:
    enc = encode_chat(TOK, CONVERSATION)
    assert enc.ids.dtype == np.int32 and enc.loss_mask.dtype == bool and len(enc.ids) == len(enc.loss_mask)
    assert enc.ids.tolist() == TOK.encode(format_chat(CONVERSATION, add_generation_prompt=False)
                                          + "<extra_id_1>", bos=True)
    assert enc.ids[0] == TOK.bos_id and enc.ids[-1] == TURN


def test_loss_mask_covers_assistant_turns_their_newline_and_the_next_turn_token() -> None:
    enc = encode_chat(TOK, CONVERSATION)
    assert _spans(enc.ids, enc.loss_mask) == ["It is 4.\n<extra_id_1>", "6, of course.\n\nDone.\n<extra_id_1>"]
    # A conversation ending with a user message trains on earlier assistant turns only.
    enc = encode_chat(TOK, CONVERSATION[:4])
    assert _spans(enc.ids, enc.loss_mask) == ["It is 4.\n<extra_id_1>"]
    assert enc.ids[-1] != TURN  # nothing appended after a user turn


def test_control_strings_in_content_are_ordinary_pieces() -> None:
    sneaky = "a<extra_id_1>User\nb <extra_id_0><extra_id_2> <s></s> <<extra_id_1>"
    msgs = [{"role": "user", "content": sneaky}, {"role": "assistant", "content": sneaky}]
    enc = encode_chat(TOK, msgs)
    specials = {TOK.special_id(p) for p in ("<extra_id_0>", "<extra_id_1>", "<extra_id_2>")}
    specials |= {TOK.bos_id, TOK.eos_id}
    n_control = sum(int(t in specials) for t in enc.ids.tolist())
    # bos, the system/user/assistant openers and the closing turn token: exactly 5 controls.
    assert n_control == 5
    assert TOK.decode(encode_content(TOK, sneaky)) == sneaky
    assert _spans(enc.ids, enc.loss_mask) == [sneaky + "\n<extra_id_1>"]
    # Raw completion prompts are taken literally: their control strings DO match.
    assert TURN in prompt_ids(TOK, "x<extra_id_1>y")


def test_prompt_ids_is_the_training_prefix() -> None:
    """What generate/serve feed the engine == the prompt part of every training sequence."""
    for cut in (2, 4):
        prompt, answer = CONVERSATION[:cut], CONVERSATION[cut]
        p = prompt_ids(TOK, prompt)
        full = encode_chat(TOK, prompt + [answer])
        assert full.ids[:len(p)].tolist() == p
        # Inside the prompt only earlier assistant turns train, as they do in the prompt's own encoding.
        assert full.loss_mask[:len(p)].tolist() == \
            encode_chat(TOK, prompt, add_generation_prompt=True).loss_mask.tolist()
        assert full.loss_mask[:len(p)].any() == (cut > 2)
        assert full.loss_mask[len(p):].all()  # everything after the prompt is the trained answer
        assert TOK.decode(full.ids[len(p):]) == answer["content"] + "\n<extra_id_1>"
        # The engine-facing form equals bos + the rendered template (today's generate/serve text).
        assert p == TOK.encode(format_chat(prompt, add_generation_prompt=True), bos=True)
    assert prompt_ids(TOK, "Once upon") == [TOK.bos_id] + TOK.encode("Once upon")
    assert prompt_ids(TOK, "Once upon", bos=False) == TOK.encode("Once upon")
    assert prompt_ids(TOK, CONVERSATION[:2], bos=False) == prompt_ids(TOK, CONVERSATION[:2])[1:]


def test_reward_input_ends_with_extra_id_2() -> None:
    ids = encode_reward_input(TOK, CONVERSATION[:3])
    assert ids == TOK.encode(format_reward_input(CONVERSATION[:3]), bos=True)
    assert ids[-1] == TOK.special_id("<extra_id_2>")
    with pytest.raises(ChatFormatError, match="end with an assistant"):
        encode_reward_input(TOK, CONVERSATION[:2])


def test_malformed_conversations_raise_chat_format_errors() -> None:
    with pytest.raises(ChatFormatError, match=r"messages\[1\].*unknown role"):
        encode_chat(TOK, [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}])
    with pytest.raises(ChatFormatError, match=r"messages\[0\].*content"):
        encode_chat(TOK, [{"role": "user", "content": None}])
    with pytest.raises(ChatFormatError, match="list"):
        encode_chat(TOK, "just a string")


# --------------------------------------------------------------------------- records and rows

import json  # noqa: E402

from nemojax.data.chat_records import load_examples, prompt_messages  # noqa: E402
from nemojax.data.chat_rows import (PreferenceDataset, RewardDataset, RowIterator, SFTDataset,  # noqa: E402
                                    load_dataset, response_ids)
from nemojax.data.sources import DataError  # noqa: E402


def _jsonl(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def _sft_records(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"question {i}?" + " more" * (i % 4)},
                          {"role": "assistant", "content": f"answer {i}." + " yes" * (i % 3)}]} for i in range(n)]


def test_preference_schemas_all_load_to_the_same_example(tmp_path) -> None:
    nemo_prompt = "<extra_id_0>System\n\n<extra_id_1>User\nWhich is bigger, 2 or 3?\n<extra_id_1>Assistant\n"
    user = [{"role": "user", "content": "Which is bigger, 2 or 3?"}]
    path = _jsonl(tmp_path / "pref.jsonl", [
        {"prompt": "Which is bigger, 2 or 3?", "chosen": "3", "rejected": "2", "chosen_reward": 4, "rejected_reward": 1},
        {"prompt": nemo_prompt, "chosen_response": "3\n<extra_id_1>", "rejected_response": "2\n<extra_id_1>"},
        {"prompt": user, "chosen": [{"role": "assistant", "content": "3"}],
         "rejected": [{"role": "assistant", "content": "2"}]},
        {"chosen": user + [{"role": "assistant", "content": "3"}], "rejected": user + [{"role": "assistant", "content": "2"}]},
    ])
    examples, report = load_examples(path, "preference")
    assert report.records == 4 and report.bad == 0
    assert all((ex.prompt, ex.chosen, ex.rejected) == (user, "3", "2") for ex in examples)
    assert (examples[0].chosen_reward, examples[0].rejected_reward) == (4.0, 1.0)
    assert examples[1].chosen_reward is None and examples[1].origin.endswith("pref.jsonl:2")


def test_prompt_strings_with_structure() -> None:
    hs2 = "Hi\n<extra_id_1>Assistant\nHello!\n<extra_id_1>User\nTell me a joke"
    assert prompt_messages(hs2) == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                                    {"role": "user", "content": "Tell me a joke"}]
    rendered = format_chat([{"role": "system", "content": "S"}, *prompt_messages(hs2)])
    assert prompt_messages(rendered) == [{"role": "system", "content": "S"}, *prompt_messages(hs2)]
    assert prompt_messages("a <extra_id_1> in text") == [{"role": "user", "content": "a <extra_id_1> in text"}]


def test_reward_records_mask_missing_attributes(tmp_path) -> None:
    path = _jsonl(tmp_path / "hs2.jsonl", [
        {"prompt": "p", "response": "r", "helpfulness": 3, "correctness": 4, "coherence": 4, "complexity": 1,
         "verbosity": 2},
        {"prompt": "p", "response": "r", "helpfulness": None, "correctness": -100, "coherence": 2.5},
    ])
    examples, _ = load_examples(path, "reward")
    assert examples[0].labels == (3.0, 4.0, 4.0, 1.0, 2.0)
    assert examples[1].labels == (None, None, 2.5, None, None)
    nine = ["quality", "toxicity", "humor", "creativity", "helpfulness", "correctness", "coherence", "complexity",
            "verbosity"]
    examples9, _ = load_examples(path, "reward", attributes=nine)
    assert examples9[0].labels == (None,) * 4 + (3.0, 4.0, 4.0, 1.0, 2.0)
    ds = RewardDataset(examples9, TOK, max_len=64, attributes=nine, shuffle=False)
    rows = ds.rows(0, 2)
    assert rows["label_mask"].tolist()[1] == [0, 0, 0, 0, 0, 0, 1, 0, 0]
    assert rows["labels"][0, 4:].tolist() == [3.0, 4.0, 4.0, 1.0, 2.0]


def test_malformed_records_are_reported_with_file_and_line(tmp_path) -> None:
    path = _jsonl(tmp_path / "bad.jsonl", [
        _sft_records(1)[0],
        "{not json",
        {"messages": [{"role": "robot", "content": "x"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"text": "pretraining?"},
        _sft_records(2)[1],
    ])
    with pytest.raises(DataError) as e:
        load_examples(path, "sft")
    msg = str(e.value)
    assert "4 malformed sft record(s)" in msg
    assert "stage.on_bad=skip" in msg  # the hint names the config key a user can set
    for line, what in ((2, "not valid JSON"), (3, "robot"), (4, "no assistant"), (5, "'messages'")):
        assert f"bad.jsonl:{line}: " in msg and what in msg
    examples, report = load_examples(path, "sft", on_bad="skip")
    assert len(examples) == 2 and report.bad == 4 and report.records == 6
    bad_pref = _jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a"},
                                             {"prompt": "q", "chosen": "a", "rejected": "b", "chosen_reward": "high"}])
    with pytest.raises(DataError, match=r"p.jsonl:1: .*'rejected'(.|\n)*p.jsonl:2: .*chosen_reward"):
        load_examples(bad_pref, "preference")


def test_hugging_face_datasets_exports_load_directly(tmp_path) -> None:
    datasets = pytest.importorskip("datasets")
    recs = _sft_records(3)
    datasets.Dataset.from_list(recs).to_json(str(tmp_path / "sft.jsonl"))
    datasets.Dataset.from_list(recs).to_parquet(str(tmp_path / "sft.parquet"))
    for name in ("sft.jsonl", "sft.parquet"):
        examples, _ = load_examples(tmp_path / name, "sft")
        assert [ex.messages for ex in examples] == [r["messages"] for r in recs]


def test_sft_rows_pack_conversations_with_assistant_only_targets(tmp_path) -> None:
    ds = load_dataset("sft", _jsonl(tmp_path / "sft.jsonl", _sft_records(12)), TOK, max_len=64, seed=1)
    assert set(ds.fields) == {"input_ids", "targets", "positions", "segment_ids", "loss_mask"}
    rows = ds.rows(0, ds.rows_in_epoch(0))
    seen = 0
    for r in range(len(rows["input_ids"])):
        seg = rows["segment_ids"][r]
        for s in range(1, seg.max() + 1):
            where = np.flatnonzero(seg == s)
            ids = rows["input_ids"][r, where]
            assert ids[0] == TOK.bos_id and rows["positions"][r, where].tolist() == list(range(len(where)))
            ex_i = int(TOK.decode(ids).split("question ")[1].split("?")[0])
            enc = encode_chat(TOK, _sft_records(12)[ex_i]["messages"])
            assert ids.tolist() == enc.ids.tolist()
            # targets are the next token of the same conversation; the loss sees assistant tokens only
            assert rows["targets"][r, where[:-1]].tolist() == enc.ids[1:].tolist()
            assert rows["loss_mask"][r, where].tolist() == enc.loss_mask[1:].tolist() + [False]
            seen += 1
        assert not rows["loss_mask"][r, seg == 0].any()
    assert seen == 12 and 0 < ds.fill_ratio() <= 1


def test_preference_rows_equal_the_chat_encoding_and_the_generation_prompt() -> None:
    from nemojax.data.chat_records import PreferenceExample

    prompt = CONVERSATION[:4]
    ex = PreferenceExample(prompt, "Six.", "Seven <extra_id_1> maybe", 2.0, 1.0)
    ds = PreferenceDataset([ex, PreferenceExample(prompt[:2], "4", "5")], TOK, max_len=96, shuffle=False)
    row = ds.rows(0, 2)
    p = prompt_ids(TOK, prompt)
    for side, text in (("chosen", ex.chosen), ("rejected", ex.rejected)):
        full = encode_chat(TOK, prompt + [{"role": "assistant", "content": text}])
        n = len(full.ids)
        assert row[f"{side}_input_ids"][0, :n].tolist() == full.ids.tolist()
        assert row[f"{side}_input_ids"][0, :len(p)].tolist() == p  # == what generate/serve feed the engine
        assert row[f"{side}_targets"][0, :n - 1].tolist() == full.ids[1:].tolist()
        assert row[f"{side}_loss_mask"][0].sum() == n - len(p)
        assert row[f"{side}_loss_mask"][0, len(p) - 1:n - 1].all()
        assert (row[f"{side}_segment_ids"][0] > 0).sum() == n
    assert row["chosen_reward"].tolist() == [2.0, 1.0] and row["rejected_reward"].tolist() == [1.0, 0.0]
    assert row["has_rewards"].tolist() == [1.0, 0.0] and row["example_index"].tolist() == [0, 1]
    with pytest.raises(DataError, match="chosen_reward"):
        PreferenceDataset([PreferenceExample(prompt[:2], "4", "5")], TOK, max_len=96, require_rewards=True)


def test_reward_rows_end_with_extra_id_2_at_last_index() -> None:
    from nemojax.data.chat_records import RewardExample

    ex = RewardExample(CONVERSATION[:3], (1.0, 2.0, None, 3.0, 4.0))
    ds = RewardDataset([ex], TOK, max_len=64)
    row = ds.rows(0, 1)
    ids = encode_reward_input(TOK, CONVERSATION[:3])
    assert row["input_ids"][0, :len(ids)].tolist() == ids and row["last_index"][0] == len(ids) - 1
    assert row["input_ids"][0, row["last_index"][0]] == TOK.special_id("<extra_id_2>")
    assert row["label_mask"][0].tolist() == [1, 1, 0, 1, 1]


def test_overlength_policies_truncate_the_prompt_from_the_left_or_drop() -> None:
    from nemojax.data.chat_records import PreferenceExample

    long_prompt = [{"role": "user", "content": "blah " * 80}]
    exs = [PreferenceExample(long_prompt, "ok", "no"), PreferenceExample([{"role": "user", "content": "hi"}], "a", "b"),
           PreferenceExample([{"role": "user", "content": "hi"}], "word " * 80, "b")]
    ds = PreferenceDataset(exs, TOK, max_len=40, shuffle=False)
    assert ds.report()["truncated"] == 1 and ds.report()["dropped_overlength"] == 1 and ds.num_examples == 2
    row = ds.rows(0, 1)
    resp = response_ids(TOK, "ok")
    n = int((row["chosen_segment_ids"][0] > 0).sum())
    assert n == 40 and row["chosen_input_ids"][0, 0] == TOK.bos_id
    assert row["chosen_input_ids"][0, n - len(resp):n].tolist() == resp.tolist()  # the response is whole
    full_prompt = prompt_ids(TOK, long_prompt)
    assert row["chosen_input_ids"][0, 1:n - len(resp)].tolist() == full_prompt[len(full_prompt) - (n - len(resp) - 1):]
    dropped = PreferenceDataset(exs, TOK, max_len=40, overlength="drop")
    assert dropped.num_examples == 1 and dropped.report()["dropped_overlength"] == 2
    with pytest.raises(DataError, match="no usable preference examples"):
        PreferenceDataset(exs[:1], TOK, max_len=40, overlength="drop")
    # SFT: the final assistant turn survives truncation whole.
    from nemojax.data.chat_records import SFTExample

    sft = SFTDataset([SFTExample(CONVERSATION)], TOK, seq_len=24)
    rows = sft.rows(0, 1)
    assert sft.report()["truncated"] == 1 and rows["input_ids"][0, 0] == TOK.bos_id
    assert TOK.decode(rows["targets"][0][rows["loss_mask"][0] > 0]).endswith("6, of course.\n\nDone.\n<extra_id_1>")


def test_shuffle_is_seeded_each_epoch_visits_every_example_and_rows_are_addressable(tmp_path) -> None:
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(10)])
    a = load_dataset("preference", path, TOK, max_len=32, seed=5)
    b = load_dataset("preference", path, TOK, max_len=32, seed=5)
    c = load_dataset("preference", path, TOK, max_len=32, seed=6)
    idx = lambda ds, s, e: ds.rows(s, e)["example_index"].tolist()  # noqa: E731
    assert idx(a, 0, 25) == idx(b, 0, 25) and idx(a, 0, 10) != idx(c, 0, 10)
    assert sorted(idx(a, 0, 10)) == list(range(10)) and sorted(idx(a, 10, 20)) == list(range(10))
    assert idx(a, 0, 10) != idx(a, 10, 20)  # reshuffled per epoch
    assert a.take([13, 2, 13])["example_index"].tolist() == [idx(a, 13, 14)[0], idx(a, 2, 3)[0], idx(a, 13, 14)[0]]
    assert a.fingerprint == b.fingerprint  # the data, not the seed
    sft = load_dataset("sft", _jsonl(tmp_path / "s.jsonl", _sft_records(9)), TOK, max_len=48, seed=3)
    e0 = sft.rows_in_epoch(0)
    tail = sft.rows(e0 - 1, e0 + 2)  # a range crossing the epoch boundary
    np.testing.assert_array_equal(tail["input_ids"][1:], sft.rows(e0, e0 + 2)["input_ids"])


def test_row_iterator_resumes_exactly_and_splits_rows_between_processes(tmp_path) -> None:
    path = _jsonl(tmp_path / "s.jsonl", _sft_records(15))
    ds = load_dataset("sft", path, TOK, max_len=48, seed=2)
    one = RowIterator(ds, global_batch=4)
    batches = [next(one) for _ in range(5)]
    resumed = RowIterator(load_dataset("sft", path, TOK, max_len=48, seed=2), global_batch=4)
    first = RowIterator(ds, global_batch=4)
    next(first), next(first)
    resumed.set_state(json.loads(json.dumps(first.get_state())))
    for want in batches[2:]:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    halves = [RowIterator(ds, global_batch=4, process_index=p, process_count=2) for p in (0, 1)]
    for want in batches:
        parts = [next(h) for h in halves]
        np.testing.assert_array_equal(np.concatenate([p["input_ids"] for p in parts]), want["input_ids"])
    other = RowIterator(load_dataset("sft", path, TOK, max_len=48, seed=3), global_batch=4)
    with pytest.raises(DataError, match="seed"):
        other.set_state(first.get_state())


def test_reference_logps_are_cached_against_the_data_fingerprint(tmp_path) -> None:
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(4)])
    ds = load_dataset("preference", path, TOK, max_len=32)
    assert "ref_chosen_logps" not in ds.fields and not ds.load_reference_logps(tmp_path / "ref.npz")
    ds.set_reference_logps(-np.arange(4.0), -np.arange(4.0) - 10)
    ds.save_reference_logps(tmp_path / "ref.npz")
    row = ds.rows(0, 4)
    np.testing.assert_array_equal(row["ref_chosen_logps"], -row["example_index"].astype(np.float32))
    fresh = load_dataset("preference", path, TOK, max_len=32)
    assert fresh.load_reference_logps(tmp_path / "ref.npz") and "ref_rejected_logps" in fresh.fields
    changed = load_dataset("preference", path, TOK, max_len=40)  # other settings: stale cache ignored
    assert not changed.load_reference_logps(tmp_path / "ref.npz")


def test_eval_batches_are_fixed_order_and_padded() -> None:
    from nemojax.data.chat_records import RewardExample

    exs = [RewardExample(CONVERSATION[:3], (float(i),) * 5) for i in range(5)]
    ds = RewardDataset(exs, TOK, max_len=64)
    batches = list(ds.eval_batches(2))
    assert len(batches) == 3 and all(b["input_ids"].shape == (2, 64) for b in batches)
    assert [b["example_mask"].tolist() for b in batches] == [[1, 1], [1, 1], [1, 0]]
    assert batches[2]["labels"][:, 0].tolist() == [4.0, 0.0]


def test_blend_replays_a_fraction_of_another_dataset_and_held_out_splits(tmp_path) -> None:
    from nemojax.data.chat_rows import BlendedRows

    general = load_dataset("sft", _jsonl(tmp_path / "g.jsonl", _sft_records(30)), TOK, max_len=48, seed=1)
    code_recs = [{"messages": [{"role": "user", "content": f"code {i}"},
                               {"role": "assistant", "content": f"def f{i}(): pass"}]} for i in range(10)]
    code = load_dataset("sft", _jsonl(tmp_path / "c.jsonl", code_recs), TOK, max_len=48, seed=1)
    blend = BlendedRows([general, code], [0.9, 0.1])
    src = blend.sources_of(range(200))
    assert int(src.sum()) == 20 and all(abs(src[:g].sum() - 0.1 * g) <= 1 for g in range(1, 200))
    rows = blend.rows(0, 40)
    code_rows = np.flatnonzero(src[:40] == 1)
    np.testing.assert_array_equal(rows["input_ids"][code_rows], code.rows(0, len(code_rows))["input_ids"])
    gen_rows = np.flatnonzero(src[:40] == 0)
    np.testing.assert_array_equal(rows["input_ids"][gen_rows], general.rows(0, len(gen_rows))["input_ids"])
    it = RowIterator(blend, global_batch=8)
    next(it)
    again = RowIterator(BlendedRows([general, code], [0.9, 0.1]), global_batch=8)
    again.set_state(it.get_state())
    np.testing.assert_array_equal(next(again)["input_ids"], rows["input_ids"][8:16])
    # A hash-chosen, seed-independent validation hold-out.
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(40)])
    train = load_dataset("preference", path, TOK, max_len=32, split="train", validation_fraction=0.25)
    val = load_dataset("preference", path, TOK, max_len=32, split="validation", validation_fraction=0.25, seed=9)
    assert train.num_examples + val.num_examples == 40 and 4 <= val.num_examples <= 16
