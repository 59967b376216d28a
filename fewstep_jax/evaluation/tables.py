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


def pivot_markdown(rows: Sequence[dict], value: str, columns: Sequence, index=("testbed", "method")) -> str:
    """A compact table: one line per ``index`` tuple, one column per NFE, cells ``row[value]``."""
    lines = ["| " + " | ".join(index) + " | " + " | ".join(f"NFE {c}" for c in columns) + " |"]
    lines.append("|" + "---|" * (len(index) + len(columns)))
    seen: dict[tuple, dict] = {}
    for r in rows:
        seen.setdefault(tuple(r[i] for i in index), {})[r["nfe"]] = r.get(value)
    for key, by_nfe in seen.items():
        cells = [fmt(by_nfe[c]) if c in by_nfe and by_nfe[c] is not None else "" for c in columns]
        lines.append("| " + " | ".join(map(str, key)) + " | " + " | ".join(cells) + " |")
    return "\n".join(lines)
