"""The README's examples run as written."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_starts_with_the_two_commands():
    lines = [l for l in README.read_text().splitlines() if l.strip()]
    assert lines[1] == "```" and lines[2].startswith("make lab") and lines[3].startswith("make test")


@pytest.mark.slow  # a fresh interpreter per example: they run as a user pastes them
def test_three_line_integration_example_runs(tmp_path):
    code = python_blocks()[0]
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip().splitlines()[-1]) < 1e-4  # the 8-layer sigmoid stack's first layer
    assert (tmp_path / "runs" / "exp1" / "graddoctor.sqlite").exists()


@pytest.mark.slow
def test_check_example_runs(tmp_path):
    code = next(b for b in python_blocks() if "gd.check(" in b)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "vanishing"
