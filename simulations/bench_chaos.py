"""Chaos: the server against hostile replies, killed workers and a killed server.

Two parts, one JSON line per result (printed and appended to ``--out``):

- ``stress`` (in process, fast): the real strategy and method take rounds in which two honest
  clients (the real ClientApp on the tiny model) answer beside ``--per-round`` hostile replies of
  every kind in :data:`lordba_fl.federation.faults.HOSTILE_KINDS` (garbage metrics and weights,
  mutated, missing, replayed and duplicated frames), until ``--hostile`` of them were sent. Record:
  replies sent, server exceptions (must be 0), hostile replies accepted (must be 0: only weights
  that are merely large are accepted, capped), honest replies accepted, refusals by reason, whether
  the final state is finite.
- ``federation`` (Flower's simulation engine, real model by default): the same run clean; with
  ``faults.hostile-fraction`` of the replies hostile every round; with a Ray worker killed mid-round
  every ``--kill-every`` seconds; and with the server process killed mid-run and started again with
  ``resume=true``. Record: rounds completed, refusals by reason, final eval loss and its difference
  to the clean run.

Usage::

    python -m simulations.bench_chaos --part stress --hostile 10400        # ~minutes on 2 cores
    python -m simulations.bench_chaos --part federation --model smollm2-135m
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from simulations.common import ROOT, emit, launch

METHODS = ("lordba", "lora-fedavg", "lora-flora")
# the federation part: small enough for a few minutes a run on 2 cores with SmolLM2-135M
FEDERATION = {
    "clients-per-round": 5, "data.shakespeare.max-clients": 10, "train.local-steps": 2, "train.batch-size": 2,
    "train.seq-len": 64, "eval.examples": 32, "eval.generate": 0, "eval.client-side": False, "rounds": 4,
}
SUPERNODES = 10


def stress(method: str, hostile: int, per_round: int = 48, honest: int = 2, seed: int = 0) -> dict:
    """``hostile`` hostile replies against the real strategy (see the module docstring)."""
    import torch
    from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from clients.app import make_client_app
    from lordba_fl.data.tasks import load_task
    from lordba_fl.federation.apps import _adapted_model
    from lordba_fl.federation.faults import HOSTILE_KINDS, hostile_reply
    from lordba_fl.federation.strategy import AdapterStrategy, frame_record, read_frame, reason_class
    from lordba_fl.runconfig import DEFAULTS, parse_run_config

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    run = {**DEFAULTS, "model": "tiny-llama", "method": method, "task": "shakespeare",
           "data.shakespeare.max-clients": honest, "rank": 4, "alpha": 8.0, "train.local-steps": 1,
           "train.batch-size": 2, "train.seq-len": 32, "seed": seed}
    cfg = parse_run_config(run)
    model, tok, m = _adapted_model(cfg)
    m.init_from_data(model, tok, load_task(cfg.task, **cfg.task_kwargs()))
    m.init_server(model)
    strategy = AdapterStrategy(m, honest + per_round, seed, client_eval=False, weight_cap=cfg.weight_cap,
                               max_failed_rounds=0)
    app = make_client_app()
    contexts = {100 + i: Context(run_id=1, node_id=100 + i, node_config={"partition-id": i, "num-partitions": honest},
                                 state=RecordDict(), run_config=dict(run)) for i in range(honest)}
    rng = random.Random(f"chaos/{seed}")
    sent, crashes, honest_ok, hostile_ok, rounds = 0, 0, 0, 0, 0
    refused: Counter = Counter()
    earlier: dict[int, bytes] = {}
    t0 = time.time()
    while sent < hostile:
        rounds += 1
        replies, frames = [], {}
        for node, ctx in contexts.items():
            req = Message(RecordDict({"adapter": frame_record(m.downlink(node, rounds)),
                                      "config": ConfigRecord({"server-round": rounds, "version": m.version})}),
                          dst_node_id=node, message_type="train")
            reply = app(req, ctx)
            replies.append(reply)
            frames[node] = read_frame(reply.content)
        honest_metrics = dict(replies[0].content["metrics"])
        hostile_ids = set()
        for j in range(min(per_round, hostile - sent)):
            kind = HOSTILE_KINDS[(sent + j) % len(HOSTILE_KINDS)]
            node = 1000 + j
            base, other = rng.sample(sorted(frames), 2) if len(frames) > 1 else (next(iter(frames)),) * 2
            own = frames[base]
            if not kind.startswith("frame-"):  # unique bytes, so the metric / weight check is what refuses it
                own = own + (sent + j).to_bytes(4, "little")
            frame, metrics = hostile_reply(kind, own, honest_metrics, rng, earlier=earlier.get(base), other=frames[other])
            content = {"metrics": MetricRecord(metrics)}
            if frame is not None:
                content["adapter"] = frame_record(frame)
            req = Message(RecordDict(), dst_node_id=node, message_type="train")
            replies.append(Message(RecordDict(content), reply_to=req))
            hostile_ids.add(node)
        sent += len(hostile_ids)
        earlier.update(frames)
        try:
            strategy.aggregate_train(rounds, replies)
        except Exception as e:  # noqa: BLE001 - what the benchmark counts
            crashes += 1
            print(f"[chaos] round {rounds}: server raised {type(e).__name__}: {e}", file=sys.stderr)
            continue
        failures = strategy.round_failures.get(rounds, [])
        failed_nodes = {n for n, _ in failures}
        refused.update(reason_class(why) for _, why in failures)
        # the weight-huge kind within bounds is accepted at a capped weight; every other hostile reply is refused
        hostile_ok += len(hostile_ids - failed_nodes)
        honest_ok += len(set(contexts) - failed_nodes)
    values, _ = m.server_state()
    finite = all(bool(torch.isfinite(t.float()).all()) for t in values.values() if t.is_floating_point())
    return {"bench": "chaos", "part": "stress", "method": method, "hostile_sent": sent, "rounds": rounds,
            "server_exceptions": crashes, "hostile_accepted": hostile_ok, "honest_accepted": honest_ok,
            "honest_sent": rounds * honest, "state_finite": finite, "version": m.version,
            "refused": dict(refused.most_common()), "wall_s": round(time.time() - t0, 1)}


MARK = "LORDBA_CHAOS_RUN"  # set in the environment of the run whose workers may be killed (only its own)


def _kill_a_worker_every(seconds: float, stop: threading.Event, token: str) -> None:
    import psutil

    while not stop.wait(seconds):
        for p in psutil.process_iter(["name", "cmdline"]):
            try:
                is_worker = "ClientAppActor" in " ".join(p.info.get("cmdline") or []) + (p.info.get("name") or "")
                if is_worker and p.environ().get(MARK) == token:
                    p.kill()
                    print(f"[chaos] killed Ray worker {p.pid}", file=sys.stderr)
                    break
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue


def _server_killed_and_resumed(over: dict, kill_after_round: int) -> tuple[list[dict], int, float]:
    """The run started, its server process tree killed once ``kill_after_round`` is checkpointed, then
    the same run again with ``resume=true``."""
    import json

    import psutil

    from simulations.common import toml_value

    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    cmd = [sys.executable, "-m", "simulations.run", "--supernodes", str(SUPERNODES), "--run-config",
           " ".join(f"{k}={toml_value(v)}" for k, v in over.items())]
    latest = Path(over["out-dir"]) / over["name"] / "latest.json"
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    while proc.poll() is None:
        if latest.is_file() and json.loads(latest.read_text())["round"] >= kill_after_round:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(1.0)
    proc.wait()
    rows, code, wall = launch({**over, "resume": True}, supernodes=SUPERNODES)
    return rows, code, time.time() - t0


def federation(model: str, out_dir: Path, hostile_fraction: float, kill_every: float, seed: int,
               only: list[str] | None = None, clean_loss: float | None = None):
    """The federation part's records, one per scenario (a generator: each is emitted when its run ends)."""
    base = {**FEDERATION, "model": model, "seed": seed, "out-dir": str(out_dir)}
    stopped_at = None
    scenarios = {
        "clean": {},
        f"hostile-{hostile_fraction:g}": {"faults.hostile-fraction": hostile_fraction},
        # Flower's simulation engine does not restart a killed worker: the run's guard stops it (the
        # default faults.max-failed-rounds), then the same run resumes with fresh workers, unharmed
        "workers-killed": {"server.round-timeout": 600.0},
        "server-killed-resumed": {},
    }
    clean = clean_loss
    for name, extra in scenarios.items():
        if only and name not in only and not (name.startswith("hostile") and "hostile" in only):
            continue
        over = {**base, **extra, "name": f"chaos-{name}-s{seed}"}
        if name == "workers-killed":
            stop, token = threading.Event(), f"{os.getpid()}-{time.time()}"
            os.environ[MARK] = token  # inherited by this run's processes, Ray workers included
            killer = threading.Thread(target=_kill_a_worker_every, args=(kill_every, stop, token), daemon=True)
            killer.start()
            try:
                rows, code, wall = launch(over, supernodes=SUPERNODES)
            finally:
                stop.set()
                os.environ.pop(MARK, None)
            stopped_at = max((r["round"] for r in rows), default=0)
            if code != 0:  # stopped by the guard: resume with fresh workers
                rows, code, more = launch({**over, "resume": True}, supernodes=SUPERNODES)
                wall += more
        elif name == "server-killed-resumed":
            rows, code, wall = _server_killed_and_resumed(over, kill_after_round=2)
        else:
            rows, code, wall = launch(over, supernodes=SUPERNODES)
        by_round = {r["round"]: r for r in rows}
        trained = [by_round[k] for k in sorted(by_round) if k > 0]
        refused: Counter = Counter()
        for r in trained:
            refused.update(r.get("refused", {}))
        final = trained[-1]["eval_loss"] if trained else None
        rec = {"bench": "chaos", "part": "federation", "scenario": name, "model": model, "seed": seed,
               "first_attempt_last_round": stopped_at if name == "workers-killed" else None,
               "rounds": base["rounds"], "rounds_completed": len(trained), "exit_code": code,
               "final_eval_loss": final, "clients_failed": sum(r.get("clients_failed", 0) for r in trained),
               "accepted": sum(r.get("accepted", 0) for r in trained), "refused": dict(refused.most_common()),
               "wall_s": round(wall, 1)}
        if name == "clean":
            clean = final
        rec["vs_clean"] = (final / clean - 1) if (final is not None and clean) else None
        yield rec


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("stress", "federation", "both"), default="both")
    p.add_argument("--hostile", type=int, default=10_400, help="stress: hostile replies per method")
    p.add_argument("--per-round", type=int, default=48)
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--model", default="smollm2-135m", help="federation: smollm2-135m | tiny-llama")
    p.add_argument("--hostile-fraction", type=float, default=0.2)
    p.add_argument("--kill-every", type=float, default=45.0, help="federation: seconds between worker kills")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scenarios", nargs="+", help="federation: only these (clean, hostile, workers-killed, "
                   "server-killed-resumed)")
    p.add_argument("--clean-loss", type=float, help="federation: the clean run's final loss, when it is not rerun")
    p.add_argument("--out", type=Path, default=Path("results/bench_chaos.jsonl"))
    args = p.parse_args(argv)
    if args.part in ("stress", "both"):
        for method in args.methods:
            rec = stress(method, args.hostile, args.per_round, seed=args.seed)
            emit(rec, args.out)
    if args.part in ("federation", "both"):
        for rec in federation(args.model, args.out.parent / "chaos", args.hostile_fraction, args.kill_every, args.seed,
                              args.scenarios, args.clean_loss):
            emit(rec, args.out)


if __name__ == "__main__":
    main()
