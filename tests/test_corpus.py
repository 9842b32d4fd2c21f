"""The survey corpus (issue 13): every verb on small nets spelled as real exporters spell
them, with zero tracebacks and the extracted model equal to the masked one within 1e-5."""

from __future__ import annotations

from pathlib import Path

import pytest

from corpus.survey import survey, table
from corpus.variants import QUICK, VARIANTS


def test_corpus_spans_the_issue():
    spellings = [v.spelling for v in VARIANTS.values()]
    assert {s.ir for s in spellings} == set(range(3, 11))
    assert {s.opset for s in spellings} == set(range(9, 22))
    assert {v.task for v in VARIANTS.values()} == {"segment", "classify"}
    for flag in ("inits_as_inputs", "shapeless", "pad", "dynamic_batch"):
        assert any(getattr(s, flag) for s in spellings), flag
    assert {s.weights for s in spellings} == {"initializer", "constant"}
    assert {s.bias for s in spellings} == {"conv", "reshape", "constantofshape"}
    assert {s.bn for s in spellings} == {"node", "spelled"}
    assert {s.layout for s in spellings} == {"nchw", "nhwc"}


@pytest.mark.parametrize("name", QUICK)
def test_every_verb_on_a_variant(name: str, tmp_path: Path):
    row = survey(VARIANTS[name], tmp_path)
    assert row.passed, (row.cells, row.failures, row.difference)


@pytest.mark.slow
def test_every_verb_on_every_variant(tmp_path: Path):
    rows = [survey(v, tmp_path / name.replace("/", "_")) for name, v in VARIANTS.items()]
    print("\n" + table(rows))
    failed = {r.variant: (r.cells, r.failures, r.difference) for r in rows if not r.passed}
    assert not failed, failed


@pytest.mark.parametrize("name", ["ir3-opset9", "init-inputs/cla"])
def test_no_dead_weights_where_initializers_are_inputs(name: str, tmp_path: Path):
    """IR 3 exports list initializers as graph inputs: the weights a compensated cut or a
    refit replaces leave the file with their input entries, not stay as dead weight."""
    import onnx

    row = survey(VARIANTS[name], tmp_path)
    assert row.passed, row.failures
    for made in ("cut.onnx", "refit.onnx"):
        model = onnx.load(tmp_path / made)
        read = {i for n in model.graph.node for i in n.input}
        dead = [t.name for t in model.graph.initializer if t.name not in read]
        assert not dead, (made, dead)
        # No input entry outlives its initializer: it would become a required input.
        inits = {t.name for t in model.graph.initializer}
        assert [v.name for v in model.graph.input if v.name not in inits] == ["input"], made


@pytest.mark.parametrize("name", QUICK)
def test_reconstruction_on_a_variant(name: str, tmp_path: Path):
    """Refit readers of an exporter-spelled model; its cut still equals its mask."""
    import json

    import onnxcut
    from onnxcut.attribution.reconstruction import reconstruct
    from onnxcut.graph.io import save

    from corpus.survey import difference

    row = survey(VARIANTS[name], tmp_path)
    assert row.passed, row.failures
    plan = json.loads((tmp_path / "plan.json").read_text())
    plan.pop("compensation", None)
    refit = reconstruct(tmp_path / "model.onnx", plan, tmp_path / "images")
    assert any("_reconstructed_" in t.name for t in refit.graph.initializer)
    save(onnxcut.extract(refit, plan), tmp_path / "refit_cut.onnx")
    save(onnxcut.mask(refit, plan), tmp_path / "refit_masked.onnx")
    diff = difference(tmp_path / "refit_cut.onnx", tmp_path / "refit_masked.onnx", plan)
    assert diff <= 1e-5, diff


@pytest.mark.parametrize("name", [*QUICK, "nhwc/seg"])
def test_hints_find_the_teachers_channels_in_exporter_spellings(name: str, tmp_path: Path):
    """Upstream of everything the cut changes, a sub-network computes its original's kept
    channels exactly: there the teacher's hint feature equals the student's own tensor,
    whatever the exporter's spelling (NHWC bodies, Constant weights, IR 3)."""
    import numpy as np
    import onnx

    from onnxcut.attribution.probe import find_head, output_categories
    from onnxcut.graph.io import load
    from onnxcut.runtime import session
    from onnxcut.train.hints import match_hints
    from onnxcut.train.losses import hint_target
    from onnxcut.train.params import trainable
    from onnxcut.train.teacher import Teacher

    variant = VARIANTS[name]
    assert survey(variant, tmp_path).passed
    s, t = load(tmp_path / "cut.onnx"), load(tmp_path / "model.onnx")
    axis = 3 if "--category-axis" in variant.head_args else None
    head = find_head(s, axis=axis)
    hints = match_hints(s, t, trainable(s), head.score)
    cats = output_categories(s, head) or list(range(head.n_categories))
    kind = "sigmoid" if head.probs == "sigmoid" else "softmax"
    teacher = Teacher(t, cats, kind, 1.0, category_axis=axis, hints=hints, hint_weight=1.0)
    data = next(v for v in s.graph.input if v.name not in {i.name for i in s.graph.initializer})
    shape = [d.dim_value or 2 for d in data.type.tensor_type.shape.dim]
    x = np.random.default_rng(0).standard_normal([2, *shape[1:]]).astype(np.float32)
    feeds = teacher.feeds(x, 2)
    probe = onnx.ModelProto()
    probe.CopyFrom(s)
    probe.graph.output.extend(
        onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in hints
    )
    run = session(probe)
    diffs = []
    for n in hints:
        mine = np.concatenate([run.run([n], {data.name: x[i : i + 1]})[0] for i in range(2)])
        theirs = feeds[hint_target(n)]
        diffs.append(float(np.abs(theirs - mine).max() / (np.abs(theirs).max() + 1e-12)))
    assert min(diffs) <= 1e-6, dict(zip(hints, diffs, strict=True))
