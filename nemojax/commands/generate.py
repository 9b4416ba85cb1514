"""`nemojax generate`: sample completions for a JSONL file of prompts with the in-process engine.

Input lines (JSON objects) hold exactly one of
  "prompt": "text"                                  continued as is (bos first unless --no-bos)
  "messages": [{"role": ..., "content": ...}, ...]  bos + the Nemotron chat template, exactly as
                                                    training builds it (nemojax.data.chat); text in
                                                    a message is never read as a control token;
                                                    generation also stops at <extra_id_1>
  "prompt_ids": [2, 415, ...]                        token ids, used as given
plus an optional "id" (default: the 1-based line number), an optional "metadata" (any JSON, copied
to the output) and optional per-line sampling fields
(temperature, top_p, top_k, min_p, max_tokens, stop, stop_token_ids, seed, n, logprobs,
top_logprobs, prompt_logprobs) that override the command-line defaults; any other key is a bad line
naming it (a misspelt "temprature" would otherwise sample silently with the default). Each output line is the
input object plus "id", "text", "output_ids", "finish_reason" ("stop" | "length"),
"prompt_tokens", "completion_tokens" (and "logprobs" / "top_logprobs" / "prompt_logprobs" when
asked). With n > 1 the per-sample fields are lists of n values. The n samples of a prompt share
one prefill; prompts that start alike share the prefix's keys/values (--prefix-cache-tokens).

Outputs are appended and flushed as each request finishes, so an interrupted run loses at
most the requests in flight: rerunning the same command skips every id already in OUT.
A line without a "seed" gets one derived from (--seed, id), so reruns sample the same tokens.

Compiled programs persist (--compile-cache), so a second run starts in seconds. The last line on
stderr is a JSON summary: requests written, tokens, seconds (start-up and generation), compiled
and loaded programs and the seconds they took, prefix-cache reuse.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import time
import zlib

PROCESS_START = time.perf_counter()
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from nemojax.inference.sampling import SamplingError, SamplingParams

SOURCE_FIELDS = ("prompt", "messages", "prompt_ids")
PASS_THROUGH_FIELDS = ("id", "metadata")  # copied to the output as given
AUTO_MIN_LEN = 128  # the smallest cache length --max-len's default picks


class BadLine(ValueError):
    """An input line that cannot become a request; the message says what to fix."""


@dataclass
class Parsed:
    line_no: int
    record: dict[str, Any]
    key: str  # json.dumps(id): ids compare by value whatever their JSON type
    prompt_ids: list[int]
    params: SamplingParams


def add_arguments(p: argparse.ArgumentParser) -> None:
    from nemojax.inference.setup import HelpFormatter, add_engine_arguments

    p.description = __doc__
    p.formatter_class = HelpFormatter
    p.add_argument("--checkpoint", required=True,
                   help="nemojax checkpoint (dir, run dir or step dir) or Hugging Face Nemotron dir")
    p.add_argument("--input", required=True, help="JSONL of prompts (format above)")
    p.add_argument("--output", required=True, help="JSONL to append results to (resumable)")
    p.add_argument("--tokenizer", default=None,
                   help="'builtin', a SentencePiece .model, or a dir holding tokenizer.model "
                        "(default: the checkpoint's tokenizer.model if it has one, else builtin)")
    p.add_argument("--no-bos", action="store_true", help="do not prepend bos to text and chat prompts")
    add_engine_arguments(p, slots=32, decode_steps=16,
                         max_len_help="prompt + completion tokens per sample (default: the longest pending "
                                      "line's prompt + max_tokens, rounded up to a power of two >= 128, at "
                                      "most the model's max_seq_len)")
    g = p.add_argument_group("sampling defaults (each input line may override them)")
    g.add_argument("--max-tokens", type=int, default=256, help="tokens generated per sample at most")
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus mass kept; 1 = off")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability; 0 = off")
    g.add_argument("--n", type=int, default=1, help="samples per prompt")
    g.add_argument("--seed", type=int, default=0, help="base of the per-line seeds")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--stop-token-ids", type=int, nargs="*", default=[], help="token ids that end a sample (eos always does)")
    g.add_argument("--logprobs", action="store_true", help="add the log-prob of each output token")
    g.add_argument("--top-logprobs", type=int, default=0, help="also the N most likely tokens per position (<= 20)")
    p.add_argument("--on-bad-line", choices=["skip", "fail"], default="skip",
                   help="skip: report bad input lines and go on; fail: report them and stop "
                        "before generating anything")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


# --------------------------------------------------------------------------- input


def _default_params(args: argparse.Namespace) -> SamplingParams:
    try:
        return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                              min_p=args.min_p, max_tokens=args.max_tokens, stop=list(args.stop),
                              stop_token_ids=list(args.stop_token_ids), n=args.n,
                              logprobs=args.logprobs, top_logprobs=args.top_logprobs).validate()
    except SamplingError as e:
        raise SystemExit(f"nemojax generate: bad sampling option: {e}") from None


def derived_seed(base: int, key: str) -> int:
    """A stable per-request seed from (--seed, id): reruns and resumes sample identically."""
    return zlib.crc32(f"{base}:{key}".encode()) & 0x7FFFFFFF


def parse_line(text: str, line_no: int, *, tokenizer: Any, defaults: SamplingParams, base_seed: int,
               max_len: int, vocab_size: int, bos: bool, turn_id: int | None) -> Parsed:
    """One input line -> a Parsed request, or BadLine naming the problem."""
    from nemojax.data.chat import prompt_ids
    from nemojax.data.chat_template import ChatFormatError

    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadLine(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise BadLine(f"must be a JSON object, got {type(record).__name__}")
    known = {*SOURCE_FIELDS, *PASS_THROUGH_FIELDS, *SamplingParams.field_names()}
    unknown = sorted(k for k in record if k not in known)
    if unknown:
        hints = [f" (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, sorted(known), n=1)) else ""
                 for k in unknown]
        raise BadLine("unknown key(s) " + ", ".join(f"{k!r}{h}" for k, h in zip(unknown, hints)) +
                      "; put your own fields under \"metadata\", which is copied to the output")
    sources = [f for f in SOURCE_FIELDS if f in record]
    if len(sources) != 1:
        raise BadLine(f"needs exactly one of {', '.join(SOURCE_FIELDS)}; found "
                      f"{', '.join(sources) or 'none'}")
    record.setdefault("id", line_no)
    if isinstance(record["id"], (dict, list)) or record["id"] is None:
        raise BadLine(f"id must be a string or number, got {record['id']!r}")
    try:
        params = SamplingParams.from_dict(record, defaults)
    except SamplingError as e:
        raise BadLine(str(e)) from None
    except TypeError as e:
        raise BadLine(f"bad sampling field: {e}") from None
    if params.seed is None:
        params.seed = derived_seed(base_seed, json.dumps(record["id"]))
    src = sources[0]
    if src == "prompt_ids":
        ids = record["prompt_ids"]
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise BadLine("prompt_ids must be a list of integers")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise BadLine(f"prompt_ids {bad[:5]} outside the model's vocabulary [0, {vocab_size})")
    elif src == "prompt":
        if not isinstance(record["prompt"], str):
            raise BadLine("prompt must be a string")
        ids = prompt_ids(tokenizer, record["prompt"], bos=bos)
    else:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
            raise BadLine("messages must be a list of {role, content} objects")
        try:
            ids = prompt_ids(tokenizer, msgs, bos=bos)
        except ChatFormatError as e:
            raise BadLine(str(e)) from None
        if turn_id is not None and turn_id not in params.stop_token_ids:
            params.stop_token_ids.append(turn_id)
    if not ids:
        raise BadLine("empty prompt")
    if len(ids) >= max_len:
        raise BadLine(f"prompt has {len(ids)} tokens; at most {max_len - 1} fit (--max-len {max_len})")
    return Parsed(line_no, record, json.dumps(record["id"]), ids, params)


def read_done(output: Path) -> set[str]:
    """Ids already written to `output`; a torn last line (interrupted write) is cut off."""
    if not output.exists():
        return set()
    data = output.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with output.open("r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    done = set()
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "id" in rec:
            done.add(json.dumps(rec["id"]))
    return done


# --------------------------------------------------------------------------- output


def result_record(parsed: Parsed, completions: list[Any]) -> dict[str, Any]:
    """The input object plus the outputs; per-sample fields are lists when n > 1."""
    completions = sorted(completions, key=lambda c: c.sample_index)
    per = {
        "text": [c.text for c in completions],
        "output_ids": [c.output_ids for c in completions],
        "finish_reason": [c.finish_reason for c in completions],
        "completion_tokens": [c.completion_tokens for c in completions],
    }
    if parsed.params.logprobs:
        per["logprobs"] = [c.logprobs for c in completions]
    if parsed.params.top_logprobs:
        per["top_logprobs"] = [[[list(t) for t in pos] for pos in c.top_logprobs] for c in completions]
    if parsed.params.prompt_logprobs:
        per["prompt_logprobs"] = [c.prompt_logprobs for c in completions]
    out = dict(parsed.record)
    out["prompt_tokens"] = len(parsed.prompt_ids)
    for k, v in per.items():
        out[k] = v if parsed.params.n > 1 else v[0]
    return out


# --------------------------------------------------------------------------- run


def _fail(message: str, code: int = 2) -> int:
    print(f"nemojax generate: {message}", file=sys.stderr)
    return code


def run(args: argparse.Namespace) -> int:
    inp, out_path = Path(args.input), Path(args.output)
    if not inp.is_file():
        return _fail(f"input file not found: {inp}")
    defaults = _default_params(args)
    from nemojax.inference.setup import SetupError, enable_compile_cache, engine_from_args, load_for_sampling

    enable_compile_cache(args.compile_cache)
    try:
        model, tokenizer = load_for_sampling(args.checkpoint, args.tokenizer, args.dtype, args.quantize,
                                             args.quant_block_size)
    except SetupError as e:
        return _fail(str(e))
    from nemojax.data.tokenizer import TokenizerError
    from nemojax.inference import Request

    cfg = model.cfg
    max_len = args.max_len or cfg.max_seq_len
    if tokenizer.vocab_size > cfg.vocab_size:
        print(f"nemojax generate: warning: the tokenizer has {tokenizer.vocab_size} pieces but the model only "
              f"{cfg.vocab_size}; pass the checkpoint's own --tokenizer", file=sys.stderr)
    turn_id = None
    try:
        turn_id = tokenizer.special_id("<extra_id_1>")
    except TokenizerError:
        pass
    parse_kw = dict(tokenizer=tokenizer, defaults=defaults, base_seed=args.seed, max_len=max_len,
                    vocab_size=cfg.vocab_size, bos=not args.no_bos, turn_id=turn_id)

    # Pass 1: validate every line (and count the work) before spending any compute.
    done = read_done(out_path)
    seen: set[str] = set()
    bad = 0
    todo = 0
    longest = 1  # prompt + max_tokens of the longest pending request
    with inp.open(encoding="utf-8") as f:
        for line_no, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                parsed = parse_line(text, line_no, **parse_kw)
                if parsed.key in seen:
                    raise BadLine(f"duplicate id {parsed.record['id']!r}")
            except BadLine as e:
                bad += 1
                print(f"{inp}:{line_no}: {e}", file=sys.stderr)
                continue
            seen.add(parsed.key)
            if parsed.key not in done:
                todo += 1
                longest = max(longest, len(parsed.prompt_ids) + parsed.params.max_tokens)
    if bad and args.on_bad_line == "fail":
        return _fail(f"{bad} bad input line(s); fix them or pass --on-bad-line skip", code=1)
    skipped_done = len(seen & done)

    # Pass 2: stream the pending requests through the engine, writing each as it finishes.
    pending: dict[str, tuple[Parsed, list[Any]]] = {}

    def requests() -> Iterator[Request]:
        with inp.open(encoding="utf-8") as f:
            emitted: set[str] = set()
            for line_no, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    parsed = parse_line(text, line_no, **parse_kw)
                except BadLine:
                    continue
                if parsed.key in done or parsed.key in emitted:
                    continue
                emitted.add(parsed.key)
                pending[parsed.key] = (parsed, [])
                yield Request(parsed.key, parsed.prompt_ids, parsed.params)

    if not args.max_len:  # a cache sized for this input (power of two: few distinct programs)
        max_len = min(max_len, max(AUTO_MIN_LEN, 1 << (longest - 1).bit_length()))
    try:
        engine = engine_from_args(model, tokenizer, args, max_len=max_len, seed=args.seed)
    except SetupError as e:
        return _fail(str(e))
    del model  # the engine holds the weights it needs
    from tqdm import tqdm

    written = tokens = 0
    start = time.perf_counter()
    bar = tqdm(total=todo, unit="req", desc="generate", disable=args.no_progress, dynamic_ncols=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("a", encoding="utf-8") as out:
        for c in engine.generate(requests()):
            parsed, comps = pending[c.request_id]
            comps.append(c)
            tokens += c.completion_tokens
            if len(comps) < parsed.params.n:
                continue
            del pending[c.request_id]
            out.write(json.dumps(result_record(parsed, comps), ensure_ascii=False) + "\n")
            out.flush()
            written += 1
            bar.update(1)
            bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - start, 1e-9):.0f}")
    bar.close()
    compiles = engine.compile_stats()
    end = time.perf_counter()
    print(json.dumps({"written": written, "skipped_already_done": skipped_done, "bad_lines": bad,
                      "completion_tokens": tokens, "seconds": round(end - start, 3),
                      "startup_seconds": round(start - PROCESS_START, 3),
                      "programs": {"compiled": compiles["compiled"], "loaded": compiles["loaded"],
                                   "seconds": round(compiles["seconds"], 3)},
                      "prompt_tokens": engine.stats["prompt_tokens"],
                      "cached_prompt_tokens": engine.stats["cached_tokens"]}), file=sys.stderr)
    return 0
