"""`nemojax sdg`: synthetic data generation (docs/SDG.md).

    nemojax sdg run PIPELINE.yaml [key=value ...]    run (or resume) a pipeline's stages
    nemojax sdg kinds                                 every stage kind and its keys
    nemojax sdg ifeval --input RESPONSES.jsonl        IFEval accuracy of responses (strict / loose)

`run` writes each stage's records to <run_dir>/<stage>.jsonl and a summary per stage (items
in, kept, dropped by reason, tokens, seconds) to stderr and <run_dir>/summary.json. Killed at
any point and rerun with the same arguments, it resumes where it stopped, losing and
duplicating nothing. A stage whose configuration, client or model changed since it ran is
refused with the keys that changed; `--redo STAGE` runs it (and the stages reading it) again.

Exit codes of `run`: 0 done, or stopped by SIGTERM/SIGINT (what finished is kept: rerun to
resume); 1 a stage is incomplete because requests failed for a transport reason (unreachable
server, retries exhausted: rerun to retry exactly those items), or the run directory holds a
stage run with another configuration; 2 a configuration, checkpoint or tokenizer error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = p.add_subparsers(dest="sdg_command", metavar="SUBCOMMAND", required=True)
    r = sub.add_parser("run", help="run or resume a pipeline")
    r.add_argument("pipeline", help="pipeline YAML (e.g. configs/sdg/tiny.yaml)")
    r.add_argument("overrides", nargs="*", help="key=value overrides, e.g. run_dir=runs/x stages.topics.n=3")
    r.add_argument("--only", action="append", default=None, help="run only this stage (repeatable)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--redo", action="append", default=None, metavar="STAGE",
                   help="run this stage again, and every stage reading it (repeatable; the previous outputs "
                        "are moved to <run_dir>/.replaced/)")
    sub.add_parser("kinds", help="list stage kinds and their keys")
    e = sub.add_parser("ifeval", help="IFEval accuracy of a JSONL of {instruction_id_list, kwargs, response}")
    e.add_argument("--input", required=True)
    e.add_argument("--response-field", default="response",
                   help="field holding the response text (default: response)")


def _run(args: argparse.Namespace) -> int:
    from nemojax.checkpoint import CheckpointError
    from nemojax.data.tokenizer import TokenizerError
    from nemojax.sdg.config import load_pipeline
    from nemojax.sdg.llm import LLMError
    from nemojax.sdg.runner import Interrupted, Runner, StageIncomplete
    from nemojax.sdg.store import StoreError

    cfg = load_pipeline(args.pipeline, args.overrides)  # ConfigError -> exit 2 in cli.py
    for flag, names in (("--only", args.only), ("--redo", args.redo)):
        unknown = [s for s in names or [] if s not in cfg.stages]
        if unknown:
            print(f"nemojax sdg: {flag} {unknown}: no such stage; stages: {', '.join(cfg.stages)}", file=sys.stderr)
            return 2
    if any(c.type == "engine" and c.program_cache for c in cfg.clients.values()):
        from nemojax.inference.setup import enable_compile_cache

        enable_compile_cache()  # a resumed run loads the engine's programs instead of compiling them
    try:
        Runner(cfg, progress=not args.no_progress and cfg.progress, redo=args.redo).run(args.only)
    except Interrupted as e:  # like `nemojax train`: a requested stop is not a failure
        print(f"nemojax sdg: {e}", file=sys.stderr)
        return 0
    except (FileNotFoundError, CheckpointError, TokenizerError) as e:  # a client's model or tokenizer
        print(f"nemojax sdg: {e}", file=sys.stderr)
        return 2
    except (StoreError, LLMError, StageIncomplete) as e:
        print(f"nemojax sdg: {e}", file=sys.stderr)
        return 1
    return 0


def _kinds() -> int:
    from nemojax.sdg.stages import stage_kinds

    for kind, cls in sorted(stage_kinds().items()):
        keys = {f.name: f.default if f.default is not dataclasses.MISSING else
                (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
                for f in dataclasses.fields(cls.Spec) if f.name != "kind"}
        print(json.dumps({"kind": kind, "reads_input": cls.needs_input, "keys": keys}))
    return 0


def _ifeval(args: argparse.Namespace) -> int:
    from nemojax.sdg.instructions import evaluate
    from nemojax.sdg.store import StoreError, read_jsonl

    try:
        recs = read_jsonl(args.input)
    except StoreError as e:
        print(f"nemojax sdg ifeval: {e}", file=sys.stderr)
        return 2
    rows = []
    for n, r in enumerate(recs, start=1):
        resp = r.get(args.response_field)
        if not isinstance(resp, str):
            print(f"{args.input}:{n}: no string field {args.response_field!r}", file=sys.stderr)
            return 2
        rows.append({**r, "response": resp})
    try:
        print(json.dumps(evaluate(rows), indent=2))
    except ValueError as e:
        print(f"nemojax sdg ifeval: {e}", file=sys.stderr)
        return 2
    return 0


def run(args: argparse.Namespace) -> int:
    if args.sdg_command == "run":
        return _run(args)
    if args.sdg_command == "kinds":
        return _kinds()
    return _ifeval(args)
