"""In-place edits of a ModelProto that several stages share: filtering repeated fields,
metadata entries, and dropping the initializers no node reads any more."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import onnx
from onnx import ModelProto


def drop_unread_initializers(model: ModelProto, names: Iterable[str] | None = None) -> None:
    """Remove the initializers (of `names`, or any) that no node reads, in place.

    Old exports (IR 3) list every initializer as a graph input too: such an input is a
    weight with a default, not data, so its entry goes with it; graph outputs stay.
    """
    read = set(inputs_read(model.graph)) | {v.name for v in model.graph.output}
    inits = {t.name for t in model.graph.initializer}
    gone = (inits if names is None else inits & set(names)) - read
    if gone:
        retain(model.graph.initializer, lambda t: t.name not in gone)
        retain(model.graph.input, lambda v: v.name not in gone)


def retain(field, keep: Callable[[Any], bool]) -> None:
    """Keep the items of a repeated protobuf field that `keep` accepts, in order."""
    items = [x for x in field if keep(x)]
    del field[:]
    field.extend(items)


def set_metadata(model: ModelProto, key: str, value: str) -> None:
    """Set one metadata_props entry, replacing any earlier one of that key."""
    retain(model.metadata_props, lambda p: p.key != key)
    model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))


def inputs_read(graph) -> Iterator[str]:
    """Every input name the graph's nodes read, subgraphs (If, Loop) included."""
    for n in graph.node:
        yield from n.input
        for a in n.attribute:
            for sub in [a.g] if a.HasField("g") else list(a.graphs):
                yield from inputs_read(sub)
