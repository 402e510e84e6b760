"""Short human-readable counts for tables and plans (MACs, bytes, parameters), durations and
lists of client ids for messages."""

from __future__ import annotations


def short_count(x: float, fmt: str = ".2f") -> str:
    """``12952 -> '12.95K'``, ``2.18e6 -> '2.18M'`` (``fmt`` formats the scaled number)."""
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        text = f"{x / scale:{fmt}}"
        if abs(float(text)) >= 1:  # judged after rounding: 999,999 is "1M", not "1e+03K"
            return text + unit
    return f"{x:.0f}"


def hms(seconds: float) -> str:
    """``3725.4 -> '1:02:05'`` (hours unbounded)."""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def id_list(ids: list[int]) -> str:
    """``1, 2, 3`` (the first ten, then ``and N more``), for messages."""
    return ", ".join(map(str, ids[:10])) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")


def clients_phrase(ids: list[int]) -> str:
    """``client 3`` or ``clients 1, 2``, for messages."""
    return f"client{'s' if len(ids) > 1 else ''} {id_list(ids)}"
