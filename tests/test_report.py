"""onnxcut report: the page, its figures, bad inputs, and a render in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from onnxcut.attribution.scores import Scores, load_scores, save_scores
from onnxcut.cli.main import cli
from onnxcut.report import measures
from onnxcut.report.route import route_graph

from conftest import ROOT, copy_images, sample_model

SCENES = ROOT / "samples" / "data" / "digit_scenes" / "val"
DIGITS = ROOT / "samples" / "data" / "digits_cls" / "val"
IMG = re.compile(r'<img src="data:image/png;base64,([^"]+)" width="(\d+)" height="(\d+)"')


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def ok(*args):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def seg(tmp_path_factory) -> dict[str, Path]:
    """A small sample run on deeplab_digits: scores, plan, sub-network, two eval reports."""
    root = tmp_path_factory.mktemp("seg")
    for kind in ("images", "masks"):
        (root / kind).mkdir()
        copy_images(sorted((SCENES / kind).glob("*.png"))[:24], root / kind)
    run = {k: root / f"{k}" for k in ("scores.npz", "plan.json", "sub.onnx")}
    model = sample_model("deeplab_digits")
    ok("attribute", model, "--data", root / "images", "-o", run["scores.npz"])
    ok("plan", run["scores.npz"], "--classes", "3,5", "-o", run["plan.json"])
    ok("extract", model, "--plan", run["plan.json"], "-o", run["sub.onnx"])
    for name, m in (("full", model), ("sub", run["sub.onnx"])):
        masks = ["--masks", root / "masks", "--classes", "3,5", "--runs", "3"]
        text = ok("eval", m, "--data", root / "images", *masks, "--json").output
        (root / f"eval_{name}.json").write_text(text)
    return {"root": root, "model": model, **run}


@pytest.fixture(scope="module")
def cls(tmp_path_factory) -> dict[str, Path]:
    """A classifier run on resnet_digits_cls: scores with relevance routes, and a plan."""
    pytest.importorskip("matplotlib")
    root = tmp_path_factory.mktemp("cls")
    for folder in sorted(DIGITS.iterdir()):
        (root / "images" / folder.name).mkdir(parents=True)
        copy_images(sorted(folder.glob("*.png"))[:4], root / "images" / folder.name)
    scores, plan = root / "scores.npz", root / "plan.json"
    model = sample_model("resnet_digits_cls")
    ok("attribute", model, "--data", root / "images", "--top-k", "3", "-o", scores)
    ok("plan", scores, "--classes", "3,5", "-o", plan)
    return {"root": root, "scores.npz": scores, "plan.json": plan}


def _images(html: str) -> list[tuple[bytes, int, int]]:
    return [(base64.b64decode(d), int(w), int(h)) for d, w, h in IMG.findall(html)]


def test_sample_report_is_self_contained_and_small(seg, tmp_path: Path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    out = tmp_path / "report.html"
    evals = ["--eval", seg["root"] / "eval_full.json", "--eval", seg["root"] / "eval_sub.json"]
    started = time.process_time()
    result = ok(
        "report", seg["scores.npz"], "--plan", seg["plan.json"], "--sub", seg["sub.onnx"],
        *evals, "--runs", "3", "-o", out,
    )  # fmt: skip
    cpu = time.process_time() - started
    assert cpu < 10, f"{cpu:.1f} s of CPU for the sample report (target: 10 s)"
    assert out.stat().st_size < 5e6
    html = out.read_text()
    assert "<script" not in html.lower()
    assert not re.search(r"(src|href)=\"(https?:)?//", html), "nothing may come from the network"
    images = _images(html)
    layers = len(load_scores(seg["scores.npz"]).layers())
    # divergence, plan, per-class eval, one per layer
    assert len(images) == 3 + layers == int(result.output.split(": ")[1].split()[0])
    for data, width, height in images:
        image = Image.open(io.BytesIO(data))
        image.load()  # decodes the whole PNG
        assert image.size == (width, height) and width <= 1240 and height > 100
    assert "Frozen groups" not in html  # deeplab_digits freezes nothing but its head
    for text in ("Where categories separate", "kept channels per layer", "sub-network", "eval_sub"):
        assert text in html
    assert "latency (ms)" in html and "FLOPs (MACs)" in html


def test_png_dir_holds_every_figure(seg, tmp_path: Path):
    pytest.importorskip("matplotlib")
    out, pngs = tmp_path / "r.html", tmp_path / "figures"
    ok("report", seg["scores.npz"], "--plan", seg["plan.json"], "--png", pngs, "-o", out)
    files = sorted(p.name for p in pngs.iterdir())
    assert len(files) == len(_images(out.read_text()))
    assert "divergence.png" in files and "plan.png" in files
    assert all(Path(pngs / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in files)


def test_classifier_report_draws_routes(cls, tmp_path: Path):
    out = tmp_path / "r.html"
    ok("report", cls["scores.npz"], "--plan", cls["plan.json"], "-o", out, "--png", tmp_path)
    assert (tmp_path / "route-3.png").exists() and (tmp_path / "route-5.png").exists()
    ok("report", cls["scores.npz"], "--route", "7", "-o", out, "--png", tmp_path / "b")
    assert [p.name for p in (tmp_path / "b").glob("route-*")] == ["route-7.png"]


def test_route_graph_runs_from_input_to_the_logit(cls):
    from onnxcut.graph.io import load

    scores = load_scores(cls["scores.npz"])
    graph = route_graph(scores, 3, load(sample_model("resnet_digits_cls")), top=4)
    assert graph.head and graph.nodes[-1] == [(3, 1.0)]
    assert graph.columns[:-1] == scores.layers("relevance")
    for nodes, name in zip(graph.nodes[:-1], graph.columns, strict=False):
        mean = scores.mean("relevance", name)[3]
        assert [c for c, _ in nodes] == np.argsort(-mean, kind="stable")[: len(nodes)].tolist()
    assert graph.edges and all(a < b for a, _, b, _, _ in graph.edges)
    assert any(b == len(graph.columns) - 1 for _, _, b, _, _ in graph.edges)  # into the logit
    assert max(w for *_, w in graph.edges) == 1.0
    bare = route_graph(scores, 3, None, top=4)  # without the model: nodes only
    assert not bare.edges and bare.nodes == graph.nodes[:-1]


def test_bad_route_category(cls, tmp_path: Path):
    result = invoke("report", cls["scores.npz"], "--route", "12", "-o", tmp_path / "r.html")
    assert result.exit_code == 2 and "--route '12'" in result.output
    assert not list(tmp_path.iterdir())


def _refused(result, tmp_path: Path, *words: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert all(w in lines[0] for w in words), lines[0]
    assert not list((tmp_path / "out").iterdir()), "nothing may be written"


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    (tmp_path / "out").mkdir()
    return tmp_path / "out"


def test_plan_from_another_model_is_refused(seg, tmp_path: Path, out_dir: Path):
    plan = json.loads(seg["plan.json"].read_text())
    plan["model_sha256"] = "ab" * 32
    other = tmp_path / "other.json"
    other.write_text(json.dumps(plan))
    args = ["report", seg["scores.npz"], "--plan", other, "-o", out_dir / "r.html"]
    _refused(invoke(*args, "--png", out_dir / "png"), tmp_path, "another model", "abababababab")


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ({"task": "classify", "top1": 0.9}, ["classify eval report", "segment run"]),
        ({"format": "onnxcut.plan/1", "keep": {}}, ["not an onnxcut eval report"]),
        ([1, 2, 3], ["not an onnxcut eval report"]),
        ("{not json", ["not a JSON eval report"]),
        ({"task": "segment", "miou": 0.5}, ["lacks"]),
    ],
)
def test_eval_of_another_kind_is_refused(seg, tmp_path: Path, out_dir, content, words):
    path = tmp_path / "e.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    if isinstance(content, dict) and content.get("task") == "classify":
        full = json.loads((seg["root"] / "eval_full.json").read_text())
        path.write_text(json.dumps({**full, **content}))
    result = invoke("report", seg["scores.npz"], "--eval", path, "-o", out_dir / "r.html")
    _refused(result, tmp_path, str(path), *words)


def test_model_of_another_run_is_refused(seg, tmp_path: Path, out_dir: Path):
    other = sample_model("unet_digits")
    result = invoke("report", seg["scores.npz"], "--model", other, "-o", out_dir / "r.html")
    _refused(result, tmp_path, "not the model")


def test_missing_matplotlib_names_the_extra(seg, monkeypatch, tmp_path: Path, out_dir: Path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    result = invoke("report", seg["scores.npz"], "-o", out_dir / "r.html")
    _refused(result, tmp_path, "matplotlib", "pip install 'onnxcut[report]'")


def test_import_onnxcut_needs_no_matplotlib():
    code = "import sys; sys.modules['matplotlib'] = None; import onnxcut, onnxcut.report"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_divergence_is_the_mean_pairwise_cosine():
    rng = np.random.default_rng(0)
    v = rng.random((6, 20))
    seen = np.array([True, True, False, True, True, True])
    sim = measures.cosine(v, seen)
    pairs = [sim[i, j] for i in range(6) for j in range(6) if i != j and seen[i] and seen[j]]
    assert measures.divergence(v, seen) == pytest.approx(1 - np.mean(pairs))
    assert np.isnan(sim[2]).all() and np.isnan(sim[:, 2]).all()
    assert measures.divergence(np.tile(v[:1], (6, 1)), seen) == pytest.approx(0, abs=1e-12)
    assert np.isnan(measures.divergence(v, np.eye(6, dtype=bool)[0]))


def test_wide_layers_show_their_highest_peaks():
    v = np.full((3, 1000), 1e-3)
    v[1, [5, 700, 999]] = 1.0
    shown = measures.shown_channels([v, v], limit=8)
    assert len(shown) == 8 and {5, 700, 999} <= set(shown.tolist())
    assert (np.diff(shown) > 0).all()
    assert (measures.shown_channels([v[:, :8]], limit=8) == np.arange(8)).all()


def test_short_names():
    names = ["/backbone/backbone.1/conv1/conv1.0/Conv", "/fc/Gemm", "/b/block/Conv"]
    assert measures.short_names(names) == ["backbone.1/conv1.0", "fc", "b/block"]
    assert measures.short_names(["/a/x/Conv", "/b/x/Conv"]) == ["a/x", "b/x"]
    assert measures.short_names(["/x/Conv", "x"]) == ["/x/Conv", "x"]  # would collide


def resnet_sized_scores(categories: int, layers: int = 100, seed: int = 0) -> Scores:
    """Random scores shaped like a ResNet's layers: 64 to 2048 channels, bottleneck blocks."""
    widths = [64]
    for width, blocks in ((64, 3), (128, 4), (256, 22), (512, 3)):
        for block in range(blocks):
            widths += [width, width, 4 * width] + ([4 * width] if block == 0 else [])
    rng = np.random.default_rng(seed)
    names = {f"/stage/layer{i:03d}/Conv": c for i, c in enumerate(widths[:layers])}
    scores = Scores.empty(
        [str(k) for k in range(categories)], names, ("forward", "backward"), {"task": "classify"}
    )
    scores.count[:] = 50
    for array in scores.arrays.values():
        v = rng.gamma(0.3, size=array.shape)  # sparse-ish, noisy: PNGs compress badly
        array[:] = 50 * v / v.sum(1, keepdims=True)
    return scores


@pytest.mark.slow
@pytest.mark.parametrize("categories", [10, 1000])
def test_resnet_sized_report_fits_its_budget(tmp_path: Path, categories: int):
    pytest.importorskip("matplotlib")
    from onnxcut.report import ReportOptions, report

    save_scores(resnet_sized_scores(categories), tmp_path / "s.npz")
    started = time.process_time()
    path, pictures = report(tmp_path / "s.npz", tmp_path / "r.html", ReportOptions())
    cpu = time.process_time() - started
    assert len(pictures) == 101
    assert cpu < 60, f"{cpu:.1f} s of CPU for 100 layers (target: 60 s)"
    assert path.stat().st_size < 20e6


def _chromium() -> str | None:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


# Test-only: the report has no script; this copy gets one that checks every image.
_CHECK = """<script>
window.addEventListener("load", () => {
  const bad = [...document.images].filter(i => {
    const box = i.getBoundingClientRect();
    return !(i.complete && i.naturalWidth > 0 && i.naturalHeight > 0 && box.width > 0
             && box.height > 0);
  }).map(i => i.alt);
  const out = document.createElement("pre");
  out.id = "onnxcut-check";
  out.textContent = JSON.stringify({images: document.images.length, bad: bad,
                                    width: document.documentElement.scrollWidth});
  document.body.appendChild(out);
});
</script></body>"""


def test_report_renders_in_headless_chromium(seg, cls, tmp_path: Path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium (apt-get install chromium, or set CHROMIUM=/path/to/chrome)")
    out = tmp_path / "report.html"
    evals = ["--eval", seg["root"] / "eval_full.json", "--eval", seg["root"] / "eval_sub.json"]
    ok("report", seg["scores.npz"], "--plan", seg["plan.json"], *evals, "-o", out)
    routes = tmp_path / "routes.html"
    ok("report", cls["scores.npz"], "--plan", cls["plan.json"], "-o", routes)
    flags = [
        "--headless",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1280,1600",
    ]
    for page in (out, routes):
        html = page.read_text()
        checked = tmp_path / f"checked-{page.name}"
        checked.write_text(html.replace("</body>", _CHECK))
        dom = subprocess.run(
            [browser, *flags, "--virtual-time-budget=20000", "--dump-dom", checked.as_uri()],
            capture_output=True,
            text=True,
            timeout=180,
        ).stdout
        found = re.search(r'<pre id="onnxcut-check">(.*?)</pre>', dom, re.S)
        assert found, f"Chromium gave no result for {page.name}: {dom[-500:]}"
        result = json.loads(found.group(1).replace("&amp;", "&"))
        assert result["images"] == len(_images(html)) > 0
        assert result["bad"] == [], f"broken or empty images: {result['bad']}"
        assert result["width"] <= 1280, "the page scrolls sideways at 1280 px"
    shot = tmp_path / "shot.png"
    subprocess.run(
        [browser, *flags, f"--screenshot={shot}", out.as_uri()],
        capture_output=True,
        timeout=180,
    )
    assert shot.exists(), "Chromium wrote no screenshot"
    image = Image.open(shot).convert("L")
    assert image.size == (1280, 1600)
    assert len(image.getcolors(256) or range(256)) > 16, "the screenshot is blank"


def test_route_needs_a_classifier_run(seg, tmp_path: Path, out_dir: Path):
    result = invoke("report", seg["scores.npz"], "--route", "3", "-o", out_dir / "r.html")
    _refused(result, tmp_path, "no relevance routes")


def test_report_stage_documents_itself():
    import importlib

    stage = importlib.import_module("onnxcut.report")  # the package, whatever onnxcut exports
    assert stage.__doc__ and "takes" in stage.__doc__
    assert all(hasattr(stage, name) for name in stage.__all__)
