"""`nemojax eval`: measure a checkpoint or any OpenAI-compatible endpoint on evaluation suites.

    nemojax eval --checkpoint runs/sft --suite tasks=world/eval/tasks.jsonl --suite loss=world/eval/sft.jsonl
    nemojax eval --endpoint http://localhost:8000/v1 --model tiny --suite ifeval=ifeval.jsonl
    nemojax eval --reward-checkpoint runs/reward --suite rewardbench=pairs.jsonl

Prints a table on stderr and the JSON report on stdout (or into --output). Suites and their
file formats: nemojax/evaluation/suites.py and docs/ALIGNMENT.md.

Exit status: 0 every request answered; 1 some requests failed (the report is still written,
with `complete: false`, `failed_requests` and the first errors: not a result to record);
2 bad input, an unreachable endpoint or an unreadable checkpoint (nothing evaluated).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    p.add_argument("--suite", action="append", default=[], metavar="NAME=FILE",
                   help="a suite and its JSONL file; repeatable. NAME: tasks, answers, ifeval, reward, "
                        "rewardbench, loss. The first one gives the headline score")
    p.add_argument("--checkpoint", default="", help="nemojax checkpoint / run dir under test (in-process engine)")
    p.add_argument("--endpoint", default="", help="OpenAI-compatible base URL under test, e.g. http://host:8000/v1")
    p.add_argument("--model", default="", help="model name at --endpoint")
    p.add_argument("--reward-checkpoint", default="", help="reward checkpoint for the reward / rewardbench suites")
    p.add_argument("--reward-endpoint", default="", help="reward endpoint (NVIDIA reward API shape)")
    p.add_argument("--reward-model", default="", help="model name at --reward-endpoint")
    p.add_argument("--tokenizer", default="", help="tokenizer .model (default: the checkpoint's, else builtin)")
    p.add_argument("--max-tokens", type=int, default=128, help="new tokens per response")
    p.add_argument("--batch-slots", type=int, default=32, help="engine slots (in-process)")
    p.add_argument("--max-len", type=int, default=512, help="prompt + response tokens per slot (in-process)")
    p.add_argument("--quantize", choices=["int8", "fp8"], default=None,
                   help="quantize the checkpoint's block projections at load (weight-only; as `nemojax generate`)")
    p.add_argument("--limit", type=int, default=0, help="only the first N records of each file (0 = all)")
    p.add_argument("--output", default="", help="write the JSON report here instead of stdout")
    p.add_argument("--rows", action="store_true", help="include every response and verdict in the report")


def run(args: argparse.Namespace) -> int:
    from nemojax.checkpoint import CheckpointError
    from nemojax.data.tokenizer import TokenizerError
    from nemojax.evaluation.runner import EvalSpec, evaluate_model, format_table
    from nemojax.evaluation.suites import EvalDataError

    suites: dict[str, str] = {}
    for item in args.suite:
        name, sep, path = item.partition("=")
        if not sep or not path:
            print(f"nemojax eval: --suite {item!r} must look like NAME=FILE", file=sys.stderr)
            return 2
        suites[name] = path
    spec = EvalSpec(suites=suites, checkpoint=args.checkpoint, endpoint=args.endpoint, model=args.model,
                    reward_checkpoint=args.reward_checkpoint, reward_endpoint=args.reward_endpoint,
                    reward_model=args.reward_model, tokenizer=args.tokenizer, max_tokens=args.max_tokens,
                    batch_slots=args.batch_slots, max_len=args.max_len, limit=args.limit,
                    quantize=args.quantize or "")
    try:
        report = evaluate_model(spec)
    except (EvalDataError, CheckpointError, TokenizerError, FileNotFoundError) as e:
        print(f"nemojax eval: {e}", file=sys.stderr)
        return 2
    if not args.rows:
        report.pop("rows", None)
    print(format_table(report), file=sys.stderr)
    text = json.dumps(report, indent=1)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
    else:
        print(text)
    if not report["complete"]:
        print(f"nemojax eval: {report['failed_requests']} request(s) failed; the scores are incomplete "
              f"(first error: {report['errors'][0] if report['errors'] else '?'})", file=sys.stderr)
        return 1
    return 0
