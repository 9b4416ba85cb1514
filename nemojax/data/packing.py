"""Packing a stream of tokenized documents into fixed-length training rows.

Each document is framed as `[bos] + tokens + [eos]` (bos as in Megatron / NeMo pretraining and
as `generate` / `serve` prompt the model; omitted when `bos_id` is None) and the framed
documents are laid end to end, Megatron style: a row of `seq_len` slots takes the next
`seq_len` tokens of that stream, so nothing is wasted on padding. A document cut by the row's
end continues at the start of the next row (without a second bos). Within a row every document
piece gets its own segment id (1, 2, 3, ...) and positions restarting at 0, so attention never
crosses documents.

Targets are the next token of the same framed document; the loss mask is 0 where there is
none: on each document's eos (its "next token" is another document) and on padding. So bos
predicts the first token and the last token predicts eos. The last slot of a row whose document
continues into the next row still has a target (read one past the row), so no supervision is
lost at the cut.

`mode="pad"` instead starts a document that does not fit the rest of a partly filled row
on a fresh row, padding the rest (segment id 0): no document is split unless it is longer
than a row. It costs padding and is offered for data where cutting documents hurts.

Packing is split in two pure steps: `plan_row` decides which document pieces fill a row from
document *lengths* alone, and `fill_row` copies their tokens. A pipeline that must produce only
some rows of a stream (one host's share of a global batch) plans every row but fills only its
own, so its state is still a few integers per source: the current document and the offset in it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

PACK_MODES = ("concat", "pad")
ROW_FIELDS = {"input_ids": np.int32, "targets": np.int32, "positions": np.int32,
              "segment_ids": np.int32, "loss_mask": np.float32}


class PackingError(ValueError):
    """A document stream that cannot be packed (e.g. only empty documents)."""


@dataclass
class Cursor:
    """Where a document stream's next row starts: document `doc`, token `offset` in it."""

    doc: int = 0
    offset: int = 0


def empty_rows(n: int, seq_len: int) -> dict[str, np.ndarray]:
    """Zeroed output arrays for `n` rows (pad id 0, segment 0, loss mask 0)."""
    return {k: np.zeros((n, seq_len), dt) for k, dt in ROW_FIELDS.items()}


@dataclass(frozen=True)
class Piece:
    """Slots `[start, start + take)` of document `doc`'s framed tokens ([bos] + tokens + [eos])."""

    doc: int
    start: int
    take: int


def plan_row(doc_len: Callable[[int], int], cursor: Cursor, seq_len: int, *, bos: bool, mode: str = "concat",
             max_empty: int = 1_000_000) -> tuple[list[Piece], Cursor]:
    """The pieces that fill one row starting at `cursor`, and the cursor after the row.

    `doc_len(k)` is document k's token count without bos/eos. Empty documents are skipped;
    `max_empty` consecutive empty ones (e.g. a whole epoch of them) raise PackingError.
    """
    if mode not in PACK_MODES:
        raise PackingError(f"unknown pack mode {mode!r}; use one of {PACK_MODES}")
    doc, offset = cursor.doc, cursor.offset
    pieces: list[Piece] = []
    filled = empties = 0
    while filled < seq_len:
        n = int(doc_len(doc))
        if n == 0:
            empties += 1
            if empties > max_empty:
                raise PackingError(f"{empties} consecutive empty documents: the source has no text")
            doc, offset = doc + 1, 0
            continue
        empties = 0
        framed = n + 1 + int(bos)
        remaining = framed - offset
        need = seq_len - filled
        if mode == "pad" and filled > 0 and remaining > need:
            break  # start the document on a fresh row; the rest of this row stays padding
        take = min(need, remaining)
        pieces.append(Piece(doc, offset, take))
        filled += take
        if offset + take == framed:
            doc, offset = doc + 1, 0
        else:
            offset += take
    return pieces, Cursor(doc, offset)


def _copy_framed(dst: np.ndarray, at: int, tokens: np.ndarray, lo: int, hi: int, *, bos_id: int | None,
                 eos_id: int) -> None:
    """dst[at : at + hi - lo] = framed[lo:hi], framed = [bos] + tokens + [eos], without building it."""
    b = int(bos_id is not None)
    n = len(tokens)
    if b and lo == 0 and hi > 0:
        dst[at] = bos_id
    t_lo, t_hi = max(lo, b), min(hi, b + n)
    if t_hi > t_lo:
        dst[at + t_lo - lo:at + t_hi - lo] = tokens[t_lo - b:t_hi - b]
    if hi == b + n + 1 and hi > lo:
        dst[at + hi - 1 - lo] = eos_id


def fill_row(get_doc: Callable[[int], np.ndarray], pieces: list[Piece], out: dict[str, np.ndarray], row: int, *,
             eos_id: int, bos_id: int | None = None) -> None:
    """Write the planned `pieces` into row `row` of the zero-initialised `out` arrays."""
    inp, tgt, pos = out["input_ids"][row], out["targets"][row], out["positions"][row]
    seg, mask = out["segment_ids"][row], out["loss_mask"][row]
    filled = 0
    for segment, p in enumerate(pieces, start=1):
        tokens = get_doc(p.doc)
        framed = len(tokens) + 1 + int(bos_id is not None)
        end = p.start + p.take
        _copy_framed(inp, filled, tokens, p.start, end, bos_id=bos_id, eos_id=eos_id)
        supervised = min(end, framed - 1) - p.start  # every slot but the eos has a next token
        if supervised > 0:
            _copy_framed(tgt, filled, tokens, p.start + 1, p.start + 1 + supervised, bos_id=bos_id, eos_id=eos_id)
            mask[filled:filled + supervised] = 1.0
        pos[filled:filled + p.take] = np.arange(p.take, dtype=np.int32)
        seg[filled:filled + p.take] = segment
        filled += p.take


def pack_row(get_doc: Callable[[int], np.ndarray], cursor: Cursor, out: dict[str, np.ndarray], row: int,
             *, eos_id: int, bos_id: int | None = None, mode: str = "concat", max_empty: int = 1_000_000) -> Cursor:
    """Fill row `row` of the zero-initialised `out` arrays from `cursor`; return the next cursor.

    `get_doc(k)` returns document k's token ids without bos/eos (see `plan_row`, `fill_row`).
    """
    seq_len = out["input_ids"].shape[1]
    pieces, nxt = plan_row(lambda k: len(get_doc(k)), cursor, seq_len, bos=bos_id is not None, mode=mode,
                           max_empty=max_empty)
    fill_row(get_doc, pieces, out, row, eos_id=eos_id, bos_id=bos_id)
    return nxt
