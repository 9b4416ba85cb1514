"""Test launcher: `python tests/kill_after_save.py STEP [nemojax train args...]`.

Runs `nemojax train` with the trainer's checkpointer patched so that, right after the
checkpoint of step STEP is complete on disk, the process SIGKILLs itself: a preemption with no
chance to clean up. Every process of a multi-process job does the same (each waits for the
collective save to finish first). The hook lives here, not in the production modules.
"""

from __future__ import annotations

import os
import signal
import sys

from nemojax.train import checkpointing


def install(kill_step: int) -> None:
    original = checkpointing.Checkpointer.save

    def save_then_maybe_die(self, state, info):  # type: ignore[no-untyped-def]
        step = original(self, state, info)
        if step == kill_step:
            self.wait()
            print(f"test hook: SIGKILL after the checkpoint of step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return step

    checkpointing.Checkpointer.save = save_then_maybe_die


if __name__ == "__main__":
    install(int(sys.argv[1]))
    from nemojax.cli import main

    sys.exit(main(["train", *sys.argv[2:]]))
