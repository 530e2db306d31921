"""Atomic per-round checkpoints of the full server state (safetensors + JSON) and resume.

Each round writes ``ckpt-<round>.safetensors`` (the method's tensors) and ``ckpt-<round>.json``
(version, per-node versions, the byte ledger, the round log) through temporary files and
``os.replace``, then points ``latest.json`` at them the same way; a crash at any moment leaves the
previous complete round loadable.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import load_file, save_file

from lordba_fl.wire.metering import ByteLedger, MessageBytes


def _atomic_write(path: Path, write) -> None:
    """``write(tmp)``, then the file's bytes and its new name flushed to disk: a power loss leaves the
    old file or the new one, never a torn one."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def clear_checkpoints(run_dir: Path) -> int:
    """Remove an earlier run's checkpoints from ``run_dir`` (a new run that does not resume must never
    leave them for a later resume to pick up); returns how many files went."""
    gone = 0
    for old in [*Path(run_dir).glob("ckpt-*"), Path(run_dir) / "latest.json"]:
        if old.is_file():
            old.unlink()
            gone += 1
    return gone


def save_checkpoint(run_dir: Path, run_round: int, method, ledger: ByteLedger, rows: list[dict], extra: dict | None = None) -> None:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tensors, meta = method.server_state()
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    _atomic_write(run_dir / f"ckpt-{run_round}.safetensors", lambda p: save_file(tensors, str(p)))
    doc = {
        "round": run_round, "method": method.name, "method_state": meta,
        "ledger": [asdict(r) for r in ledger.records], "rows": rows, "extra": extra or {},
    }
    _atomic_write(run_dir / f"ckpt-{run_round}.json", lambda p: p.write_text(json.dumps(doc)))
    _atomic_write(run_dir / "latest.json", lambda p: p.write_text(json.dumps({"round": run_round})))
    for old in run_dir.glob("ckpt-*"):
        r = old.name.split("-", 1)[1].split(".", 1)[0]
        if r.isdigit() and int(r) < run_round - 1:
            old.unlink(missing_ok=True)


def load_checkpoint(run_dir: Path, method, ledger: ByteLedger) -> tuple[int, list[dict], dict] | None:
    """Restore the last complete round into ``method`` and ``ledger``; returns (round, rows, extra) or None."""
    run_dir = Path(run_dir)
    latest = run_dir / "latest.json"
    if not latest.is_file():
        return None
    run_round = int(json.loads(latest.read_text())["round"])
    doc = json.loads((run_dir / f"ckpt-{run_round}.json").read_text())
    if doc["method"] != method.name:
        raise ValueError(
            f"{run_dir} holds a checkpoint of method {doc['method']!r}, not {method.name!r}; use another out-dir"
        )
    tensors = load_file(str(run_dir / f"ckpt-{run_round}.safetensors"))
    fresh, _ = method.server_state()  # this run's shapes: a checkpoint of other settings is refused
    for key, t in fresh.items():
        if key not in tensors or tuple(tensors[key].shape) != tuple(t.shape):
            got = tuple(tensors[key].shape) if key in tensors else "nothing"
            raise ValueError(f"{run_dir}'s checkpoint holds {got} for {key!r}; this run's {method.name} needs "
                             f"{tuple(t.shape)} (another rank, model or scale set): resume with the settings it was "
                             "made with, or start afresh in another out-dir or name")
    method.load_server_state(tensors, doc["method_state"])
    ledger.records[:] = [MessageBytes(**r) for r in doc["ledger"]]
    return run_round, doc["rows"], doc.get("extra", {})
