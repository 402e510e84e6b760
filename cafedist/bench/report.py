"""Printing benchmark results: an aligned table per benchmark, or one JSON object per line."""

from __future__ import annotations

import json
from typing import Any, Iterable


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "/".join(_cell(v) for v in value)
    return "" if value is None else str(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Rows (dicts) as an aligned text table; columns are the union of keys in first-seen order."""
    if not rows:
        return "(no results)"
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.rjust(w) if _numeric(v) else v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(out)


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def render(rows: Iterable[dict[str, Any]], as_json: bool) -> str:
    """The text ``cafedist bench`` prints: JSON lines, or one table per benchmark name."""
    rows = list(rows)
    if as_json:
        return "\n".join(json.dumps(r) for r in rows)
    blocks, names = [], []
    for r in rows:
        if r.get("benchmark") not in names:
            names.append(r.get("benchmark"))
    for name in names:
        group = [{k: v for k, v in r.items() if k != "benchmark"} for r in rows if r.get("benchmark") == name]
        blocks.append(f"== bench {name}\n{format_table(group)}")
    return "\n\n".join(blocks)
