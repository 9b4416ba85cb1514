"""`nemojax` command line: one subcommand per module under nemojax/commands/.

Each command module defines `add_arguments(parser)` and `run(args) -> int`. Modules are
imported only when their command runs, so `nemojax info` never pays for torch or the server.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("nemojax.commands.train", "train a model (same as python train.py)"),
    "info": ("nemojax.commands.info", "parameter count and FLOPs per token of a config, as JSON"),
    "convert": ("nemojax.commands.convert", "convert checkpoints to/from Hugging Face Nemotron"),
    "generate": ("nemojax.commands.generate", "sample completions for a JSONL file of prompts"),
    "serve": ("nemojax.commands.serve", "OpenAI-compatible HTTP server over the sampling engine"),
    "compile": ("nemojax.commands.compile", "ahead-of-time compile the train step for a topology"),
    "tokenizer": ("nemojax.commands.tokenizer", "train, inspect or apply a SentencePiece tokenizer"),
    "reward": ("nemojax.commands.reward", "score JSONL responses with a reward checkpoint (reward score)"),
    "sdg": ("nemojax.commands.sdg", "synthetic data generation pipelines (run, kinds, ifeval)"),
    "align": ("nemojax.commands.align", "the weak-to-strong alignment loop (SDG -> SFT -> DPO -> RPO, iterated)"),
    "eval": ("nemojax.commands.eval", "evaluate a checkpoint or endpoint: tasks, answers, IFEval, reward, loss"),
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nemojax")
    except PackageNotFoundError:  # a source tree on PYTHONPATH, not installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="nemojax", description="Nemotron-4 training, conversion and sampling in JAX + Flax NNX.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    name = argv[0] if argv and argv[0] in COMMANDS else None
    for cmd, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(cmd, help=help_text)
        if cmd == name:
            try:
                mod = importlib.import_module(module)
            except ModuleNotFoundError as e:
                if e.name == module:
                    parser.error(f"command {cmd!r} is not available in this build")
                raise
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    from nemojax.config import ConfigError

    try:
        return int(args._run(args) or 0)
    except ConfigError as e:
        print(f"nemojax {args.command}: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
