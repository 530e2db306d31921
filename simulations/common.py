"""What every benchmark script shares: one JSON line per record, printed and appended to a file."""

from __future__ import annotations

import json
from pathlib import Path


def emit(record: dict, out: Path | None) -> None:
    """Print ``record`` as one JSON line and append it to ``out`` (created with its folder)."""
    line = json.dumps(record)
    print(line, flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write(line + "\n")
