"""Test launcher for multi-process jobs: `python tests/train_sequence.py [--kill-after STEP] '[[ARGS...], ...]'`.

Runs `nemojax train ARGS` (nemojax.cli.main, what the `nemojax` command runs) for each argument
list in turn, in this one process; every process of the job runs the same list. Several
trainings then pay for starting Python, JAX and the distributed runtime once. After each run it
prints tests/multiproc.py's RUN_END marker to stdout and stderr, and it stops at the first run
that does not exit 0, with that exit code.

--kill-after STEP: the process SIGKILLs itself once the checkpoint of STEP is on disk
(tests/kill_after_save.py), a preemption without cleanup.
Every process shares the compilation cache (tests/shared_cpu_cache.py).
"""

from __future__ import annotations

import argparse
import json
import sys

import kill_after_save
import shared_cpu_cache
from multiproc import RUN_END

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--kill-after", type=int, default=0)
    p.add_argument("runs", help="JSON list of argument lists")
    args = p.parse_args()
    shared_cpu_cache.install()
    if args.kill_after:
        kill_after_save.install(args.kill_after)
    from nemojax.cli import main

    for i, run in enumerate(json.loads(args.runs)):
        rc = main(["train", *run])
        for stream in (sys.stdout, sys.stderr):
            print(RUN_END.format(i, rc), file=stream, flush=True)
        if rc:
            sys.exit(rc)
