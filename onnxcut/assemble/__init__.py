"""Assemble stage: takes several models (or sub-networks `extract` made, or plans on one model),
each with the categories to keep, and gives one model that computes all of them.

The parts must take the same input and read images alike. Their category outputs are joined
along the category axis (one background channel for segmentation), and `onnxcut.categories`
records `[part, original category]` for every output channel. Identical nodes are computed
once; sub-networks given as plans on one model become the union of their channels (CNN LEGO's
same-model assembling). `--calibrate` fits a temperature per part so that logits of different
models share one scale; `teacher_for` joins the parts' whole models into one teacher with
the assembled model's channels, for distill.
"""

from __future__ import annotations

from onnxcut.assemble.driver import ASSEMBLY_KEY, AssembleOptions, assemble
from onnxcut.assemble.parts import Part, parse_part
from onnxcut.assemble.sharing import share_identical_inplace, union_plan
from onnxcut.assemble.teachers import teacher_for

__all__ = [
    "ASSEMBLY_KEY",
    "AssembleOptions",
    "Part",
    "assemble",
    "parse_part",
    "share_identical_inplace",
    "teacher_for",
    "union_plan",
]
