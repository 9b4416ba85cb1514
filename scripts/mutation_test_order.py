"""pytest plugin for scripts/mutation.py: run an area's tests in the order its files are listed.

mutmut hands pytest the tests that reached a mutant as an unordered set; with `-x` the order
decides the cost of a kill, so the cheap hand-value tests of an area (listed first) run first.
The order comes from $NEMOJAX_MUTATION_TEST_ORDER (comma-separated test files); within a file,
tests keep their definition order.

It also puts the directory pytest runs in (mutmut's copy of the tree) first on sys.path, as
`python -m pytest` does: tests import their helpers as `tests.<module>`.
"""

from __future__ import annotations

import os
import sys

import pytest

if os.getcwd() not in sys.path:
    sys.path.insert(0, os.getcwd())


def _rank(path: str, order: list[str]) -> int:
    return next((i for i, f in enumerate(order) if path.endswith(f)), len(order))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    order = [f for f in os.environ.get("NEMOJAX_MUTATION_TEST_ORDER", "").split(",") if f]
    if order:
        items.sort(key=lambda it: (_rank(it.location[0], order), it.location[0], it.location[1] or 0))
