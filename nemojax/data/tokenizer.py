"""SentencePiece tokenizer with Nemotron's special ids, plus training.

Nemotron-4 uses a SentencePiece model with bos=2 and eos=3; its chat template marks turns
with `<extra_id_0>` (system), `<extra_id_1>` (turn separator) and `<extra_id_2>` (end of a
response scored by the reward model). Those three must be single pieces, so they are
trained in as user-defined symbols. Byte fallback keeps every string encodable: characters
outside the vocabulary become `<0xNN>` byte pieces instead of `<unk>`, so decode(encode(s))
returns s for any text.

nemojax ships a 4096-piece model trained on the built-in corpus (`load_tokenizer("builtin")`);
`nemojax tokenizer train` trains one on your own files with the same conventions.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import sentencepiece as spm

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
BUILTIN_MODEL = ASSETS_DIR / "tokenizer.model"

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
CHAT_SPECIAL_TOKENS = ("<extra_id_0>", "<extra_id_1>", "<extra_id_2>")
# Newline is a piece of its own so code and chat turns never fall back to bytes for it.
USER_DEFINED_SYMBOLS = (*CHAT_SPECIAL_TOKENS, "\n")


class TokenizerError(ValueError):
    """A tokenizer file or spec a user must fix."""


class Tokenizer:
    """A thin, typed wrapper over `sentencepiece.SentencePieceProcessor`.

    Keeps the Nemotron conventions in one place (ids of bos/eos/pad, the chat symbols) and
    exposes a `fingerprint` so caches of tokenized data can be keyed on the exact model.
    """

    def __init__(self, model_path: str | Path) -> None:
        path = Path(model_path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer model not found: {path} (give a SentencePiece .model file "
                                 f"or 'builtin'; train one with `nemojax tokenizer train`)")
        self.path = path
        proto = path.read_bytes()
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(proto)
        except Exception as e:  # sentencepiece raises bare RuntimeError/OSError
            raise TokenizerError(f"{path} is not a valid SentencePiece model: {e}") from None
        self.fingerprint = hashlib.sha256(proto).hexdigest()[:16]

    # ------------------------------------------------------------------ ids
    @property
    def vocab_size(self) -> int:
        return int(self._sp.GetPieceSize())

    @property
    def bos_id(self) -> int:
        return int(self._sp.bos_id())

    @property
    def eos_id(self) -> int:
        return int(self._sp.eos_id())

    @property
    def pad_id(self) -> int:
        return int(self._sp.pad_id())

    @property
    def unk_id(self) -> int:
        return int(self._sp.unk_id())

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.IdToPiece(int(token_id))

    def piece_to_id(self, piece: str) -> int:
        """Id of `piece`, or `unk_id` when the vocabulary lacks it (SentencePiece semantics)."""
        return int(self._sp.PieceToId(piece))

    def special_id(self, piece: str) -> int:
        """Id of a special piece such as `<extra_id_1>`, raising when the model lacks it."""
        i = self.piece_to_id(piece)
        if i == self.unk_id and piece != self.id_to_piece(self.unk_id):
            raise TokenizerError(f"{self.path} has no piece {piece!r}; retrain it with "
                                 f"`nemojax tokenizer train` (which adds {', '.join(CHAT_SPECIAL_TOKENS)})")
        return i

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._sp.EncodeAsIds(text)
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False,
                     num_threads: int = -1) -> list[list[int]]:
        """Encode many texts at once (SentencePiece threads over them; -1 = all cores)."""
        out = self._sp.Encode(list(texts), add_bos=bos, add_eos=eos, num_threads=num_threads)
        return [list(x) for x in out]

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


@lru_cache(maxsize=8)
def _load_cached(path: str, mtime_ns: int) -> Tokenizer:
    return Tokenizer(path)


def resolve_tokenizer_path(spec: str | Path) -> Path:
    """The .model file a tokenizer spec ("builtin" or a path) refers to."""
    if str(spec) in ("builtin", "", "default"):
        if not BUILTIN_MODEL.is_file():
            raise TokenizerError(f"the shipped tokenizer is missing from {BUILTIN_MODEL}; reinstall nemojax "
                                 f"or set data.tokenizer to a .model path")
        return BUILTIN_MODEL
    p = Path(spec).expanduser()
    if p.is_dir():
        p = p / "tokenizer.model"
    if not p.is_file():
        raise TokenizerError(f"tokenizer model not found: {spec} (set data.tokenizer to 'builtin' or a "
                             f"SentencePiece .model file; `nemojax tokenizer train` writes DIR/tokenizer.model)")
    return p


def load_tokenizer(spec: str | Path = "builtin") -> Tokenizer:
    """Load a tokenizer from a .model path, a directory holding tokenizer.model, or "builtin".

    Loaded models are cached per (path, modification time): pipelines and samplers that ask
    for the same tokenizer share one instance.
    """
    p = resolve_tokenizer_path(spec).resolve()
    return _load_cached(str(p), p.stat().st_mtime_ns)


# ---------------------------------------------------------------------------- training


def chunk_for_training(texts: Iterable[str], max_chars: int = 2000) -> Iterator[str]:
    """Split documents into line-aligned chunks SentencePiece's trainer accepts.

    The trainer treats each input as a "sentence" with a length cap; feeding whole documents
    with their newlines (rather than one line per sentence) lets it learn pieces that span
    indentation and line breaks, which matters for code.
    """
    for text in texts:
        buf: list[str] = []
        size = 0
        for line in text.splitlines(keepends=True):
            while len(line) > max_chars:  # a single very long line
                if buf:
                    yield "".join(buf)
                    buf, size = [], 0
                yield line[:max_chars]
                line = line[max_chars:]
            if size + len(line) > max_chars and buf:
                yield "".join(buf)
                buf, size = [], 0
            buf.append(line)
            size += len(line)
        if buf:
            yield "".join(buf)


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 4096, *,
                    model_type: str = "bpe", max_sentences: int = 2_000_000,
                    num_threads: int | None = None, verbose: bool = False) -> Path:
    """Train a SentencePiece model with Nemotron's conventions; returns DIR/tokenizer.model.

    pad=0, unk=1, bos=2, eos=3 (Nemotron's bos/eos ids); the chat symbols and newline are
    user-defined (always single pieces); byte fallback on; whitespace and normalisation are
    left untouched (identity rule, no collapsing of spaces) so code and text round-trip exactly.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if vocab_size < 300:
        raise TokenizerError(f"--vocab-size {vocab_size} is too small: 256 byte pieces, 4 specials and "
                             f"{len(USER_DEFINED_SYMBOLS)} user symbols already take {256 + 4 + len(USER_DEFINED_SYMBOLS)}")
    # Write the sentences to a temp file: the file path interface is the most robust across
    # sentencepiece versions and lets the trainer sample with input_sentence_size.
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        n = 0
        with corpus.open("w", encoding="utf-8") as f:
            for chunk in chunk_for_training(texts):
                # The trainer reads one sentence per line: escape newlines as a private-use
                # character, mapped back to "\n" by the user-defined symbol below.
                f.write(chunk.replace("\n", _NL_ESCAPE) + "\n")
                n += 1
        if n == 0:
            raise TokenizerError("no training text: the inputs were empty")
        model_prefix = Path(tmp) / "tokenizer"
        spm.SentencePieceTrainer.Train(
            input=str(corpus),
            model_prefix=str(model_prefix),
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=0.9995,
            byte_fallback=True,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
            user_defined_symbols=[_NL_ESCAPE if s == "\n" else s for s in USER_DEFINED_SYMBOLS],
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            max_sentence_length=16384,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            num_threads=num_threads or max(1, os.cpu_count() or 1),
            minloglevel=0 if verbose else 2,
        )
        model_bytes = _rename_piece((model_prefix.with_suffix(".model")).read_bytes(), _NL_ESCAPE, "\n")
    path = out / "tokenizer.model"
    path.write_bytes(model_bytes)
    return path


# U+E000 (private use) stands in for "\n" while training, since the trainer is line based.
_NL_ESCAPE = "\ue000"


def _rename_piece(model_bytes: bytes, old: str, new: str) -> bytes:
    """Rename one piece inside a serialized SentencePiece model (used to restore "\n")."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(model_bytes)
    for p in m.pieces:
        if p.piece == old:
            p.piece = new
    return m.SerializeToString()


# ---------------------------------------------------------------------------- statistics


def unigram_entropy(token_ids: np.ndarray | Iterable[Sequence[int]], vocab_size: int | None = None,
                    base: float = 2.0) -> float:
    """Entropy of the empirical token distribution, in bits per token (base=2) by default.

    This is the cross-entropy a model reaches by predicting token frequencies and ignoring
    context: a language model that learns anything must get its loss below it. Pass the
    flat token array (or an iterable of documents); compare with the training loss (in nats)
    using base=math.e.
    """
    if isinstance(token_ids, np.ndarray):
        flat = token_ids.reshape(-1)
    else:
        parts = [np.asarray(t, dtype=np.int64).reshape(-1) for t in token_ids]
        flat = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if flat.size == 0:
        raise ValueError("unigram_entropy needs at least one token")
    counts = np.bincount(flat.astype(np.int64), minlength=vocab_size or 0)
    p = counts[counts > 0] / flat.size
    return float(-(p * np.log(p)).sum() / np.log(base))
