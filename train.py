#!/usr/bin/env python
"""Launcher: `python train.py CONFIG [key=value ...]` is `nemojax train CONFIG [key=value ...]`."""

import sys

from nemojax.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
