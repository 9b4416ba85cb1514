#!/usr/bin/env python
"""Launcher: `python serve.py --checkpoint DIR [--host H --port P ...]` is `nemojax serve ...`."""

import sys

from nemojax.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
