"""kill -9 at random moments, then --resume: the result must equal an uninterrupted run's.

Each job runs as a real `onnxcut` process. A trial waits for the job's first checkpoint,
sleeps a seeded random delay within the rest of the reference run's duration, sends
SIGKILL, then runs the same command with --resume and compares the output bit for bit.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from corpus.faults import Base
from corpus.images import write_images

OUT = "{out}"
LONG = {"images": 640, "epochs": 2}  # the slow runs: 9 attribute checkpoints, 320 steps


def command() -> list[str]:
    """The installed `onnxcut` script beside this Python, or the module through -c."""
    script = Path(sys.executable).with_name("onnxcut")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from onnxcut.cli.main import cli; cli()"]


def same_scores(got: Path, want: Path) -> str | None:
    """None when two scores files hold the same arrays and meta, bit for bit."""
    with np.load(got, allow_pickle=False) as a, np.load(want, allow_pickle=False) as b:
        if sorted(a.files) != sorted(b.files):
            return "different arrays"
        for key in a.files:
            if key == "meta":
                if json.loads(str(a[key])) != json.loads(str(b[key])):
                    return "meta differs"
            elif a[key].dtype != b[key].dtype or not np.array_equal(a[key], b[key]):
                return f"array '{key}' differs"
    return None


def same_model(got: Path, want: Path) -> str | None:
    """None when two models have the same graph, weights (bit for bit) and metadata."""
    a, b = onnx.load(got), onnx.load(want)
    weights_a = {t.name: t.SerializeToString() for t in a.graph.initializer}
    weights_b = {t.name: t.SerializeToString() for t in b.graph.initializer}
    changed = sorted(
        k for k in weights_a.keys() | weights_b.keys() if weights_a.get(k) != weights_b.get(k)
    )
    if changed:
        return f"{len(changed)} weights differ ({changed[0]}, ...)"
    meta_a = {p.key: p.value for p in a.metadata_props}
    meta_b = {p.key: p.value for p in b.metadata_props}
    if meta_a != meta_b:
        keys = sorted(k for k in meta_a.keys() | meta_b.keys() if meta_a.get(k) != meta_b.get(k))
        return f"metadata {', '.join(keys)} differs: {meta_a.get(keys[0])} vs {meta_b.get(keys[0])}"
    a.ClearField("metadata_props")
    b.ClearField("metadata_props")
    if a.graph.SerializeToString() != b.graph.SerializeToString():
        return "graphs differ"
    return None


@dataclass(frozen=True)
class Job:
    name: str
    args: tuple[str, ...]  # without --resume; OUT stands for the output folder
    output: str  # file name in the output folder
    compare: Callable[[Path, Path], str | None]

    @property
    def checkpoint(self) -> str:
        return self.output + ".partial"

    def argv(self, out: Path, resume: bool = False) -> list[str]:
        args = [a.replace(OUT, str(out)) for a in self.args]
        return [*command(), *args, *(["--resume"] if resume else [])]


def jobs(b: Base, images: int = 96, epochs: int = 1) -> list[Job]:
    """attribute and distill on the fault matrix's base files: attribute checkpoints every 64
    images (its fixed interval), distill every 2 steps of 4 images."""
    data = str(write_images(b.root / f"kill_images_{images}", images, seed=7))
    quick = ("--data", data, "--batch", "4", "--threads", "1")
    attribute = ("attribute", str(b.model), "-o", f"{OUT}/s.npz", "--tau", "0.3", *quick)
    distill = (
        *("distill", str(b.cut), "--teacher", str(b.model), "-o", f"{OUT}/d.onnx"),
        *("--epochs", str(epochs), "--lr", "1e-3", "--checkpoint-every", "2", *quick),
    )
    return [
        Job("attribute", attribute, "s.npz", same_scores),
        Job("distill", distill, "d.onnx", same_model),
    ]


@dataclass
class Reference:
    output: Path
    seconds: float  # the whole run
    working: float  # from the first checkpoint to the output


def reference(job: Job, work: Path, timeout: float = 300) -> Reference:
    """Run the job to the end once, timing when its first checkpoint appears."""
    out = work / f"{job.name}_reference"
    out.mkdir(parents=True)
    start = time.monotonic()
    proc = subprocess.Popen(job.argv(out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = written = None
    while proc.poll() is None:
        if first is None and (out / job.checkpoint).exists():
            first = time.monotonic()
        if written is None and (out / job.output).exists():
            written = time.monotonic()
        if time.monotonic() - start > timeout:
            proc.kill()
            proc.wait()
            raise AssertionError(f"{job.name} ran past {timeout} s")
        time.sleep(0.005)
    end = time.monotonic()
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    assert proc.returncode == 0, stderr
    assert first is not None, f"{job.name} wrote no checkpoint: {stderr}"
    return Reference(out / job.output, end - start, (written or end) - first)


@dataclass
class Trial:
    delay: float  # seconds after the first checkpoint appeared
    killed: bool  # False: the run ended before the kill
    at: str  # what the checkpoint held when the process died
    difference: str | None  # None: the resumed output equals the reference


def _progress(job: Job, out: Path) -> str:
    path = out / job.checkpoint
    if not path.exists():
        return "output written" if (out / job.output).exists() else "no checkpoint"
    with np.load(path, allow_pickle=False) as f:
        meta = json.loads(str(f["meta"]))
    return f"step {meta['step']}" if "step" in meta else f"{meta['done']} images"


def trial(job: Job, ref: Reference, work: Path, delay: float, timeout: float = 300) -> Trial:
    """Start the job, SIGKILL it `delay` s after its first checkpoint, resume, compare."""
    work.mkdir(parents=True)
    proc = subprocess.Popen(job.argv(work), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    start = time.monotonic()
    while proc.poll() is None and not (work / job.checkpoint).exists():
        assert time.monotonic() - start < timeout, f"{job.name}: no checkpoint in {timeout} s"
        time.sleep(0.002)
    try:
        proc.wait(timeout=delay)
        killed = False
    except subprocess.TimeoutExpired:
        proc.kill()  # SIGKILL
        proc.wait()
        killed = True
    at = _progress(job, work) if killed else "finished"
    resumed = subprocess.run(job.argv(work, resume=True), capture_output=True, timeout=timeout)
    if resumed.returncode != 0:
        return Trial(
            delay, killed, at, f"--resume exited {resumed.returncode}: {resumed.stderr[-300:]!r}"
        )
    return Trial(delay, killed, at, job.compare(work / job.output, ref.output))


def kill_and_resume(
    job: Job, work: Path, kills: int, seed: int = 0
) -> tuple[Reference, list[Trial]]:
    """The reference run, then `kills` trials at seeded random delays within its working time."""
    ref = reference(job, work)
    rng = np.random.default_rng(seed)
    delays = rng.uniform(0, ref.working, kills)
    return ref, [
        trial(job, ref, work / f"{job.name}_kill_{i}", float(d)) for i, d in enumerate(delays)
    ]


def table(results: Sequence[tuple[Job, Reference, list[Trial]]]) -> str:
    lines = [
        "| verb | kill | delay after first checkpoint | checkpoint at the kill | resumed output |",
        "|---|---|---|---|---|",
    ]
    for job, _, trials in results:
        for i, t in enumerate(trials, 1):
            what = "identical" if t.difference is None else f"DIFFERS: {t.difference}"
            state = t.at if t.killed else "run ended before the kill"
            lines.append(f"| {job.name} | {i} | {t.delay:.2f} s | {state} | {what} |")
    return "\n".join(lines)
