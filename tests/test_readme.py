"""The README's commands are the ones CI and users run."""

from __future__ import annotations

from conftest import ROOT


def _command_lines(path):
    return [line for line in path.read_text().splitlines() if line.startswith("python3 -m venv")]


def test_ci_runs_the_readme_test_command():
    ci = _command_lines(ROOT / ".ci" / "run")
    assert len(ci) == 1
    assert ci[0] in _command_lines(ROOT / "README.md")
    # Steps after it (an extra installed for its own tests) stand in the README too.
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    extra = [line for line in lines if line.startswith(".venv/bin/")]
    readme = (ROOT / "README.md").read_text().splitlines()
    assert extra and all(line in readme for line in extra), extra


def test_quick_start_commands_run(tmp_path, monkeypatch):
    """The quick start's onnxcut steps, as written, through the CLI."""
    import shlex
    import subprocess
    import sys

    from click.testing import CliRunner

    from onnxcut.cli.main import cli

    text = (ROOT / "README.md").read_text()
    line = _command_lines(ROOT / "README.md")[0]
    assert "onnxcut attribute" in line and line in text
    monkeypatch.chdir(tmp_path)
    (tmp_path / "samples").symlink_to(ROOT / "samples")
    steps = [s for s in line.split(" && ") if s.startswith(".venv/bin/")][1:]
    verbs = [shlex.split(s)[1] for s in steps]
    assert verbs == ["attribute", "samples/make_data.py", "extract", "distill", "eval"]
    for step in steps:
        args = shlex.split(step)
        if args[0].endswith("python"):  # the sample data script, in this interpreter
            subprocess.run([sys.executable, *args[1:]], check=True, capture_output=True)
            continue
        result = CliRunner().invoke(cli, args[1:])
        assert result.exit_code == 0, (step, result.output)
    assert "miou" in result.output
    miou = float(result.output.split("miou ")[1].split()[0])
    assert miou > 0.75, result.output  # the distilled sub-network keeps the task
