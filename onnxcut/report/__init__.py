"""Report stage: takes a scores file (and a plan, models, eval reports), gives one HTML page.

`report` draws, with matplotlib (the `report` extra), each probed layer's category x channel
heat maps of the forward and backward vectors and the categories' cosine similarities; the
divergence of the categories by depth; for a plan, kept channels per layer, frozen groups and
sizes (latency with the sub-network); eval reports as tables; for classifiers, a category's
Model LEGO decision route. The page is self-contained (inline CSS, base64 PNGs, no script);
`ReportOptions` carries the inputs and limits, `--png DIR` also writes each figure.
"""

from __future__ import annotations

from onnxcut.report.builder import ReportOptions, render, report
from onnxcut.report.inputs import check_eval, gather, read_eval

__all__ = ["ReportOptions", "check_eval", "gather", "read_eval", "render", "report"]
