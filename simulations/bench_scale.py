"""Many virtual clients on one machine: memory and throughput vs the number of clients.

For each ``--clients`` N, runs the main job's launcher (Flower's simulation engine) with N virtual
SuperNodes, ``--per-round`` of them sampled each round, and samples the RSS of the whole process tree
(driver + Ray workers + Ray's own daemons) every 0.2 s. Prints one JSON line per run (and appends it
to ``--out``) with ``model``, ``num_clients``, ``clients_per_round``, ``rounds``,
``peak_rss_total_MB``, ``peak_rss_per_process_MB`` (by command), ``client_state_bytes`` (largest
``context.state`` a client reported), ``client_rounds_per_hour``, ``base_loads`` (per worker) and
the wall time.

Usage: ``python -m simulations.bench_scale [--clients 10 100 1000] [--model tiny-llama]
[--client-state latent+optimizer --state-dtype q8]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from lordba_fl.methods.lordba.clientstate import STATE_DTYPES, STATE_KINDS
from simulations.common import emit

ROOT = Path(__file__).resolve().parents[1]


def _label(p: psutil.Process) -> str:
    """What a process is: Ray sets worker titles to ``ray::<Actor>``; its daemons keep their names."""
    try:
        cmd = p.cmdline()
        name = p.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "gone"
    head = cmd[0] if cmd else name
    if head.startswith("ray::"):
        return head.split(".")[0].split(" ")[0]
    joined = " ".join(cmd)
    if "default_worker.py" in joined:
        return "ray worker (ClientAppActor)"
    if "simulations.run" in joined:
        return "driver (ServerApp + simulation engine)"
    for key in ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "runtime_env"):
        if key in joined:
            return key
    return name


class TreeMonitor(threading.Thread):
    """Peak of the summed RSS of a process and all its descendants, and each one's peak."""

    def __init__(self, pid: int, period: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.period = psutil.Process(pid), period
        self.peak_total = 0
        self.peak_by_pid: dict[int, tuple[str, int]] = {}
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                procs = [self.root] + self.root.children(recursive=True)
            except psutil.NoSuchProcess:
                return
            total = 0
            for p in procs:
                try:
                    rss = p.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                total += rss
                label, peak = self.peak_by_pid.get(p.pid, (_label(p), 0))
                self.peak_by_pid[p.pid] = (label, max(peak, rss))
            self.peak_total = max(self.peak_total, total)
            time.sleep(self.period)


def run_one(n: int, per_round: int, rounds: int, model: str, out_dir: Path, state: str, dtype: str) -> dict:
    name = f"scale-{model}-{n}-{state.replace('+', '-')}-{dtype}"
    overrides = (
        f"model='{model}' clients-per-round={per_round} rounds={rounds} data.shakespeare.min-lines=1 "
        f"data.shakespeare.max-clients={n} out-dir='{out_dir}' name='{name}' eval.generate=0 eval.examples=8 "
        f"train.local-steps=2 train.batch-size=2 train.seq-len=64 client.state='{state}' client.state-dtype='{dtype}'"
    )
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    cmd = [sys.executable, "-m", "simulations.run", "--supernodes", str(n), "--run-config", overrides]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    mon = TreeMonitor(proc.pid)
    mon.start()
    log, _ = proc.communicate()
    mon.stop.set()
    wall = time.time() - t0
    if proc.returncode != 0:
        print(log[-4000:], file=sys.stderr)
        raise SystemExit(f"{name} failed (exit {proc.returncode})")
    rows = [json.loads(line) for line in (out_dir / name / "rounds.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r["round"] > 0]
    by_label: dict[str, float] = {}
    for label, peak in mon.peak_by_pid.values():
        by_label[label] = max(by_label.get(label, 0.0), peak / 2**20)
    workers = trained[-1].get("workers", {})
    client_rounds = sum(r["clients_succeeded"] for r in trained)
    return {
        "bench": "scale",
        "model": model,
        "num_clients": n,
        "clients_per_round": per_round,
        "rounds": len(trained),
        "client_state": state,
        "client_state_dtype": dtype,
        "peak_rss_total_MB": round(mon.peak_total / 2**20, 1),
        "peak_rss_per_process_MB": {k: round(v, 1) for k, v in sorted(by_label.items())},
        "processes": len(mon.peak_by_pid),
        "client_state_bytes": max(r.get("client_state_bytes_max", 0) for r in trained),
        # context.state lives in the driver; at most this many clients hold one after the run
        "clients_with_state_max": min(n, per_round * len(trained)),
        "client_rounds_per_hour": round(client_rounds / (wall / 3600), 1),
        "base_loads": {pid: w["base_loads"] for pid, w in workers.items()},
        "clients_served": {pid: w["clients_served"] for pid, w in workers.items()},
        "up_wire_mean": trained[-1]["up_wire_mean"],
        "wall_s": round(wall, 1),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--per-round", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--client-state", default="none", choices=STATE_KINDS, help="what a client keeps between rounds")
    p.add_argument("--state-dtype", default="q8", choices=STATE_DTYPES, help="how it keeps latents / moments")
    p.add_argument("--out-dir", type=Path, default=Path("results/scale"))
    p.add_argument("--out", type=Path, default=Path("results/bench_scale.jsonl"))
    args = p.parse_args(argv)
    for n in args.clients:
        emit(run_one(n, min(args.per_round, n), args.rounds, args.model, args.out_dir.resolve(), args.client_state, args.state_dtype), args.out)


if __name__ == "__main__":
    main()
