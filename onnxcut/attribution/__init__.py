"""Attribution stage: takes a model and images, gives channel scores and, from them, plans.

`attribute` streams images through one forward and one backward session and accumulates the
Disassembler / CNN LEGO vectors per layer and category into a scores file (`Scores`);
`merge` adds shards; `make_plan` turns scores and chosen categories into a `Plan`; `Route`
follows Model LEGO relevance from a class back through a classifier. `compensate` folds the
removed channels' means into a plan, `reconstruct` refits the layers that read them (both
on unlabeled images); `cluster.attribute_ray` runs the shards on a Ray cluster.
"""

from __future__ import annotations

from onnxcut.attribution.compensation import compensate
from onnxcut.attribution.driver import AttributeOptions, attribute
from onnxcut.attribution.reconstruction import reconstruct
from onnxcut.attribution.relevance import Route
from onnxcut.attribution.scores import Scores, load_scores, merge, save_scores
from onnxcut.attribution.selection import Selection, make_plan

__all__ = [
    "AttributeOptions",
    "Route",
    "Scores",
    "Selection",
    "attribute",
    "compensate",
    "load_scores",
    "make_plan",
    "merge",
    "reconstruct",
    "save_scores",
]
