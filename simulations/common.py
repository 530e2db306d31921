"""What every benchmark script shares: one JSON line per record, printed and appended to a file, and
a launcher run on Flower's simulation engine as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def emit(record: dict, out: Path | None) -> None:
    """Print ``record`` as one JSON line and append it to ``out`` (created with its folder)."""
    line = json.dumps(record)
    print(line, flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write(line + "\n")


def toml_value(v) -> str:
    """``v`` as a value in Flower's ``--run-config`` override syntax (TOML; strings single-quoted)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        if "'" in v:
            raise ValueError(f"run-config value {v!r} contains a single quote, which --run-config cannot pass")
        return f"'{v}'"
    return repr(v)


def launch(run_config: dict, supernodes: int) -> tuple[list[dict], int, float]:
    """``python -m simulations.run`` with these run-config overrides (``out-dir`` and ``name`` among
    them); returns (the run's rows, its exit code, wall seconds)."""
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    cmd = [sys.executable, "-m", "simulations.run", "--supernodes", str(supernodes),
           "--run-config", " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())]
    path = Path(run_config["out-dir"]) / run_config["name"] / "rounds.jsonl"
    before = path.stat().st_mtime_ns if path.is_file() else None  # an earlier run's rows are not this one's
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    written = path.is_file() and path.stat().st_mtime_ns != before
    rows = [json.loads(x) for x in path.read_text().splitlines()] if written else []
    if r.returncode != 0:
        print(r.stderr[-3000:], file=sys.stderr)
    return rows, r.returncode, wall
