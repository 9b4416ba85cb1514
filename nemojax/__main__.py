"""`python -m nemojax ...` is the `nemojax` command (for environments without the console script)."""

import sys

from nemojax.cli import main

sys.exit(main())
