"""attribute() over a Ray cluster: the shards of one run as Ray tasks, merged exactly.

Each task runs shard K/N (`--shard K/N`, as one process would) and returns its Scores;
per-image vectors are quantised, so `merge` of the shards equals a single-process run bit
for bit. Finished shards are saved under `work_dir`, so `resume` skips them and a shard
that fails three times leaves the others kept. A worker builds the model's sessions once
and reuses them for every shard it runs. The model and the image folder must be readable
at the same path on every node (a shared file system), and onnxcut installed there.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from onnxcut import data
from onnxcut.attribution.driver import AttributeOptions, Prepared, attribute, prepare
from onnxcut.attribution.scores import Scores, load_scores, merge, save_scores
from onnxcut.errors import DataError, OnnxcutError, RuntimeMissingError
from onnxcut.graph.io import load

log = logging.getLogger(__name__)

ATTEMPTS = 3  # a task runs at most this often before its shard counts as failed
_INSTALL = "--ray needs Ray: pip install 'onnxcut[ray]'"
_PREPARED: dict[str, Prepared] = {}  # per worker process: sessions built once per run


def import_ray():
    try:
        import ray
    except ImportError:
        raise RuntimeMissingError(_INSTALL) from None
    return ray


def run_shard(
    model: str, images: str, opts: AttributeOptions, checkpoint: str | None, tracker: Any
) -> Scores | OnnxcutError:
    """One shard, in a Ray worker. A user error comes back as a value: retrying cannot help."""
    key = repr((model, os.path.getmtime(model), images, dataclasses.replace(opts, shard=None)))
    try:
        if key not in _PREPARED:
            _PREPARED[key] = prepare(model, images, opts)

        def progress(done: int, total: int) -> None:
            tracker.update.remote(opts.shard, done, total)

        # The partial file exists only where the work folder is shared with the driver.
        local = checkpoint if checkpoint and Path(checkpoint).parent.is_dir() else None
        scores = attribute(
            model,
            images,
            opts,
            checkpoint=local,
            resume=True,
            progress=progress,
            prepared=_PREPARED[key],
        )
        tracker.update.remote(opts.shard, scores.meta["done"], scores.meta["done"])
        return scores
    except OnnxcutError as e:
        return e


class _Progress:
    """Ray actor: images done and listed per shard, for the driver's one progress bar."""

    def __init__(self) -> None:
        self.shards: dict[str, tuple[int, int]] = {}

    def update(self, shard: str, done: int, total: int) -> None:
        self.shards[shard] = (done, total)

    def state(self) -> dict[str, tuple[int, int]]:
        return dict(self.shards)


def attribute_ray(
    model: str | os.PathLike[str],
    images: str | os.PathLike[str],
    options: AttributeOptions | None = None,
    *,
    address: str | None = None,
    shards: int | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: Callable[[int, int], None] | None = None,
    task: Callable = run_shard,
) -> Scores:
    """Run attribute() as `shards` Ray tasks and merge them.

    `address` joins a running cluster ("auto", "HOST:PORT" or "ray://HOST:PORT"); None
    starts a local one for this run. `shards` defaults to the cluster's CPUs (GPUs with the
    cuda or tensorrt provider). Finished shards go to `work_dir`; with `resume` those found
    there are not run again. `task` is the function each Ray task runs (tests inject
    failures through it).
    """
    opts = options or AttributeOptions()
    if shards is not None and shards < 1:
        raise DataError(f"--shards {shards}: use 1 or more")
    if opts.shard:
        raise DataError("--shard K/N and --ray do not mix: --ray runs every shard; use --shards N")
    model, images = str(Path(model).resolve()), str(Path(images).resolve())
    load(model)  # one-line errors for a bad model or folder before the cluster starts
    listed = data.list_images(Path(images))
    ray = import_ray()
    _connect(ray, address)
    try:
        gpu = opts.provider in ("cuda", "tensorrt")
        resources = ray.cluster_resources()
        if gpu and resources.get("GPU", 0) < 1:  # the tasks would wait for a GPU forever
            raise DataError(
                f"--provider {opts.provider} with --ray: the cluster has no GPU; "
                "use --provider cpu or join a cluster with GPUs"
            )
        n = shards or max(int(resources.get("GPU" if gpu else "CPU", 1)), 1)
        threads = opts.threads or 1  # one core per task unless told otherwise
        folder = Path(work_dir) if work_dir else None
        finished = _finished(folder, n, resume)
        tracker = ray.remote(_Progress).options(num_cpus=0).remote()
        remote = ray.remote(task).options(
            num_cpus=threads if not gpu else 1,
            num_gpus=1 if gpu else 0,
            max_retries=ATTEMPTS - 1,
            retry_exceptions=True,
        )
        pending = {}
        for k in range(1, n + 1):
            if k in finished:
                continue
            shard_opts = dataclasses.replace(opts, shard=f"{k}/{n}", threads=threads)
            checkpoint = str(folder / f"shard-{k}-of-{n}.partial") if folder else None
            pending[remote.remote(model, images, shard_opts, checkpoint, tracker)] = k
        try:
            failed = _collect(ray, pending, finished, folder, n, tracker, progress, len(listed))
        finally:
            for ref in pending:  # an error or an interrupt: stop what still runs on a cluster
                ray.cancel(ref, force=True)
        if failed:
            k, why = min(failed.items())
            kept = f"{len(finished)} finished shards kept in {folder}" if folder else "nothing kept"
            raise DataError(
                f"shard {k}/{n} failed {ATTEMPTS} times ({why}); {len(failed)} shard(s) failed, "
                f"{kept}; fix the cause and rerun with --resume"
            )
        merged = merge([finished[k] for k in sorted(finished)])
        merged.meta.update(model_path=model, data_path=images)
        return merged
    finally:
        ray.shutdown()  # stops a cluster started here; only disconnects from another


def _collect(ray, pending: dict, finished: dict, folder, n: int, tracker, progress, total: int):
    """Wait for the shards in `pending` (ref -> k), saving each as it ends; {k: reason} of
    those that failed every attempt. A user error from a task is raised as it is."""
    base = sum(int(s.meta["done"]) for s in finished.values())
    waiting = len(pending)  # shards run here; each reports its own image count once it starts
    failed: dict[int, str] = {}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
        for ref in ready:
            k = pending.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as e:  # a RayTaskError holds the task's own as its cause
                failed[k] = _reason(getattr(e, "cause", None) or e)
                continue
            if isinstance(result, OnnxcutError):
                raise result
            finished[k] = result
            if folder:
                save_scores(result, folder / f"shard-{k}-of-{n}.npz")
        if progress:
            state = list(ray.get(tracker.state.remote()).values())
            # Shards not started yet count as an even share of the listed images; with
            # --top-k a shard's own count is the images selected, fewer than listed.
            unseen = max(waiting - len(state), 0) * total / n
            overall = round(base + sum(t for _, t in state) + unseen)
            progress(min(base + sum(d for d, _ in state), overall), overall)
    return failed


def _reason(error: BaseException) -> str:
    """One line for an error: its type and first line, without Ray's terminal colours."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _connect(ray, address: str | None) -> None:
    """Join the cluster at `address`, or start a local one."""
    if address in (None, "", "local"):
        ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        return
    if address != "auto":
        # ray.init retries an unreachable address for minutes: check the port first.
        host, _, port = address.removeprefix("ray://").rpartition(":")
        if host in ("localhost", "127.0.0.1", "::1"):
            host = ray.util.get_node_ip_address()  # where Ray itself will connect
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except (OSError, ValueError) as e:
            raise DataError(
                f"--ray {address}: no Ray cluster reachable there ({e}); start one with "
                "`ray start --head` or pass its HOST:PORT"
            ) from None
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise DataError(f"--ray {address}: cannot join the Ray cluster ({e})") from None


def _finished(folder: Path | None, n: int, resume: bool) -> dict[int, Scores]:
    """Shards saved by an earlier run of the same N (resume), else a clean work folder."""
    if folder is None:
        return {}
    if not resume and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    found = {}
    for k in range(1, n + 1):
        path = folder / f"shard-{k}-of-{n}.npz"
        if path.exists():
            found[k] = load_scores(path)
    if found:
        log.info("resuming: %d of %d shards already finished", len(found), n)
    return found
