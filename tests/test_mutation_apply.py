"""scripts/mutation.py applies a mutmut mutant to the function it mutates, in the right class.

mutmut 3.8.1's own `apply` puts a method's mutant into the first function of that name in the
module, whatever its class: a mutant of `_Guard.__call__` replaced `_ReservedStream.__call__`
in nemojax/serve/app.py and was counted killed by the tests that broke.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from mutation import apply_mutmut_mutant  # noqa: E402

ORIGINAL = '''class A:
    def __call__(self, x):
        return x + 1


class B:
    @staticmethod
    def helper():
        return 0

    def __call__(self, x):
        return x + 2


def scale(x):
    return x * 3
'''

# what mutmut writes beside each original: the mutants, renamed, in the same class
MUTATED = '''class A:
    def __call__(self, x):
        return x + 1

    def xǁAǁ__call____mutmut_1(self, x):
        return x - 1


class B:
    @staticmethod
    def helper():
        return 0

    def __call__(self, x):
        return x + 2

    def xǁBǁ__call____mutmut_1(self, x):
        return x - 2


def scale(x):
    return x * 3


def x_scale__mutmut_1(x):
    return x / 3
'''


def _apply(tmp_path: Path, name: str) -> str:
    (tmp_path / "mutants" / "pkg").mkdir(parents=True)
    (tmp_path / "mutants" / "pkg" / "m.py").write_text(MUTATED)
    return apply_mutmut_mutant(tmp_path, "pkg/m.py", name, ORIGINAL)


def test_a_method_mutant_lands_in_its_own_class(tmp_path):
    out = _apply(tmp_path, "pkg.m.xǁBǁ__call____mutmut_1")
    assert out == ORIGINAL.replace("return x + 2", "return x - 2")
    ns: dict = {}
    exec(out, ns)
    assert ns["A"]()(10) == 11 and ns["B"]()(10) == 8 and ns["B"].helper() == 0


def test_a_module_function_mutant(tmp_path):
    out = _apply(tmp_path, "pkg.m.x_scale__mutmut_1")
    assert out == ORIGINAL.replace("return x * 3", "return x / 3")
