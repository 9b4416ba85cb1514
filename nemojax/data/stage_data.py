"""A post-training stage's data, read from its `stage:` config, and the trainer's batch factory.

    data = load_stage_data(cfg, tokenizer)        # train rows (+ code replay), validation, extras
    data.train.fields / data.rows_per_epoch        # what the step sees / steps for stage.epochs
    factory = data.batch_factory(field_names)      # nemojax.train.loop's BatchFactory protocol

Which records each stage kind reads is in nemojax.config.StageConfig; the row layouts are
nemojax.data.chat_rows'. The training stream is row-addressable (global row g of the stream is
the same on every host and after any restart), so each process builds exactly the rows of the
global batch its devices hold, and the stream position saved in a checkpoint resumes it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from nemojax.config import Config, ConfigError
from nemojax.data.chat_records import PreferenceExample, RewardExample, load_examples
from nemojax.data.chat_rows import (BlendedRows, ChatRowDataset, RewardDataset, RowIterator,
                                    load_dataset)
from nemojax.data.sources import DataError


def dataset_kind(stage_kind: str) -> str:
    """The record kind a stage reads: sft, reward, or preference (every preference loss)."""
    return stage_kind if stage_kind in ("sft", "reward") else "preference"


@dataclasses.dataclass
class StageData:
    """The rows one stage trains and validates on."""

    kind: str  # sft | reward | preference
    train: Any  # a ChatRowDataset, or BlendedRows(main, replay) for general SFT with code replay
    validation: ChatRowDataset | None
    # reward stage: (chosen, rejected) RewardDatasets of the preference_validation pairs;
    # sft stage: a PreferenceDataset of them (the policy's preference accuracy)
    preference_validation: Any = None
    main: ChatRowDataset | None = None  # the non-replay part of `train`
    replay: ChatRowDataset | None = None

    @property
    def rows_per_epoch(self) -> int:
        """Rows of one pass over the main training data (replay rows added on top)."""
        main = self.main if self.main is not None else self.train
        n = main.rows_in_epoch(0)
        if self.replay is not None:
            share = self.train.weights[0]
            n = math.ceil(n / share)
        return n

    def steps_for_epochs(self, epochs: float, global_batch: int) -> int:
        return max(1, math.ceil(epochs * self.rows_per_epoch / global_batch))

    def summary(self) -> list[str]:
        """Human-readable lines: what was read, kept, cut and dropped."""
        main = self.main if self.main is not None else self.train
        lines = [f"train: {_report(main)}"]
        if self.replay is not None:
            lines.append(f"replay ({self.train.weights[1]:.1%} of rows): {_report(self.replay)}")
        if self.validation is not None:
            lines.append(f"validation: {_report(self.validation)}")
        return lines

    def batch_factory(self, fields: Sequence[str]) -> Any:
        """A nemojax.train.loop BatchFactory over `train` yielding exactly `fields`."""
        def factory(data_cfg: Any, *, split: str, batch_size: int, seq_len: int, seed: int,
                    rows: np.ndarray) -> StageRows:
            if split != "train":
                raise ConfigError("stage validation is computed by the stage's own evaluator")
            return StageRows(self.train, batch_size=batch_size, rows=rows, fields=fields)
        return factory


def _report(ds: ChatRowDataset) -> str:
    r = ds.report()
    return (f"{r.get('examples', 0)} examples from {r.get('records', 0)} records"
            f" ({r.get('truncated', 0)} prompts truncated, {r.get('dropped_overlength', 0)} dropped as over-length,"
            f" {r.get('bad_records', 0)} bad records skipped)")


class StageRows(RowIterator):
    """This process' rows of consecutive global batches of a row dataset, as the trainer wants them.

    Global batch b covers stream rows [next_row, next_row + batch_size); `rows` are the indices
    into it this process supplies (nemojax.train.build.Training.rows, any order). The state is
    RowIterator's (next row + the dataset's fingerprint), so a changed dataset refuses to resume.
    """

    def __init__(self, dataset: Any, *, batch_size: int, rows: np.ndarray, fields: Sequence[str]) -> None:
        super().__init__(dataset, global_batch=batch_size)
        self.rows_in_batch = np.asarray(rows, np.int64)
        missing = sorted(set(fields) - set(dataset.fields))
        if missing:
            raise DataError(f"the {dataset.kind} rows lack field(s) {missing} the stage's step needs")
        self.fields = list(fields)

    def next_batch(self, global_batch: int | None = None) -> dict[str, np.ndarray]:
        B = global_batch or self.global_batch
        out = self.dataset.take((self.next_row + self.rows_in_batch).tolist())
        self.next_row += B
        return {k: out[k] for k in self.fields}


# --------------------------------------------------------------------------- loading


def _check_path(path: str, key: str) -> None:
    from nemojax.data.sources import expand_paths

    try:
        expand_paths(path)
    except (FileNotFoundError, DataError, ValueError) as e:
        raise ConfigError(f"{key}={path!r}: {e}") from None


def load_stage_data(cfg: Config, tokenizer: Any, *, train_path: str | None = None) -> StageData:
    """Read `cfg.stage`'s records into row datasets (see the module docstring).

    train_path: the training records instead of `stage.train` (an RPO round's file, or a copy
    whose rewards a reward model wrote). Every problem is a DataError / ConfigError naming the
    file or key.
    """
    st = cfg.stage
    kind = dataset_kind(st.kind)
    max_len = cfg.data.seq_len
    attrs = list(cfg.model.reward.attributes)
    path = train_path or st.train
    _check_path(path, "stage.train")
    common = dict(max_len=max_len, overlength=st.overlength, on_bad=st.on_bad, attributes=attrs,
                  require_rewards=st.needs_rewards)
    if st.validation:
        _check_path(st.validation, "stage.validation")
        main = load_dataset(kind, path, tokenizer, seed=cfg.data_seed, shuffle=True, **common)
        val = load_dataset(kind, st.validation, tokenizer, seed=0, shuffle=False, **common)
    elif st.validation_fraction > 0:
        main = load_dataset(kind, path, tokenizer, seed=cfg.data_seed, shuffle=True, split="train",
                            validation_fraction=st.validation_fraction, **common)
        val = load_dataset(kind, path, tokenizer, seed=0, shuffle=False, split="validation",
                           validation_fraction=st.validation_fraction, **common)
    else:
        main = load_dataset(kind, path, tokenizer, seed=cfg.data_seed, shuffle=True, **common)
        val = None
    data = StageData(kind=kind, train=main, validation=val, main=main)
    if st.replay:
        _check_path(st.replay, "stage.replay")
        replay = load_dataset("sft", st.replay, tokenizer, seed=cfg.data_seed + 1, shuffle=True, **common)
        data.replay = replay
        data.train = BlendedRows([main, replay], [1.0 - st.replay_fraction, st.replay_fraction])
    if st.preference_validation and kind in ("reward", "sft"):
        _check_path(st.preference_validation, "stage.preference_validation")
        data.preference_validation = (reward_pairs(st.preference_validation, tokenizer, max_len=max_len,
                                                   attributes=attrs, overlength=st.overlength, on_bad=st.on_bad)
                                      if kind == "reward" else
                                      load_dataset("preference", st.preference_validation, tokenizer, seed=0,
                                                   shuffle=False, **common))
    return data


def reward_pairs(path: str | Path, tokenizer: Any, *, max_len: int, attributes: Sequence[str],
                 overlength: str = "truncate", on_bad: str = "fail") -> tuple[RewardDataset, RewardDataset]:
    """The chosen and the rejected responses of preference pairs as two unlabelled reward datasets,
    in file order (row i of each is pair i): what a reward model's pairwise accuracy scores.

    A pair whose either side is dropped as over-length is left out of both.
    """
    pairs, report = load_examples(path, "preference", attributes=attributes, on_bad=on_bad)

    def build(kept: list[PreferenceExample]) -> list[RewardDataset]:
        return [RewardDataset([_as_reward_example(ex, s) for ex in kept], tokenizer, max_len=max_len,
                              attributes=attributes, shuffle=False, overlength=overlength, load_report=report)
                for s in ("chosen", "rejected")]

    out = build(pairs)
    dropped = {o for ds in out for o in ds.length_report.dropped_origins}
    if dropped:  # keep row i of both datasets the same pair
        out = build([ex for ex in pairs if ex.origin not in dropped])
    return out[0], out[1]


def _as_reward_example(ex: PreferenceExample, side: str) -> RewardExample:
    response = ex.chosen if side == "chosen" else ex.rejected
    return RewardExample(messages=[*ex.prompt, {"role": "assistant", "content": response}], origin=ex.origin)


def eval_batches(dataset: ChatRowDataset, batch_size: int, limit: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """The dataset's fixed-order evaluation batches, at most `limit` of them (0 = all)."""
    for i, b in enumerate(dataset.eval_batches(batch_size)):
        if limit and i >= limit:
            return
        yield b


__all__ = ["StageData", "StageRows", "dataset_kind", "eval_batches", "load_stage_data", "reward_pairs"]
