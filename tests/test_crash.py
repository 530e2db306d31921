"""The server process is killed (SIGKILL) mid-run on Flower's simulation engine and started again with
``resume=true``: it continues from the last complete round, loses and repeats nothing, and ends in
the same state as an uninterrupted run. Every process the test starts is killed by PID."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.real_model
ENV = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")


def _cmd(out: Path, name: str, resume: bool) -> list[str]:
    rc = (f"rounds=3 clients-per-round=4 data.shakespeare.max-clients=4 out-dir='{out}' name='{name}' "
          f"resume={'true' if resume else 'false'}")
    return [sys.executable, "-m", "simulations.run", "--quick", "--supernodes", "4", "--run-config", rc]


def _kill_tree(proc: subprocess.Popen) -> None:
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for p in [*tree, proc]:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)


def _latest(run_dir: Path) -> int:
    try:
        return int(json.loads((run_dir / "latest.json").read_text())["round"])
    except (FileNotFoundError, json.JSONDecodeError):
        return -1


def _rows(run_dir: Path) -> list[dict]:
    """Round rows without what depends on the run's name, timing or the simulated nodes' ids: a
    restarted simulation has new SuperNodes, which get full states (and ids of another length)."""
    rows = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    drop = ("wall_s", "workers", "method")
    return [{k: v for k, v in r.items() if k not in drop and "down_" not in k and "wire" not in k} for r in rows]


def test_server_killed_mid_run_resumes_to_the_same_state(tmp_path):
    full = subprocess.run(_cmd(tmp_path, "full", False), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert full.returncode == 0, full.stderr[-3000:]

    run_dir = tmp_path / "crash"
    log = (tmp_path / "crash.log").open("w")
    proc = subprocess.Popen(_cmd(tmp_path, "crash", False), cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        t0 = time.time()
        while _latest(run_dir) < 1:  # round 1 is complete and checkpointed
            assert proc.poll() is None, (tmp_path / "crash.log").read_text()[-3000:]
            assert time.time() - t0 < 600, "round 1 never finished"
            time.sleep(0.2)
    finally:
        _kill_tree(proc)  # SIGKILL: no cleanup, no final write
    done = _latest(run_dir)
    assert 1 <= done < 3  # killed mid-run
    raw = lambda: [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]  # noqa: E731
    before = [r for r in raw() if r["round"] <= done]

    again = subprocess.run(_cmd(tmp_path, "crash", True), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    # resumed, not redone: the finished rounds' rows (wall times included) come back from the checkpoint
    assert [r for r in raw() if r["round"] <= done] == before

    assert [r["round"] for r in _rows(run_dir)] == [0, 1, 2, 3]  # no round lost or done twice
    assert _rows(run_dir) == _rows(tmp_path / "full")  # losses, flips, uplink payloads: all the same
    full_rows = [json.loads(x) for x in (tmp_path / "full" / "rounds.jsonl").read_text().splitlines()]
    crash_rows = raw()
    # the new SuperNodes hold nothing: they were sent full states where the uninterrupted run sent deltas
    assert crash_rows[done + 1]["down_payload_sum"] > full_rows[done + 1]["down_payload_sum"]
    a, b = load_file(str(tmp_path / "full" / "ckpt-3.safetensors")), load_file(str(run_dir / "ckpt-3.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        if k.startswith("residual."):
            # the refit's error-feedback residual is a float64 BLAS difference rounded to fp32: two processes
            # may differ in its last bits (the broadcast signs and scales above do not)
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)
        else:
            assert bool((a[k] == b[k]).all()), k
