"""How a student's category outputs map to its teacher's, and where the teacher's
probability of the categories the student dropped goes."""

from __future__ import annotations

from dataclasses import dataclass

from onnx import ModelProto

from onnxcut.attribution.probe import Head, output_categories, output_origins
from onnxcut.errors import DataError, ModelError

# Where the teacher's probability of categories the student dropped goes: spread over the
# kept ones by renormalising (the default), or into background, which is what the
# category-customised task calls those pixels.
DROPPED = ("renormalise", "background")


@dataclass(frozen=True)
class CategoryMap:
    positions: list[int]  # teacher output channel of each student output channel
    categories: list[int]  # original category of each student output channel
    labels: int = 256  # label masks name categories below this (the teacher's, 255 aside)


def fold_into(dropped: str, kind: str, head: Head, mapping: CategoryMap) -> int | None:
    """The student position that takes the dropped categories' probability, if any."""
    if dropped == "renormalise":
        return None
    if not head.spatial or 0 not in mapping.categories or kind != "softmax":
        raise DataError(
            "--dropped background needs a softmax segmenter that keeps background (category "
            "0); use --dropped renormalise"
        )
    return mapping.categories.index(0)


def category_map(s: ModelProto, sh: Head, t: ModelProto, th: Head) -> CategoryMap:
    if sh.spatial != th.spatial:
        raise ModelError(
            "the student and the teacher solve different tasks (one segments, one classifies)"
        )
    student_cats = output_categories(s, sh)
    teacher_cats = output_categories(t, th) or list(range(th.n_categories))
    origins = output_origins(s, sh)
    if origins is not None and origins == output_origins(t, th):
        # An assembled student and its parts' models joined as one teacher (teacher_for):
        # channel for channel the same, whatever categories the parts share.
        return CategoryMap(list(range(sh.n_categories)), student_cats, max(teacher_cats) + 1)
    if student_cats is None:
        if sh.n_categories != th.n_categories:
            raise ModelError(
                f"the student outputs {sh.n_categories} categories, the teacher "
                f"{th.n_categories}, and the student has no onnxcut.categories metadata to map "
                "them; make the student with onnxcut extract"
            )
        student_cats = list(teacher_cats)
    missing = [c for c in student_cats if c not in teacher_cats]
    if missing:
        raise ModelError(
            f"student categories {missing} are not among the teacher's outputs "
            f"({teacher_cats}); pass the model the student was cut from as --teacher"
        )
    return CategoryMap(
        [teacher_cats.index(c) for c in student_cats], list(student_cats), max(teacher_cats) + 1
    )
