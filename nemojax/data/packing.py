"""Packing a stream of tokenized documents into fixed-length training rows.

Each document is followed by eos and the documents are laid end to end, Megatron style:
a row of `seq_len` slots takes the next `seq_len` tokens of that stream, so nothing is
wasted on padding. A document cut by the row's end continues at the start of the next row.
Within a row every document piece gets its own segment id (1, 2, 3, ...) and positions
restarting at 0, so attention never crosses documents.

Targets are the next token of the same document; the loss mask is 0 where there is none:
on each document's eos (its "next token" is another document) and on padding. The last
slot of a row whose document continues into the next row still has a target (the next
token of that document, read one past the row), so no supervision is lost at the cut.

`mode="pad"` instead starts a document that does not fit the rest of a partly filled row
on a fresh row, padding the rest (segment id 0): no document is split unless it is longer
than a row. It costs padding and is offered for data where cutting documents hurts.

The packer is a pure function of (document accessor, cursor), so a pipeline's whole state
is a few integers per source: the index of the current document and the offset in it.
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


def pack_row(get_doc: Callable[[int], np.ndarray], cursor: Cursor, out: dict[str, np.ndarray], row: int,
             *, eos_id: int, mode: str = "concat", max_empty: int = 1_000_000) -> Cursor:
    """Fill row `row` of the zero-initialised `out` arrays from `cursor`; return the next cursor.

    `get_doc(k)` returns document k's token ids without eos. Empty documents are skipped;
    `max_empty` consecutive empty ones (e.g. a whole epoch of them) raise PackingError.
    """
    seq_len = out["input_ids"].shape[1]
    inp, tgt, pos = out["input_ids"][row], out["targets"][row], out["positions"][row]
    seg, mask = out["segment_ids"][row], out["loss_mask"][row]
    doc, offset = cursor.doc, cursor.offset
    filled, segment, empties = 0, 0, 0
    while filled < seq_len:
        tokens = get_doc(doc)
        n = len(tokens)
        if n == 0:
            empties += 1
            if empties > max_empty:
                raise PackingError(f"{empties} consecutive empty documents: the source has no text")
            doc, offset = doc + 1, 0
            continue
        empties = 0
        remaining = n + 1 - offset  # tokens left in the document, eos included
        need = seq_len - filled
        if mode == "pad" and filled > 0 and remaining > need:
            break  # start the document on a fresh row; the rest of this row stays padding
        take = min(need, remaining)
        segment += 1
        end = offset + take  # exclusive, in eos-extended coordinates (eos sits at index n)
        body = tokens[offset:min(end, n)]
        nb = len(body)
        sl = slice(filled, filled + take)
        inp[filled:filled + nb] = body
        if end > n:
            inp[filled + nb] = eos_id
        # Targets: the next token of the eos-extended document, for every slot before eos.
        has_target = min(end, n) - offset
        nxt = tokens[offset + 1:min(end + 1, n)]  # next tokens that are real tokens
        tgt[filled:filled + len(nxt)] = nxt
        if end >= n and has_target > 0:  # the piece reaches the last real token: its target is eos
            tgt[filled + has_target - 1] = eos_id
        mask[filled:filled + has_target] = 1.0
        pos[sl] = np.arange(take, dtype=np.int32)
        seg[sl] = segment
        filled += take
        if end > n:
            doc, offset = doc + 1, 0
        else:
            offset = end
    return Cursor(doc, offset)
