"""Attribution stage: takes a model and images, gives channel scores and, from them, plans.

`attribute` streams images through one forward and one backward session and accumulates the
Disassembler / CNN LEGO vectors per layer and category into a scores file (`Scores`);
`merge` adds shards; `make_plan` turns scores and chosen categories into a `Plan`; `Route`
follows Model LEGO relevance from a class back through a classifier.
"""

from __future__ import annotations

from onnxcut.attribution.driver import AttributeOptions, attribute
from onnxcut.attribution.relevance import Route
from onnxcut.attribution.scores import Scores, load_scores, merge, save_scores
from onnxcut.attribution.selection import Selection, make_plan

__all__ = [
    "AttributeOptions",
    "Route",
    "Scores",
    "Selection",
    "attribute",
    "load_scores",
    "make_plan",
    "merge",
    "save_scores",
]
