"""Benchmark tables: one row format, written as JSON and printed / saved as markdown."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence


def fmt(v) -> str:
    """A compact cell: floats with 4 significant digits, NaN as 'nan', others as str."""
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}"
    return str(v)


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """Rows (dicts) as a markdown table over ``columns`` (missing cells are blank)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r[c]) if c in r else "" for c in columns) + " |")
    return "\n".join(lines)


def write_json(path: str, payload: dict) -> None:
    """Writes ``payload`` atomically (temp file + rename), creating the folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, default=float)
    os.replace(tmp, path)
