"""`attribute --ray`: shards as Ray tasks on a local head and two workers (onnxcut[ray])."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from onnxcut.attribution.driver import AttributeOptions, attribute
from onnxcut.attribution.scores import load_scores
from onnxcut.cli.main import cli

from conftest import ROOT, copy_images, sample_model

SCENES = ROOT / "samples" / "data" / "digit_scenes" / "val" / "images"
OPTS = AttributeOptions(tau=0.7, batch=4)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ray_images")
    copy_images(sorted(SCENES.glob("*.png"))[:10], root)
    return root


@pytest.fixture(scope="module")
def cluster():
    """A head without CPUs and two one-CPU worker nodes on this machine; stopped afterwards."""
    pytest.importorskip("ray", reason="the [ray] extra is not installed")
    from ray.cluster_utils import Cluster

    c = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False},
    )
    for _ in range(2):
        c.add_node(num_cpus=1)
    c.wait_for_nodes()
    yield c.address
    c.shutdown()


def _assert_same(a, b):
    assert set(a.arrays) == set(b.arrays)
    for key in a.arrays:
        np.testing.assert_array_equal(a.arrays[key], b.arrays[key], err_msg=key)
    np.testing.assert_array_equal(a.count, b.count)


def test_ray_shards_merge_to_the_single_run(cluster, images: Path, tmp_path: Path):
    single = attribute(sample_model("deeplab_digits"), images, OPTS)
    out = tmp_path / "scores.npz"
    result = CliRunner().invoke(
        cli,
        [
            "attribute",
            str(sample_model("deeplab_digits")),
            "--data",
            str(images),
            "-o",
            str(out),
            "--tau",
            "0.7",
            "--batch",
            "4",
            "--shards",
            "3",
            f"--ray={cluster}",
        ],
    )
    assert result.exit_code == 0, result.output
    merged = load_scores(out)
    _assert_same(merged, single)
    assert merged.meta["merged_shards"] == ["1/3", "2/3", "3/3"]
    assert not out.with_name(out.name + ".shards").exists()


def test_failing_shard_is_named_and_finished_ones_resume(cluster, images: Path, tmp_path: Path):
    from onnxcut.attribution.cluster import attribute_ray, run_shard
    from onnxcut.errors import DataError

    attempts = tmp_path / "attempts"
    attempts.mkdir()

    def flaky(model, folder, opts, checkpoint, tracker):
        if opts.shard == "2/3":  # every attempt at shard 2 dies; each leaves a file
            (attempts / f"{len(list(attempts.iterdir()))}").touch()
            raise RuntimeError("disk on fire")
        return run_shard(model, folder, opts, checkpoint, tracker)

    work = tmp_path / "work"
    model = sample_model("deeplab_digits")
    with pytest.raises(DataError, match=r"shard 2/3 failed 3 times \(.*disk on fire"):
        attribute_ray(model, images, OPTS, address=cluster, shards=3, work_dir=work, task=flaky)
    assert len(list(attempts.iterdir())) == 3
    assert sorted(p.name for p in work.glob("*.npz")) == ["shard-1-of-3.npz", "shard-3-of-3.npz"]

    def only_second(model, folder, opts, checkpoint, tracker):
        assert opts.shard == "2/3", f"shard {opts.shard} ran again"
        return run_shard(model, folder, opts, checkpoint, tracker)

    resumed = attribute_ray(
        model, images, OPTS, address=cluster, shards=3, work_dir=work, resume=True, task=only_second
    )
    _assert_same(resumed, attribute(model, images, OPTS))


def _cli(args: list[str]):
    return CliRunner().invoke(cli, ["attribute", str(sample_model("deeplab_digits")), *args])


def test_bad_ray_inputs_are_one_line(images: Path, tmp_path: Path, monkeypatch):
    out = str(tmp_path / "s.npz")
    common = ["--data", str(images), "-o", out]
    cases = [
        (["--ray", "--shards", "0"], "--shards 0"),
        (["--shards", "2"], "--shards N runs with --ray"),
        (["--ray", "--shard", "1/2"], "--shard K/N and --ray do not mix"),
    ]
    try:
        import ray  # noqa: F401

        cases.append((["--ray=127.0.0.1:1"], "no Ray cluster reachable"))
    except ImportError:
        pass
    for args, message in cases:
        result = _cli([*common, *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output, result.output
        assert not Path(out).exists()
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    result = _cli([*common, "--ray"])
    assert result.exit_code == 2 and "pip install 'onnxcut[ray]'" in result.output, result.output


def test_a_user_error_in_a_task_comes_back_as_it_is(cluster, images: Path, tmp_path: Path):
    """Not retried: the same settings would fail again. The one line names the flag."""
    from onnxcut.attribution.cluster import attribute_ray
    from onnxcut.errors import DataError

    opts = AttributeOptions(tau=0.7, layers=("no_such_node",))
    with pytest.raises(DataError, match="--layers names unknown node"):
        attribute_ray(sample_model("deeplab_digits"), images, opts, address=cluster, shards=2)


def test_a_gpu_provider_on_a_cluster_without_gpus_is_refused(cluster, images: Path):
    from onnxcut.attribution.cluster import attribute_ray
    from onnxcut.errors import DataError

    opts = AttributeOptions(tau=0.7, provider="cuda")
    with pytest.raises(DataError, match="the cluster has no GPU"):
        attribute_ray(sample_model("deeplab_digits"), images, opts, address=cluster)


def test_progress_ends_at_the_images_a_top_k_run_selects(cluster, tmp_path: Path):
    """With --top-k each shard attributes the selected images only: the bar's total is
    theirs, not the listed count, and it ends full."""
    from onnxcut.attribution.cluster import attribute_ray

    folder = tmp_path / "digits"
    folder.mkdir()
    found = sorted((ROOT / "samples/data/digits_cls/val").glob("*/*.png"))[::10]
    copy_images(found, folder)
    model = sample_model("resnet_digits_cls")
    opts = AttributeOptions(top_k=1, batch=4)
    single: list[tuple[int, int]] = []
    attribute(model, folder, opts, progress=lambda d, t: single.append((d, t)))
    selected = single[-1][1]
    assert selected < len(found)
    calls: list[tuple[int, int]] = []
    attribute_ray(
        model, folder, opts, address=cluster, shards=2, progress=lambda d, t: calls.append((d, t))
    )
    assert calls[-1] == (selected, selected)
    assert all(d <= t for d, t in calls)
