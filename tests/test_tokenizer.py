"""Tokenizer, chat template, built-in corpus and the `nemojax tokenizer` command."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from nemojax.cli import main as cli_main
from nemojax.config import CONFIG_DIR
from nemojax.data.chat_template import ChatFormatError, format_chat, format_reward_input
from nemojax.data.corpus import BUILTIN_SOURCES, builtin_documents, corpus_fingerprint
from nemojax.data.tokenizer import (CHAT_SPECIAL_TOKENS, Tokenizer, TokenizerError, load_tokenizer,
                                    unigram_entropy)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer("builtin")


def test_builtin_ids_match_nemotron_and_tiny_preset(tok: Tokenizer) -> None:
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    tiny = yaml.safe_load((CONFIG_DIR / "models" / "tiny.yaml").read_text())
    assert tok.vocab_size == tiny["model"]["vocab_size"] == 4096
    assert tok.id_to_piece(tok.eos_id) == "</s>" and tok.piece_to_id("<s>") == 2
    # Shipped as package data, and small.
    assert tok.path.stat().st_size < 1_000_000


def test_chat_special_tokens_are_single_pieces(tok: Tokenizer) -> None:
    ids = [tok.special_id(s) for s in CHAT_SPECIAL_TOKENS]
    assert len(set(ids)) == 3 and all(i > 3 for i in ids)
    for s, i in zip(CHAT_SPECIAL_TOKENS, ids):
        assert tok.encode(s) == [i]
        assert tok.id_to_piece(i) == s
    # ...also glued to surrounding text, as the chat template writes them.
    text = format_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    enc = tok.encode(text)
    assert enc.count(ids[0]) == 1 and enc.count(ids[1]) == 2
    assert enc[0] == ids[0]
    assert tok.decode(enc) == text
    with pytest.raises(TokenizerError, match="no piece"):
        tok.special_id("<extra_id_99>")


@pytest.mark.parametrize("text", [
    "Hello, world! The Zen of Python.",
    "def f(x):\n    if x:\n\treturn  x  *  2\n\n\n# done   \n",
    "  leading and trailing spaces  ",
    "numbers 1234567890 and 3.14159",
    "",
])
def test_round_trip_is_exact(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


def test_byte_fallback_for_unseen_characters(tok: Tokenizer) -> None:
    text = "中文 🙂 ǅ"
    ids = tok.encode(text)
    pieces = [tok.id_to_piece(i) for i in ids]
    assert tok.unk_id not in ids
    assert any(p.startswith("<0x") for p in pieces)  # the CJK/emoji bytes
    assert tok.decode(ids) == text


def test_newline_and_indentation_pieces(tok: Tokenizer) -> None:
    pieces = [tok.id_to_piece(i) for i in tok.encode("x\n    return y\n")]
    assert "\n" in pieces and "<0x0A>" not in pieces
    assert "▁▁▁▁" in pieces  # indentation is one piece, not four


def test_bos_eos_and_batch(tok: Tokenizer) -> None:
    plain = tok.encode("a b c")
    assert tok.encode("a b c", bos=True, eos=True) == [2, *plain, 3]
    texts = ["first text", "second, longer text\nwith a newline", ""]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, eos=True)[2] == [3]


def test_load_tokenizer_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="nope.model"):
        load_tokenizer(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="bad.model"):
        Tokenizer(bad)
    assert load_tokenizer("builtin") is load_tokenizer("builtin")  # cached


def test_format_chat_matches_the_nemotron_template() -> None:
    msgs = [{"role": "system", "content": "You are helpful."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "and 3+3?"}]
    assert format_chat(msgs) == (
        "<extra_id_0>System\nYou are helpful.\n"
        "<extra_id_1>User\n2+2?\n"
        "<extra_id_1>Assistant\n4\n"
        "<extra_id_1>User\nand 3+3?\n"
        "<extra_id_1>Assistant\n")
    assert format_chat(msgs, add_generation_prompt=False).endswith("and 3+3?\n")
    # No system message: the system turn is still there, empty.
    assert format_chat([{"role": "user", "content": "hi"}]) == \
        "<extra_id_0>System\n\n<extra_id_1>User\nhi\n<extra_id_1>Assistant\n"
    # A finished conversation gets no second assistant header.
    done = msgs[:3]
    assert format_chat(done) == format_chat(done, add_generation_prompt=False)
    assert format_reward_input(done).endswith("<extra_id_1>Assistant\n4\n<extra_id_2>")
    with pytest.raises(ChatFormatError, match=r"messages\[1\].*unknown role"):
        format_chat([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}])
    with pytest.raises(ChatFormatError, match=r"messages\[1\].*system"):
        format_chat([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])


def test_unigram_entropy_hand_values() -> None:
    assert unigram_entropy(np.array([0, 1, 2, 3])) == pytest.approx(2.0)
    assert unigram_entropy([[5, 5], [5]]) == pytest.approx(0.0)
    assert unigram_entropy(np.array([0, 0, 1, 1]), base=math.e) == pytest.approx(math.log(2))
    with pytest.raises(ValueError):
        unigram_entropy(np.zeros(0, np.int32))


def test_builtin_corpus_two_distinct_deterministic_sources() -> None:
    prose = list(builtin_documents("prose"))
    code = list(builtin_documents("code"))
    # Same documents in the same order on a second pass (checked on a prefix to stay quick).
    assert prose[:250] == list(itertools.islice(builtin_documents("prose"), 250))
    assert len(prose) > 100 and len(code) > 100
    assert sum(map(len, prose)) > 1_000_000 and sum(map(len, code)) > 3_000_000
    assert not set(prose) & set(code)
    assert sum("def " in d for d in code) > 0.8 * len(code)
    assert any(d.startswith("The Zen of Python") for d in prose)
    assert BUILTIN_SOURCES == ("prose", "code")
    assert corpus_fingerprint("prose") != corpus_fingerprint("code")
    with pytest.raises(ValueError, match="builtin:prose"):
        builtin_documents("poetry")


def test_cli_train_on_a_small_corpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs = [d for _, d in zip(range(40), builtin_documents("prose"))]
    (tmp_path / "a.txt").write_text("\n\n".join(docs[:20]))
    with (tmp_path / "b.jsonl").open("w") as f:
        for d in docs[20:]:
            f.write(json.dumps({"body": d}) + "\n")
    out = tmp_path / "tok"
    rc = cli_main(["tokenizer", "train", "--input", str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"),
                   "--text-field", "body", "--vocab-size", "512", "--out", str(out)])
    assert rc == 0
    captured = capsys.readouterr()
    assert "read 21 documents" in captured.err and "wrote" in captured.err  # progress shown
    info = json.loads(captured.out.strip().splitlines()[-1])
    assert info["vocab_size"] == 512 and info["eos_id"] == 3
    tok = load_tokenizer(out)  # a directory holding tokenizer.model works too
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (2, 3, 0, 512)
    for s in CHAT_SPECIAL_TOKENS:
        assert len(tok.encode(s)) == 1
    text = "Unseen: Ωμέγα 🙂\n    indented"
    assert tok.decode(tok.encode(text)) == text
    # Missing inputs are reported, not crashed on.
    assert cli_main(["tokenizer", "train", "--input", str(tmp_path / "missing.txt"), "--out", str(out)]) == 2
    assert "missing.txt" in capsys.readouterr().err


def test_cli_encode_writes_pretokenized_array_record(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from nemojax.data.sources import ArrayRecordFile

    texts = ["first document\n  with indentation", "second one 🙂", "third"]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / "out.arrayrecord"
    assert cli_main(["tokenizer", "encode", "--input", str(src), "--out", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["documents"] == 3
    tok = load_tokenizer("builtin")
    f = ArrayRecordFile(out)
    assert [tok.decode(f[i].tolist()) for i in range(len(f))] == texts
    # Its length index is kept beside it: the token count of every document.
    from nemojax.data.length_index import read_index

    assert info["index"] == f"{out}.lenidx"
    assert read_index(Path(info["index"]))[1]["lengths"].tolist() == [len(tok.encode(t)) for t in texts]
