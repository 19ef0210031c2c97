"""Text the command line prints: tables, graphs, partition ranges, JSON."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import date, datetime
from typing import Any

__all__ = [
    "STATES", "dot", "emit_json", "mermaid", "partition_summary", "record_json", "table", "text_tree",
]

from ..store.health import STATES, partition_summary


def emit_json(value: Any) -> None:
    json.dump(value, sys.stdout, default=_plain, ensure_ascii=False, indent=2)
    sys.stdout.write("\n")


def _plain(value: Any) -> Any:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Columns padded to their widest cell; numbers right-aligned."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(headers)]
    numeric = [all(_is_number(row[i]) for row in cells) and bool(cells) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            value.rjust(width) if right else value.ljust(width)
            for value, width, right in zip(values, widths, numeric, strict=True)
        ).rstrip()

    return "\n".join([line(list(headers)), line(["-" * w for w in widths]), *(line(row) for row in cells)])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}"
    if isinstance(value, datetime):
        return value.astimezone().strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


def _is_number(text: str) -> bool:
    return text.replace(",", "").replace(".", "", 1).lstrip("-").isdigit()


def record_json(record: Any) -> dict[str, Any]:
    """A materialization record as the documented JSON object."""
    return {
        "id": str(record.id), "asset": record.asset_name, "partition": record.partition,
        "run_id": str(record.run_id), "status": record.status.value,
        "started_at": _iso(record.started_at), "completed_at": _iso(record.completed_at),
        "duration_ms": record.duration_ms, "upstream_partitions": {
            name: list(keys) for name, keys in record.upstream_partitions.items()},
        "dependency_hash": record.dependency_hash, "metadata": dict(record.metadata),
        "error_message": record.error_message, "executor_node": record.executor_node,
        "tenant": record.tenant_id, "inserted_at": _iso(record.inserted_at), "updated_at": _iso(record.updated_at),
    }


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


# ------------------------------------------------------------------- graphs


def text_tree(roots: Sequence[str], children: Mapping[str, Sequence[str]], label: Any = str) -> str:
    """Each root and what hangs below it; a node met again is shown once, then named."""
    lines: list[str] = []
    shown: set[str] = set()

    def walk(name: str, prefix: str, last: bool, top: bool) -> None:
        branch = "" if top else ("`-- " if last else "|-- ")
        again = name in shown and bool(children.get(name))
        lines.append(f"{prefix}{branch}{label(name)}{' (see above)' if again else ''}")
        if again:
            return
        shown.add(name)
        below = children.get(name, ())
        inner = prefix if top else prefix + ("    " if last else "|   ")
        for index, child in enumerate(below):
            walk(child, inner, index == len(below) - 1, False)

    for root in roots:
        walk(root, "", True, True)
    return "\n".join(lines)


def mermaid(names: Sequence[str], edges: Sequence[tuple[str, str]]) -> str:
    lines = ["graph LR"]
    lines += [f"    {name}" for name in names if not any(name in edge for edge in edges)]
    lines += [f"    {upstream} --> {downstream}" for upstream, downstream in edges]
    return "\n".join(lines)


def dot(names: Sequence[str], edges: Sequence[tuple[str, str]]) -> str:
    lines = ["digraph flowstone {", "    rankdir=LR;"]
    lines += [f'    "{name}";' for name in names]
    lines += [f'    "{upstream}" -> "{downstream}";' for upstream, downstream in edges]
    lines.append("}")
    return "\n".join(lines)


# --------------------------------------------------------------- partitions


def describe_range(first: Any, last: Any, count: int) -> str:
    if count == 1:
        return str(first)
    return f"{first}..{last} ({count})"
