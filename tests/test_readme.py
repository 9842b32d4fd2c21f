"""The README's commands are the ones CI and users run."""

from __future__ import annotations

from conftest import ROOT


def _command_lines(path):
    return [line for line in path.read_text().splitlines() if line.startswith("python3 -m venv")]


def test_ci_runs_the_readme_test_command():
    ci = _command_lines(ROOT / ".ci" / "run")
    assert len(ci) == 1
    assert ci[0] in _command_lines(ROOT / "README.md")
