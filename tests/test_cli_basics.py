"""What a new user meets first at the command line: the entry points, versions and path errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nemojax.cli import main
from nemojax.config import ConfigError, resolve_path


def test_python_dash_m_nemojax_and_version_print_the_installed_version():
    """Catches: no nemojax/__main__.py (`python -m nemojax` fails), --version missing or wrong."""
    from importlib.metadata import version

    out = subprocess.run([sys.executable, "-m", "nemojax", "--version"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"nemojax {version('nemojax')}"


@pytest.mark.parametrize("typo, close", [("nemotron4-304b", "nemotron4-340b"), ("tinny", "tiny"),
                                         ("configs/tiy.yaml", "tiny")])
def test_a_mistyped_preset_suggests_the_close_match(typo, close):
    """Catches: a bare "not found" for a one-letter slip in a preset name."""
    with pytest.raises(ConfigError, match=f"did you mean {close}"):
        resolve_path(typo)


def test_a_far_off_name_gets_no_suggestion():
    with pytest.raises(ConfigError) as e:
        resolve_path("zzzz-qqqq")
    assert "did you mean" not in str(e.value)


@pytest.mark.parametrize("argv", [["convert", "to-hf", "{missing}", "{out}"],
                                  ["convert", "from-hf", "{missing}", "{out}"],
                                  ["info", "{missing}.yaml"], ["train", "{missing}.yaml"],
                                  ["sdg", "run", "{missing}.yaml"], ["align", "{missing}.yaml"]])
def test_a_missing_path_exits_2_with_one_line(argv, tmp_path, capsys):
    """Catches: a command that exits 1 (or with a traceback) on a path that does not exist."""
    argv = [a.format(missing=tmp_path / "nope", out=tmp_path / "out") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "nope" in err and "Traceback" not in err
