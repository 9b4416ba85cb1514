"""Post-training examples -> static-shape training rows, shuffled by seed, resumable, row-addressable.

Tokenization follows `nemojax.data.chat` (bos, template, escaped content, assistant loss mask),
so every row here starts exactly like the prompt `generate` / `serve` would build.

Datasets (all: `fields` = per-row shapes and dtypes, `rows(start, stop)` / `take(indices)` =
exactly those rows of the global stream, `eval_batches(n)` = fixed-order padded batches):

* `SFTDataset`: conversations packed into rows of `seq_len` slots (whole conversations only,
  greedily in the epoch's order), like pretraining rows: input_ids, targets, positions,
  segment_ids (1, 2, ... per conversation, 0 = padding), loss_mask (1 where the target is an
  assistant-turn token). A conversation of n tokens takes n slots; its last slot has no target.
* `PreferenceDataset`: one pair per row. For side in (chosen, rejected): `{side}_input_ids`,
  `_targets`, `_positions`, `_segment_ids` (1 real, 0 padding), `_loss_mask` (1 where the target
  is a response token), each [max_len]; `chosen_reward`, `rejected_reward` (missing rewards are
  NeMo-Aligner's defaults 1.0 / 0.0, see `has_rewards`), `example_mask`, `example_index`, and
  `ref_chosen_logps` / `ref_rejected_logps` once reference log-probs are attached.
* `RewardDataset`: one response per row: input_ids, positions, segment_ids [max_len] ending
  with `<extra_id_2>` at `last_index`; `labels`, `label_mask` [N attributes]; `example_mask`,
  `example_index`.
* `BlendedRows`: rows of several datasets interleaved by weight (general SFT replaying a
  fraction of the code SFT data).

The stream: epoch e visits the examples in a permutation drawn from (seed, e) (identity order
with shuffle=False); rows are numbered globally across epochs, so a trainer asks for row ranges
and each process takes its own slice (`RowIterator`). Over-length examples follow `overlength`:
"truncate" cuts the prompt from the left (bos kept; the response is never cut, an example whose
response alone does not fit is dropped), "drop" drops every over-length example. Counts are in
`report`; nothing over-length ever reaches JAX.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nemojax.config import HELPSTEER2_ATTRIBUTES
from nemojax.data.chat import encode_chat, encode_content, prompt_ids
from nemojax.data.chat_records import (LoadReport, PreferenceExample, RewardExample, SFTExample,
                                       load_examples)
from nemojax.data.chat_template import REWARD_TOKEN, TURN_TOKEN
from nemojax.data.sources import DataError

OVERLENGTH_POLICIES = ("truncate", "drop")
STATE_VERSION = 1
# NeMo-Aligner's rewards for pairs without any (DPO needs none; RPO needs real ones).
DEFAULT_CHOSEN_REWARD, DEFAULT_REJECTED_REWARD = 1.0, 0.0


@dataclass
class LengthReport:
    """Examples kept as they were, kept with a shortened prompt, and dropped for length."""

    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    dropped_origins: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, int]:
        return {"examples": self.kept + self.truncated, "truncated": self.truncated, "dropped_overlength": self.dropped}


class _Ragged:
    """Variable-length int32 arrays stored flat, with offsets (no per-example Python objects)."""

    def __init__(self, parts: Sequence[np.ndarray], dtype: Any = np.int32) -> None:
        self.offsets = np.zeros(len(parts) + 1, np.int64)
        self.offsets[1:] = np.cumsum([len(p) for p in parts])
        self.flat = np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.flat[self.offsets[i]:self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def digest(self, h: Any) -> None:
        h.update(self.offsets.tobytes())
        h.update(self.flat.tobytes())


def fit_prompt(prompt: np.ndarray, response_len: int, max_len: int, overlength: str) -> tuple[np.ndarray | None, bool]:
    """(prompt shortened so prompt + response fit max_len, or None to drop; whether it was cut).

    The prompt starts with bos, which is kept; tokens after it go from the left. At least one
    prompt token besides bos must remain, else the example is dropped.
    """
    if len(prompt) + response_len <= max_len:
        return prompt, False
    room = max_len - response_len - 1  # prompt tokens after bos that fit
    if overlength == "drop" or room < 1:
        return None, False
    return np.concatenate([prompt[:1], prompt[len(prompt) - room:]]), True


def _check_common(max_len: int, overlength: str) -> None:
    if overlength not in OVERLENGTH_POLICIES:
        raise ValueError(f"overlength={overlength!r}: use 'truncate' (cut the prompt from the left) or 'drop'")
    if max_len < 4:
        raise ValueError(f"the sequence length must be >= 4, got {max_len}")


# --------------------------------------------------------------------------- the row stream


class ChatRowDataset:
    """A deterministic, epoch-reshuffled stream of static-shape rows (see the module docstring)."""

    kind = ""

    def __init__(self, *, num_examples: int, seed: int, shuffle: bool, settings: dict[str, Any],
                 load_report: LoadReport | None, length_report: LengthReport) -> None:
        if num_examples == 0:
            raise DataError(f"no usable {self.kind} examples ({json.dumps(length_report.summary())}; "
                            f"{length_report.dropped} dropped as over-length: raise the sequence length or use "
                            f"overlength=truncate)")
        self.num_examples = num_examples
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.load_report = load_report or LoadReport()
        self.length_report = length_report
        self.settings = settings
        self._perms: dict[int, np.ndarray] = {}

    # ------------------------------------------------------------------ identity
    @functools.cached_property
    def fingerprint(self) -> str:
        """A hash of the tokenized examples and settings: caches keyed on it can never go stale."""
        h = hashlib.sha256(json.dumps([self.kind, self.settings], sort_keys=True).encode())
        self._digest(h)
        return h.hexdigest()[:16]

    @property
    def spec(self) -> dict[str, Any]:
        """What must not change between saving and restoring a `RowIterator` state."""
        return {"kind": self.kind, "fingerprint": self.fingerprint, "seed": self.seed, "shuffle": self.shuffle}

    def report(self) -> dict[str, Any]:
        return {**self.load_report.summary(), **self.length_report.summary()}

    # ------------------------------------------------------------------ order
    def order(self, epoch: int) -> np.ndarray:
        """Example indices in epoch `epoch`'s order."""
        if not self.shuffle:
            return np.arange(self.num_examples)
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = perm
        return perm

    def rows_in_epoch(self, epoch: int) -> int:
        return self.num_examples

    def locate(self, row: int) -> tuple[int, int]:
        """(epoch, row within the epoch) of global row `row`."""
        epoch, r = divmod(int(row), self.num_examples)
        return epoch, r

    def _row_examples(self, epoch: int, r: int) -> np.ndarray:
        return self.order(epoch)[r:r + 1]

    # ------------------------------------------------------------------ rows
    @property
    def fields(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        """Per-row shape and dtype of every field a batch holds."""
        raise NotImplementedError

    def empty(self, n: int) -> dict[str, np.ndarray]:
        return {k: np.zeros((n, *shape), dt) for k, (shape, dt) in self.fields.items()}

    def take(self, rows: Sequence[int]) -> dict[str, np.ndarray]:
        """The given global rows, stacked: [len(rows), ...] per field."""
        out = self.empty(len(rows))
        for i, g in enumerate(rows):
            if g < 0:
                raise IndexError(f"row {g} is negative")
            self._fill(out, i, self._row_examples(*self.locate(g)))
        return out

    def rows(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Global rows [start, stop) of the stream."""
        return self.take(range(start, stop))

    def eval_batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """One pass in file order (no shuffle), batch_size rows each; the last batch is padded
        with empty rows (zero masks), so every batch has the same shape."""
        plan = self._eval_plan()
        for s in range(0, len(plan), batch_size):
            out = self.empty(batch_size)
            for i, ex in enumerate(plan[s:s + batch_size]):
                self._fill(out, i, ex)
            yield out

    def _eval_plan(self) -> list[np.ndarray]:
        return [np.array([k]) for k in range(self.num_examples)]

    def _fill(self, out: dict[str, np.ndarray], i: int, examples: np.ndarray) -> None:
        raise NotImplementedError

    def _digest(self, h: Any) -> None:
        raise NotImplementedError


class RowIterator:
    """This process's share of consecutive global batches, resumable with get/set_state.

    Global batch b is rows [b*B, (b+1)*B) of the stream (B = the global batch size at that point;
    it may change between calls, e.g. ramp-up); process p of P takes rows p*B/P ... (p+1)*B/P - 1
    of it. The state is the next global row: a fresh iterator given it continues exactly.
    """

    def __init__(self, dataset: ChatRowDataset, *, global_batch: int, process_index: int = 0,
                 process_count: int = 1) -> None:
        if global_batch < 1 or global_batch % process_count:
            raise ValueError(f"global batch {global_batch} must be a positive multiple of the {process_count} processes")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} must be in [0, {process_count})")
        self.dataset = dataset
        self.global_batch = global_batch
        self.process_index = process_index
        self.process_count = process_count
        self.next_row = 0

    def __iter__(self) -> RowIterator:
        return self

    def local_rows(self, batch: int | None = None) -> range:
        """Global row numbers of this process's share of the next global batch."""
        B = batch or self.global_batch
        local = B // self.process_count
        start = self.next_row + self.process_index * local
        return range(start, start + local)

    def __next__(self) -> dict[str, np.ndarray]:
        return self.next_batch()

    def next_batch(self, global_batch: int | None = None) -> dict[str, np.ndarray]:
        B = global_batch or self.global_batch
        if B % self.process_count:
            raise ValueError(f"global batch {B} is not divisible by the {self.process_count} processes")
        out = self.dataset.take(self.local_rows(B))
        self.next_row += B
        return out

    def get_state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "next_row": int(self.next_row), "spec": self.dataset.spec}

    def set_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise DataError(f"chat data iterator state {str(state)[:80]} was not written by this nemojax version")
        old, new = state.get("spec", {}), self.dataset.spec
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if changed:
            detail = "; ".join(f"{k}: saved {old.get(k)!r}, now {new.get(k)!r}" for k in changed)
            raise DataError(f"cannot resume the {self.dataset.kind} data stream: the data or its settings changed "
                            f"({detail}); restore them or start the stream afresh")
        self.next_row = int(state["next_row"])


# --------------------------------------------------------------------------- SFT


class SFTDataset(ChatRowDataset):
    """Conversations packed into `seq_len`-slot rows with segment ids (see the module docstring)."""

    kind = "sft"

    def __init__(self, examples: Sequence[SFTExample], tokenizer: Any, *, seq_len: int, seed: int = 0,
                 shuffle: bool = True, overlength: str = "truncate", load_report: LoadReport | None = None) -> None:
        _check_common(seq_len, overlength)
        self.seq_len = seq_len
        ids, masks, rep = [], [], LengthReport()
        for ex in examples:
            enc = encode_chat(tokenizer, ex.messages)
            got = _fit_conversation(enc.ids, enc.loss_mask, seq_len, overlength)
            if got is None:
                rep.dropped += 1
                rep.dropped_origins.append(ex.origin)
                continue
            i, m, cut = got
            rep.truncated += cut
            rep.kept += not cut
            ids.append(i)
            masks.append(m.astype(np.int32))
        self.ids, self.masks = _Ragged(ids), _Ragged(masks)
        self._plans: dict[int, list[np.ndarray]] = {}
        self._epoch_rows: list[int] = []
        super().__init__(num_examples=len(ids), seed=seed, shuffle=shuffle, load_report=load_report,
                         length_report=rep, settings={"seq_len": seq_len, "overlength": overlength,
                                                      "tokenizer": getattr(tokenizer, "fingerprint", "")})

    @property
    def fields(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        S = (self.seq_len,)
        return {"input_ids": (S, np.int32), "targets": (S, np.int32), "positions": (S, np.int32),
                "segment_ids": (S, np.int32), "loss_mask": (S, np.float32)}

    def _pack(self, order: np.ndarray) -> list[np.ndarray]:
        lengths = self.ids.lengths()
        rows, current, fill = [], [], 0
        for k in order:
            n = int(lengths[k])
            if fill + n > self.seq_len and current:
                rows.append(np.array(current))
                current, fill = [], 0
            current.append(int(k))
            fill += n
        if current:
            rows.append(np.array(current))
        return rows

    def plan(self, epoch: int) -> list[np.ndarray]:
        """Example indices of each row of epoch `epoch`."""
        plan = self._plans.get(epoch)
        if plan is None:
            plan = self._pack(self.order(epoch))
            if len(self._plans) >= 2:
                self._plans.pop(min(self._plans))
            self._plans[epoch] = plan
        return plan

    def rows_in_epoch(self, epoch: int) -> int:
        while len(self._epoch_rows) <= epoch:
            self._epoch_rows.append(len(self.plan(len(self._epoch_rows))))
        return self._epoch_rows[epoch]

    def locate(self, row: int) -> tuple[int, int]:
        epoch, r = 0, int(row)
        while r >= self.rows_in_epoch(epoch):
            r -= self.rows_in_epoch(epoch)
            epoch += 1
        return epoch, r

    def _row_examples(self, epoch: int, r: int) -> np.ndarray:
        return self.plan(epoch)[r]

    def _eval_plan(self) -> list[np.ndarray]:
        return self._pack(np.arange(self.num_examples))

    def fill_ratio(self, epoch: int = 0) -> float:
        """Fraction of row slots holding tokens (1 - padding) in an epoch."""
        return float(self.ids.lengths().sum() / (self.rows_in_epoch(epoch) * self.seq_len))

    def _fill(self, out: dict[str, np.ndarray], i: int, examples: np.ndarray) -> None:
        fill = 0
        for seg, k in enumerate(examples, start=1):
            ids, mask = self.ids[k], self.masks[k]
            n = len(ids)
            sl = slice(fill, fill + n)
            out["input_ids"][i, sl] = ids
            out["targets"][i, fill:fill + n - 1] = ids[1:]
            out["loss_mask"][i, fill:fill + n - 1] = mask[1:]
            out["positions"][i, sl] = np.arange(n)
            out["segment_ids"][i, sl] = seg
            fill += n

    def _digest(self, h: Any) -> None:
        self.ids.digest(h)
        self.masks.digest(h)


def _fit_conversation(ids: np.ndarray, mask: np.ndarray, max_len: int, overlength: str
                      ) -> tuple[np.ndarray, np.ndarray, bool] | None:
    """(ids, mask, truncated) within max_len, cutting from the left after bos; None = drop.

    The final trained span (the last assistant turn and whatever follows it) is never cut.
    """
    n = len(ids)
    if n <= max_len:
        return ids, mask, False
    starts = np.flatnonzero(mask & ~np.concatenate([[False], mask[:-1]]))
    tail = n - int(starts[-1]) if len(starts) else n
    if overlength == "drop" or tail + 2 > max_len:  # bos + at least one context token + the tail
        return None
    keep = max_len - 1
    return (np.concatenate([ids[:1], ids[n - keep:]]), np.concatenate([mask[:1], mask[n - keep:]]), True)


# --------------------------------------------------------------------------- preference


def response_ids(tokenizer: Any, text: str, end: str = TURN_TOKEN) -> np.ndarray:
    """Tokens of an assistant response as it follows its prompt: content, "\\n", then `end`."""
    return np.asarray(encode_content(tokenizer, text) + tokenizer.encode("\n") + [tokenizer.special_id(end)],
                      np.int32)


class PreferenceDataset(ChatRowDataset):
    """(prompt, chosen, rejected) pairs, one per row (see the module docstring)."""

    kind = "preference"

    def __init__(self, examples: Sequence[PreferenceExample], tokenizer: Any, *, max_len: int, seed: int = 0,
                 shuffle: bool = True, overlength: str = "truncate", require_rewards: bool = False,
                 load_report: LoadReport | None = None) -> None:
        _check_common(max_len, overlength)
        self.max_len = max_len
        if require_rewards:
            lacking = [ex.origin or f"example {i}" for i, ex in enumerate(examples)
                       if ex.chosen_reward is None or ex.rejected_reward is None]
            if lacking:
                raise DataError(f"{len(lacking)} preference record(s) have no chosen_reward/rejected_reward, which "
                                f"this loss needs (RPO): {', '.join(lacking[:5])}"
                                + (" ..." if len(lacking) > 5 else "") + "; score them with a reward model first")
        prompts, chosen, rejected, rewards, present, rep = [], [], [], [], [], LengthReport()
        for ex in examples:
            p = np.asarray(prompt_ids(tokenizer, ex.prompt), np.int32)
            c, r = response_ids(tokenizer, ex.chosen), response_ids(tokenizer, ex.rejected)
            p, cut = fit_prompt(p, max(len(c), len(r)), max_len, overlength)
            if p is None:
                rep.dropped += 1
                rep.dropped_origins.append(ex.origin)
                continue
            rep.truncated += cut
            rep.kept += not cut
            prompts.append(p)
            chosen.append(c)
            rejected.append(r)
            has = ex.chosen_reward is not None and ex.rejected_reward is not None
            present.append(has)
            rewards.append((ex.chosen_reward, ex.rejected_reward) if has
                           else (DEFAULT_CHOSEN_REWARD, DEFAULT_REJECTED_REWARD))
        self.prompts, self.chosen, self.rejected = _Ragged(prompts), _Ragged(chosen), _Ragged(rejected)
        self.rewards = np.asarray(rewards, np.float32).reshape(-1, 2)
        self.has_rewards = np.asarray(present, bool)
        self.ref_logps: np.ndarray | None = None
        super().__init__(num_examples=len(prompts), seed=seed, shuffle=shuffle, load_report=load_report,
                         length_report=rep, settings={"max_len": max_len, "overlength": overlength,
                                                      "tokenizer": getattr(tokenizer, "fingerprint", "")})

    @property
    def fields(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        L = (self.max_len,)
        out: dict[str, tuple[tuple[int, ...], Any]] = {}
        for side in ("chosen", "rejected"):
            out |= {f"{side}_input_ids": (L, np.int32), f"{side}_targets": (L, np.int32),
                    f"{side}_positions": (L, np.int32), f"{side}_segment_ids": (L, np.int32),
                    f"{side}_loss_mask": (L, np.float32)}
        out |= {"chosen_reward": ((), np.float32), "rejected_reward": ((), np.float32),
                "has_rewards": ((), np.float32), "example_mask": ((), np.float32), "example_index": ((), np.int32)}
        if self.ref_logps is not None:
            out |= {"ref_chosen_logps": ((), np.float32), "ref_rejected_logps": ((), np.float32)}
        return out

    def set_reference_logps(self, chosen: np.ndarray, rejected: np.ndarray) -> None:
        """Attach per-example reference log-probs (indexed by `example_index`); rows then carry them."""
        chosen, rejected = np.asarray(chosen, np.float32), np.asarray(rejected, np.float32)
        if chosen.shape != (self.num_examples,) or rejected.shape != (self.num_examples,):
            raise ValueError(f"reference log-probs must have shape ({self.num_examples},), got {chosen.shape} "
                             f"and {rejected.shape}")
        if not (np.isfinite(chosen).all() and np.isfinite(rejected).all()):
            raise ValueError("reference log-probs contain NaN or inf")
        self.ref_logps = np.stack([chosen, rejected], axis=1)

    def save_reference_logps(self, path: str | Path) -> Path:
        """Write the attached reference log-probs with this dataset's fingerprint (.npz)."""
        if self.ref_logps is None:
            raise ValueError("no reference log-probs attached; call set_reference_logps first")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, ref_logps=self.ref_logps, fingerprint=np.array(self.fingerprint))
        tmp.replace(path)
        return path

    def load_reference_logps(self, path: str | Path) -> bool:
        """Attach log-probs saved for exactly this data; False (nothing attached) if absent or stale."""
        path = Path(path)
        if not path.is_file():
            return False
        with np.load(path) as f:
            if str(f["fingerprint"]) != self.fingerprint:
                return False
            ref = f["ref_logps"]
        self.set_reference_logps(ref[:, 0], ref[:, 1])
        return True

    def _fill(self, out: dict[str, np.ndarray], i: int, examples: np.ndarray) -> None:
        (k,) = examples
        p = self.prompts[k]
        for side, resp in (("chosen", self.chosen[k]), ("rejected", self.rejected[k])):
            seq = np.concatenate([p, resp])
            n = len(seq)
            out[f"{side}_input_ids"][i, :n] = seq
            out[f"{side}_targets"][i, :n - 1] = seq[1:]
            out[f"{side}_loss_mask"][i, len(p) - 1:n - 1] = 1.0
            out[f"{side}_positions"][i, :n] = np.arange(n)
            out[f"{side}_segment_ids"][i, :n] = 1
        out["chosen_reward"][i], out["rejected_reward"][i] = self.rewards[k]
        out["has_rewards"][i] = self.has_rewards[k]
        out["example_mask"][i] = 1.0
        out["example_index"][i] = k
        if self.ref_logps is not None:
            out["ref_chosen_logps"][i], out["ref_rejected_logps"][i] = self.ref_logps[k]

    def _digest(self, h: Any) -> None:
        for r in (self.prompts, self.chosen, self.rejected):
            r.digest(h)
        h.update(self.rewards.tobytes())


# --------------------------------------------------------------------------- reward


class RewardDataset(ChatRowDataset):
    """Scored responses with attribute labels, one per row (see the module docstring)."""

    kind = "reward"

    def __init__(self, examples: Sequence[RewardExample], tokenizer: Any, *, max_len: int,
                 attributes: Sequence[str] = HELPSTEER2_ATTRIBUTES, seed: int = 0, shuffle: bool = True,
                 overlength: str = "truncate", load_report: LoadReport | None = None) -> None:
        _check_common(max_len, overlength)
        self.max_len = max_len
        self.attributes = list(attributes)
        N = len(self.attributes)
        seqs, labels, masks, rep = [], [], [], LengthReport()
        for ex in examples:
            *prompt, answer = ex.messages
            p = np.asarray(prompt_ids(tokenizer, prompt), np.int32)
            r = response_ids(tokenizer, answer["content"], end=REWARD_TOKEN)
            p, cut = fit_prompt(p, len(r), max_len, overlength)
            if p is None:
                rep.dropped += 1
                rep.dropped_origins.append(ex.origin)
                continue
            rep.truncated += cut
            rep.kept += not cut
            seqs.append(np.concatenate([p, r]))
            lab = list(ex.labels) if ex.labels else [None] * N
            if len(lab) != N:
                raise ValueError(f"{ex.origin or 'a reward example'} has {len(lab)} labels for {N} attributes")
            labels.append([0.0 if v is None else v for v in lab])
            masks.append([v is not None for v in lab])
        self.seqs = _Ragged(seqs)
        self.labels = np.asarray(labels, np.float32).reshape(-1, N)
        self.label_mask = np.asarray(masks, bool).reshape(-1, N)
        super().__init__(num_examples=len(seqs), seed=seed, shuffle=shuffle, load_report=load_report,
                         length_report=rep, settings={"max_len": max_len, "overlength": overlength,
                                                      "attributes": self.attributes,
                                                      "tokenizer": getattr(tokenizer, "fingerprint", "")})

    @property
    def fields(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        L, N = (self.max_len,), (len(self.attributes),)
        return {"input_ids": (L, np.int32), "positions": (L, np.int32), "segment_ids": (L, np.int32),
                "last_index": ((), np.int32), "labels": (N, np.float32), "label_mask": (N, np.float32),
                "example_mask": ((), np.float32), "example_index": ((), np.int32)}

    def _fill(self, out: dict[str, np.ndarray], i: int, examples: np.ndarray) -> None:
        (k,) = examples
        seq = self.seqs[k]
        n = len(seq)
        out["input_ids"][i, :n] = seq
        out["positions"][i, :n] = np.arange(n)
        out["segment_ids"][i, :n] = 1
        out["last_index"][i] = n - 1
        out["labels"][i] = self.labels[k]
        out["label_mask"][i] = self.label_mask[k]
        out["example_mask"][i] = 1.0
        out["example_index"][i] = k

    def _digest(self, h: Any) -> None:
        self.seqs.digest(h)
        h.update(self.labels.tobytes())
        h.update(self.label_mask.tobytes())


# --------------------------------------------------------------------------- from files


def split_examples(examples: Sequence[Any], split: str, fraction: float) -> list[Any]:
    """The "train" or "validation" part when holding out `fraction` of the examples.

    By a hash of each example's position (nemojax.data.pretrain.split_indices): fixed for a
    file, independent of the shuffle seed.
    """
    from nemojax.data.pretrain import split_indices

    return [examples[int(i)] for i in split_indices(len(examples), split, fraction)]


def load_dataset(kind: str, path: str | Path, tokenizer: Any, *, max_len: int, seed: int = 0, shuffle: bool = True,
                 overlength: str = "truncate", on_bad: str = "fail",
                 attributes: Sequence[str] = HELPSTEER2_ATTRIBUTES, require_rewards: bool = False,
                 split: str | None = None, validation_fraction: float = 0.0) -> ChatRowDataset:
    """Read `path` (JSONL / Parquet file, directory or glob) into the dataset of `kind`.

    max_len: tokens per row (SFT: the packed row length). split + validation_fraction: keep only
    the "train" or "validation" part of a hash split of the records (see `split_examples`).
    """
    examples, report = load_examples(path, kind, attributes=attributes, on_bad=on_bad)
    if split is not None and validation_fraction > 0:
        examples = split_examples(examples, split, validation_fraction)
    common = dict(seed=seed, shuffle=shuffle, overlength=overlength, load_report=report)
    if kind == "sft":
        return SFTDataset(examples, tokenizer, seq_len=max_len, **common)
    if kind == "preference":
        return PreferenceDataset(examples, tokenizer, max_len=max_len, require_rewards=require_rewards, **common)
    return RewardDataset(examples, tokenizer, max_len=max_len, attributes=attributes, **common)


# --------------------------------------------------------------------------- blends


class BlendedRows:
    """Rows of several row datasets interleaved by weight, e.g. general SFT with 2% code replay.

    Row g comes from the source furthest below its share after g rows (Megatron's
    BlendableDataset rule, which pretraining blends use too): the proportions hold within one
    row at every point, and each source's rows are taken in its own stream order. The blend is
    row-addressable and resumable like its parts (`RowIterator` works on it).
    """

    kind = "blend"

    def __init__(self, datasets: Sequence[ChatRowDataset], weights: Sequence[float]) -> None:
        if not datasets or len(datasets) != len(weights):
            raise ValueError("give one weight per dataset")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"blend weights must be >= 0 and not all 0, got {list(weights)}")
        fields = datasets[0].fields
        for d in datasets[1:]:
            if d.fields != fields:
                raise ValueError(f"cannot blend {d.kind} rows shaped {d.fields} with {datasets[0].kind} rows "
                                 f"shaped {fields}: give them the same kind and sequence length")
        self.datasets = list(datasets)
        self.weights = np.asarray(weights, np.float64) / float(sum(weights))
        self._source = np.zeros(0, np.int32)  # source of each global row computed so far
        self._local = np.zeros(0, np.int64)  # that source's row number
        self._counts = np.zeros(len(datasets), np.int64)

    @property
    def fields(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        return self.datasets[0].fields

    @property
    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "weights": self.weights.round(12).tolist(),
                "parts": [d.spec for d in self.datasets]}

    def _extend(self, upto: int) -> None:
        n = len(self._source)
        if upto <= n:
            return
        new = max(upto, 2 * n, 1024)
        src, loc = np.empty(new - n, np.int32), np.empty(new - n, np.int64)
        counts = self._counts
        for j, g in enumerate(range(n, new)):
            i = int(np.argmax(self.weights * (g + 1) - counts))
            src[j], loc[j] = i, counts[i]
            counts[i] += 1
        self._source = np.concatenate([self._source, src])
        self._local = np.concatenate([self._local, loc])

    def sources_of(self, rows: Sequence[int]) -> np.ndarray:
        """Which dataset each global row comes from."""
        rows = np.asarray(rows, np.int64)
        self._extend(int(rows.max()) + 1 if rows.size else 0)
        return self._source[rows]

    def take(self, rows: Sequence[int]) -> dict[str, np.ndarray]:
        rows = np.asarray(list(rows), np.int64)
        out = self.datasets[0].empty(len(rows))
        if not rows.size:
            return out
        self._extend(int(rows.max()) + 1)
        for i, d in enumerate(self.datasets):
            where = np.flatnonzero(self._source[rows] == i)
            if where.size:
                part = d.take(self._local[rows[where]].tolist())
                for k in out:
                    out[k][where] = part[k]
        return out

    def rows(self, start: int, stop: int) -> dict[str, np.ndarray]:
        return self.take(range(start, stop))
