"""The fault matrix (issue 13): broken model files, data, plans, scores and checkpoints each
exit with code 2, print one line and write nothing; attribute and distill killed with
SIGKILL and resumed give what an uninterrupted run gives, bit for bit.

The default run takes one truncation, one bit flip and one kill per verb; `pytest -m slow`
takes ten of each and prints the tables docs/reliability.md shows.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from corpus import faults, interrupt
from corpus.faults import Base


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    return faults.make_base(tmp_path_factory.mktemp("base"))


def _failures(results: list[faults.Result]) -> list[tuple]:
    return [
        (r.case.name, r.case.verb, r.exit_code, r.lines[-3:], r.written)
        for r in results
        if not r.passed
    ]


def _run(cases: list[faults.Case], base: Base, out: Path) -> list[faults.Result]:
    return [faults.run_case(c, base, out / str(i)) for i, c in enumerate(cases)]


@pytest.mark.parametrize(
    "group",
    [
        lambda b: faults.model_cases(b, draws=1),
        faults.data_cases,
        faults.plan_cases,
        faults.scores_cases,
        faults.checkpoint_cases,
    ],
    ids=["model", "data", "plan", "scores", "checkpoint"],
)
def test_each_fault_exits_2_with_one_line_and_writes_nothing(group, base: Base, tmp_path: Path):
    results = _run(group(base), base, tmp_path)
    assert results and not _failures(results)


def test_a_fault_prints_one_line_on_a_real_terminal(base: Base, tmp_path: Path):
    """Outside CliRunner: log records, onnxruntime and OpenCV write to the process's stderr."""
    cases = [c for c in faults.data_cases(base) if c.verb == "attribute"][:1]
    cases += [c for c in faults.model_cases(base, draws=1) if c.verb == "extract"][-1:]
    for i, case in enumerate(cases):
        out = tmp_path / str(i)
        out.mkdir()
        args = [a.replace(faults.OUT, str(out)) for a in case.args]
        proc = subprocess.run([*interrupt.command(), *args], capture_output=True, text=True)
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, (case.name, lines)
        assert not list(out.iterdir())


@pytest.mark.parametrize("verb", ["attribute", "distill"])
def test_kill_9_then_resume_equals_an_uninterrupted_run(verb: str, base: Base, tmp_path: Path):
    job = next(j for j in interrupt.jobs(base) if j.name == verb)
    _, trials = interrupt.kill_and_resume(job, tmp_path, kills=1, seed=1)
    assert [t.difference for t in trials] == [None], trials


def test_distill_resumed_in_its_last_epoch_equals_an_uninterrupted_run(
    base: Base, tmp_path: Path, monkeypatch
):
    """Weights and metadata (the final loss, epoch reports), not only weights."""
    from onnxcut.graph.io import save
    from onnxcut.train.distill import DistillOptions, distill
    from onnxcut.train.trainer import Trainer

    opts = DistillOptions(batch=2, epochs=2, lr=1e-3, checkpoint_every=1, threads=1)
    save(distill(base.cut, base.model, base.images, opts), tmp_path / "plain.onnx")
    real, calls = Trainer.step, []

    def dying(self, feeds):
        calls.append(1)
        if len(calls) == 4:  # the last step of the second epoch
            raise KeyboardInterrupt
        return real(self, feeds)

    ckpt = tmp_path / "run.partial"
    monkeypatch.setattr(Trainer, "step", dying)
    with pytest.raises(KeyboardInterrupt):
        distill(base.cut, base.model, base.images, opts, checkpoint=ckpt)
    monkeypatch.setattr(Trainer, "step", real)
    resumed = distill(base.cut, base.model, base.images, opts, checkpoint=ckpt, resume=True)
    save(resumed, tmp_path / "resumed.onnx")
    assert interrupt.same_model(tmp_path / "resumed.onnx", tmp_path / "plain.onnx") is None


@pytest.mark.slow
def test_fault_matrix(base: Base, tmp_path: Path):
    results = _run(faults.all_cases(base, draws=10), base, tmp_path)
    print("\n" + faults.table(results))
    assert not _failures(results)


@pytest.mark.slow
def test_fault_matrix_on_a_real_terminal(base: Base, tmp_path: Path):
    """One verb of each case as a real process: nothing but the error line on stdout+stderr."""
    seen, failed = set(), []
    for i, case in enumerate(faults.all_cases(base, draws=2)):
        if (case.group, case.name) in seen:
            continue
        seen.add((case.group, case.name))
        out = tmp_path / str(i)
        out.mkdir()
        if case.group == "checkpoint":
            (out / "s.npz.partial").write_text("garbage")
        args = [a.replace(faults.OUT, str(out)) for a in case.args]
        proc = subprocess.run([*interrupt.command(), *args], capture_output=True, text=True)
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        written = [p.name for p in out.iterdir() if not p.name.endswith(".partial")]
        if proc.returncode != 2 or len(lines) != 1 or written:
            failed.append((case.name, case.verb, proc.returncode, lines[-3:], written))
    assert not failed


@pytest.mark.slow
def test_kill_9_ten_times_then_resume(base: Base, tmp_path: Path):
    results = []
    for job in interrupt.jobs(base, **interrupt.LONG):
        ref, trials = interrupt.kill_and_resume(job, tmp_path / job.name, kills=10, seed=13)
        results.append((job, ref, trials))
    print("\n" + interrupt.table(results))
    differing = [(j.name, t) for j, _, ts in results for t in ts if t.difference is not None]
    assert not differing
