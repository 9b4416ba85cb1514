"""`nemojax reward score`: score a JSONL file of responses with a reward checkpoint.

Input lines (JSON objects) are one of
  {"prompt": str | [messages], "response": str}      HelpSteer2 columns (a prompt string may be a
                                                     rendered or multi-turn prompt, see docs/DATA.md)
  {"messages": [..., {"role": "assistant", ...}]}     the last message is the response scored
  {"prompt": ..., "chosen": ..., "rejected": ...}     a preference pair (any form the preference
                                                     loader takes): both responses are scored
plus an optional "id" (default: the 1-based line number). Each output line is the input object
plus "id" and, for a single response, "scores" ({attribute: score}) and "reward" (the weighted
sum); for a pair, "chosen_scores", "rejected_scores", "chosen_reward" and "rejected_reward", so
the output is ready for RPO training.

Outputs are appended and flushed every --chunk lines, so an interrupted run loses at most one
chunk: rerunning the same command skips every id already in OUT (a torn last line is cut off).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nemojax.commands.generate import BadLine, read_done


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="reward_command", metavar="SUBCOMMAND", required=True)
    s = sub.add_parser("score", help="score (prompt, response), messages or preference records",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--checkpoint", required=True, help="reward checkpoint (model dir, run dir or step dir)")
    s.add_argument("--input", required=True, help="JSONL of records (format above)")
    s.add_argument("--output", required=True, help="JSONL to append results to (resumable)")
    s.add_argument("--tokenizer", default=None,
                   help="'builtin', a SentencePiece .model, or a dir holding tokenizer.model "
                        "(default: the checkpoint's tokenizer.model if it has one, else builtin)")
    s.add_argument("--batch-size", type=int, default=8, help="sequences scored together")
    s.add_argument("--max-len", type=int, default=None,
                   help="tokens per sequence; longer ones lose prompt tokens from the left "
                        "(default: the model's max_seq_len)")
    s.add_argument("--chunk", type=int, default=64, help="records scored and written per flush")
    s.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="compute (and weight) dtype instead of the checkpoint's")
    s.add_argument("--on-bad-line", choices=["skip", "fail"], default="skip",
                   help="skip: report bad input lines and go on; fail: report them and stop before scoring")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")


# --------------------------------------------------------------------------- input


def conversations_of(record: dict[str, Any]) -> dict[str, list[dict[str, str]]]:
    """{"": conversation} for a single response, {"chosen": ..., "rejected": ...} for a pair."""
    from nemojax.data.chat_records import (RecordError, messages_from, parse_preference, prompt_messages,
                                           response_text)
    from nemojax.data.chat_template import ChatFormatError, chat_segments

    try:
        if "chosen" in record or "chosen_response" in record:
            ex = parse_preference(record)
            return {side: ex.prompt + [{"role": "assistant", "content": text}]
                    for side, text in (("chosen", ex.chosen), ("rejected", ex.rejected))}
        if "messages" in record:
            msgs = messages_from(record["messages"], "messages")
            if msgs[-1]["role"] != "assistant":
                raise RecordError("'messages' must end with the assistant response to score")
        elif "prompt" in record and "response" in record:
            msgs = prompt_messages(record["prompt"]) + [{"role": "assistant",
                                                         "content": response_text(record["response"], "response")}]
            chat_segments(msgs, add_generation_prompt=False)
        else:
            raise RecordError("needs 'prompt' + 'response', 'messages', or 'prompt' + 'chosen' + 'rejected'; "
                              f"found keys {sorted(record)[:8]}")
    except (RecordError, ChatFormatError) as e:
        raise BadLine(str(e)) from None
    return {"": msgs}


def parse_line(text: str, line_no: int) -> tuple[str, dict[str, Any], dict[str, list[dict[str, str]]]]:
    """(id key, record, conversations) of one input line, or BadLine naming the problem."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadLine(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise BadLine(f"must be a JSON object, got {type(record).__name__}")
    record.setdefault("id", line_no)
    if isinstance(record["id"], (dict, list)) or record["id"] is None:
        raise BadLine(f"id must be a string or number, got {record['id']!r}")
    return json.dumps(record["id"]), record, conversations_of(record)


def scored_record(record: dict[str, Any], results: dict[str, dict[str, float]]) -> dict[str, Any]:
    out = dict(record)
    for side, res in results.items():
        scores = {k: v for k, v in res.items() if k != "reward"}
        if side:
            out[f"{side}_scores"], out[f"{side}_reward"] = scores, res["reward"]
        else:
            out["scores"], out["reward"] = scores, res["reward"]
    return out


# --------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> int:
    from nemojax.checkpoint import CheckpointError
    from nemojax.data.tokenizer import TokenizerError, load_tokenizer
    from nemojax.inference.reward import RewardScorer

    inp, out_path = Path(args.input), Path(args.output)
    if not inp.is_file():
        print(f"nemojax reward score: input file not found: {inp}", file=sys.stderr)
        return 2
    if args.batch_size < 1 or args.chunk < 1:
        print("nemojax reward score: --batch-size and --chunk must be >= 1", file=sys.stderr)
        return 2

    # Pass 1: validate every line (and count the work) before loading anything.
    done = read_done(out_path)
    seen: set[str] = set()
    bad = todo = 0
    with inp.open(encoding="utf-8") as f:
        for line_no, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                key, record, _ = parse_line(text, line_no)
                if key in seen:
                    raise BadLine(f"duplicate id {record['id']!r}")
            except BadLine as e:
                bad += 1
                print(f"{inp}:{line_no}: {e}", file=sys.stderr)
                continue
            seen.add(key)
            todo += key not in done
    if bad and args.on_bad_line == "fail":
        print(f"nemojax reward score: {bad} bad input line(s); fix them or pass --on-bad-line skip", file=sys.stderr)
        return 1

    tok_spec = args.tokenizer
    if tok_spec is None:
        own = Path(args.checkpoint) / "tokenizer.model"
        tok_spec = str(own) if own.is_file() else "builtin"
    try:
        tokenizer = load_tokenizer(tok_spec)
        scorer = RewardScorer.from_checkpoint(args.checkpoint, tokenizer=tokenizer, batch_size=args.batch_size,
                                              max_len=args.max_len, dtype=args.dtype)
    except (TokenizerError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"nemojax reward score: {e}", file=sys.stderr)
        return 2

    def pending() -> Iterator[tuple[dict[str, Any], dict[str, list[dict[str, str]]]]]:
        emitted: set[str] = set()
        with inp.open(encoding="utf-8") as f:
            for line_no, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    key, record, convs = parse_line(text, line_no)
                except BadLine:
                    continue
                if key in done or key in emitted:
                    continue
                emitted.add(key)
                yield record, convs

    from tqdm import tqdm

    written = 0
    start = time.perf_counter()
    bar = tqdm(total=todo, unit="rec", desc="reward score", disable=args.no_progress, dynamic_ncols=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("a", encoding="utf-8") as out:
        chunk: list[tuple[dict[str, Any], dict[str, list[dict[str, str]]]]] = []
        for item in pending():
            chunk.append(item)
            if len(chunk) == args.chunk:
                written += _flush(scorer, chunk, out)
                bar.update(len(chunk))
                chunk = []
        if chunk:
            written += _flush(scorer, chunk, out)
            bar.update(len(chunk))
    bar.close()
    print(json.dumps({"written": written, "skipped_already_done": len(seen & done), "bad_lines": bad,
                      "truncated": scorer.stats["truncated"], "seconds": round(time.perf_counter() - start, 3)}),
          file=sys.stderr)
    return 0


def _flush(scorer: Any, chunk: list[tuple[dict[str, Any], dict[str, list[dict[str, str]]]]], out: Any) -> int:
    """Score a chunk's conversations in one call and append its records, in input order."""
    flat = [conv for _, convs in chunk for conv in convs.values()]
    results = iter(scorer.score(flat))
    for record, convs in chunk:
        out.write(json.dumps(scored_record(record, {side: next(results) for side in convs}),
                             ensure_ascii=False) + "\n")
    out.flush()
    return len(chunk)
