"""The one plain-text table formatter of the CLI (`ftk plugins list`, `ftk data stats`, the metrics
table of `ftk eval` / `ftk run`)."""
from __future__ import annotations

from typing import Iterable, Sequence


def format_columns(rows: Iterable[Sequence[str]], strip: bool = True) -> str:
    """``rows`` (the header first) as left-aligned columns two spaces apart, one line each. Every column
    but the last is padded to its widest cell; the last is written as it is, so a long last cell (a
    description, a list) does not widen the others. ``strip``: drop trailing spaces of each line."""
    rows = [list(r) for r in rows]
    if not rows:
        return ""
    ncols = max(len(r) for r in rows)
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(ncols - 1)]
    lines = ("  ".join([c.ljust(w) for c, w in zip(r, widths)] + r[len(widths):]) for r in rows)
    return "\n".join(line.rstrip() if strip else line for line in lines)
