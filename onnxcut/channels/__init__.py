"""Channels stage: takes a loaded model, gives its channel groups and applies plans to it.

`trace` walks the graph once with the per-op rule tables and returns the groups of channels
that must be cut together (frozen where a cut cannot be proven exact); `extract` slices a
plan's channels out and `mask` zeroes them, the reference `extract` must equal. `summarize`
describes a model (params, FLOPs, layers, groups).
"""

from __future__ import annotations

from onnxcut.channels.deps import ChannelGroup, ChannelTrace, build_groups, trace
from onnxcut.channels.inspection import summarize
from onnxcut.channels.plan import Plan, load_plan
from onnxcut.channels.surgery import extract, mask

__all__ = [
    "ChannelGroup",
    "ChannelTrace",
    "Plan",
    "build_groups",
    "extract",
    "load_plan",
    "mask",
    "summarize",
    "trace",
]
