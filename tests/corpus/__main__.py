"""Print the tables of docs/reliability.md, as markdown:

    .venv/bin/python tests/corpus [survey] [faults] [kill] [flips]

survey, faults and kill (the default) are the runs of `pytest -m slow tests/test_corpus.py
tests/test_faults.py`; flips measures bit flips that leave a parseable model.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from corpus import faults, interrupt, survey
from corpus.variants import VARIANTS


def main(parts: list[str]) -> None:
    work = Path(tempfile.mkdtemp(prefix="onnxcut-corpus-"))
    if "survey" in parts:
        start = time.monotonic()
        rows = [
            survey.survey(v, work / "survey" / n.replace("/", "_")) for n, v in VARIANTS.items()
        ]
        print(survey.table(rows))
        print(f"\n{sum(r.passed for r in rows)}/{len(rows)} variants pass, "
              f"{time.monotonic() - start:.0f} s\n")  # fmt: skip
    base = faults.make_base(work / "base")
    if "faults" in parts:
        start = time.monotonic()
        cases = faults.all_cases(base, draws=10)
        results = [faults.run_case(c, base, work / "out" / str(i)) for i, c in enumerate(cases)]
        print(faults.table(results))
        print(f"\n{sum(r.passed for r in results)}/{len(results)} cases pass, "
              f"{time.monotonic() - start:.0f} s\n")  # fmt: skip
    if "kill" in parts:
        start = time.monotonic()
        runs = []
        for job in interrupt.jobs(base, **interrupt.LONG):
            ref, trials = interrupt.kill_and_resume(job, work / job.name, kills=10, seed=13)
            runs.append((job, ref, trials))
            print(f"{job.name}: reference {ref.seconds:.1f} s, {ref.working:.1f} s after the "
                  "first checkpoint")  # fmt: skip
        print(interrupt.table(runs))
        same = sum(t.difference is None for _, _, ts in runs for t in ts)
        total = sum(len(ts) for _, _, ts in runs)
        print(f"\n{same}/{total} resumed runs identical, {time.monotonic() - start:.0f} s")
    if "flips" in parts:
        (work / "flips").mkdir()
        flips(base, work / "flips")


def flips(base: faults.Base, work: Path, n: int = 300) -> None:
    """Bit flips after which the file still parses: no exit-2 promise (a flipped name is
    another valid model), but no traceback either. Prints outcomes per verb."""
    import numpy as np

    from corpus import broken

    rng = np.random.default_rng(0)
    counts: dict[tuple[str, str], int] = {}
    crashes = []
    for i in range(n):
        path = broken.bit_flipped(base.model, work / f"flip_{i}.onnx", rng, parses=True)
        verbs = faults._model_verbs(path, base)
        for verb in ("inspect", "attribute", "extract", "eval"):
            out = work / f"flip_{i}_{verb}"
            result = faults.run_case(
                faults.Case("flip", str(i), verb, tuple(map(str, verbs[verb]))), base, out
            )
            cell = "TRACEBACK" if result.traceback else f"exit {result.exit_code}"
            counts[verb, cell] = counts.get((verb, cell), 0) + 1
            if result.traceback:
                crashes.append(f"flip {i} {verb}: {result.lines[-1][:160]}")
    print("| verb | outcome | flips |\n|---|---|---|")
    for (verb, cell), k in sorted(counts.items()):
        print(f"| {verb} | {cell} | {k} |")
    print("\n".join(crashes))


if __name__ == "__main__":
    main(sys.argv[1:] or ["survey", "faults", "kill"])
