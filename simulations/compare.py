"""Side-by-side comparison of every method under one harness: same data, seed, rank, rounds, clients.

Runs ``lordba`` (latent vote), ``lordba`` (refit), ``lora-fedavg``, ``ffa-lora`` and ``lora-q2`` one
after the other on Flower's simulation engine (each in a fresh process, through ``simulations.run``),
then prints one JSON line per method (and appends them to ``--out``): bytes per client-round in each
direction (payload and Flower wire), final eval loss and metric, and ratios to ``lora-fedavg``.

Usage: ``python -m simulations.compare [--quick] [--run-config "rounds=3 ..."] [--methods ...]``.
``--quick`` uses the tiny random model (minutes); the default uses the embedded SmolLM2-135M.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from simulations.common import emit

ROOT = Path(__file__).resolve().parents[1]
RUNS = {
    "lordba-vote": "method='lordba' server.aggregator='vote'",
    "lordba-refit": "method='lordba' server.aggregator='refit'",
    "lordba-vote-flips": "method='lordba' server.aggregator='vote' flip.m0=0.003",  # m0 < E * lr: signs can flip
    "lora-fedavg": "method='lora-fedavg'",
    "ffa-lora": "method='ffa-lora'",
    "lora-q2": "method='lora-q2'",
    "lora-q4": "method='lora-q4'",
}
DEFAULT_METHODS = ["lordba-vote", "lordba-refit", "lordba-vote-flips", "lora-fedavg", "ffa-lora", "lora-q2"]


def summarize(name: str, rows: list[dict]) -> dict:
    trained = [r for r in rows if r["round"] > 0]
    final = rows[-1]
    n_up = sum(r["clients_succeeded"] for r in trained) or 1
    n_down = sum(r["clients_sampled"] for r in trained) or 1
    metric = "accuracy_unseen" if "accuracy_unseen" in final else "perplexity"
    return {
        "method": name,
        "rank": None,
        "rounds": len(trained),
        "clients_per_round": trained[0]["clients_sampled"] if trained else 0,
        "uplink_bytes_per_client_round": sum(r["up_wire_sum"] for r in trained) / n_up,
        "downlink_bytes_per_client_round": sum(r["down_wire_sum"] for r in trained) / n_down,
        "uplink_payload_per_client_round": sum(r["up_payload_sum"] for r in trained) / n_up,
        "downlink_payload_per_client_round": sum(r["down_payload_sum"] for r in trained) / n_down,
        "fp16_lora_bytes": final.get("fp16_lora_bytes"),
        "initial_eval_loss": rows[0].get("eval_loss"),
        "final_eval_loss": final.get("eval_loss"),
        "final_metric_name": metric,
        "final_metric": final.get(metric),
        "client_flip_rate": [r.get("client_flip_rate") for r in trained],
        "global_flip_rate": [r.get("global_flip_rate") for r in trained],
    }


def _effective_config(overrides: str, quick: bool):
    from flwr.common.config import parse_config_args

    from lordba_fl.runconfig import parse_run_config
    from simulations.run import QUICK, project_run_config

    cfg = project_run_config()
    if quick:
        cfg.update(QUICK)
    cfg.update(parse_config_args([overrides]))
    return parse_run_config(cfg)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=sorted(RUNS))
    p.add_argument("--run-config", default="", help="overrides shared by every method")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out-dir", default="results/compare")
    p.add_argument("--out", type=Path, default=Path("results/compare.jsonl"))
    args = p.parse_args(argv)
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    records = []
    for name in args.methods:
        overrides = f"{RUNS[name]} out-dir='{args.out_dir}' name='{name}' {args.run_config}"
        cmd = [sys.executable, "-m", "simulations.run", "--run-config", overrides] + (["--quick"] if args.quick else [])
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout[-2000:] + proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"{name} failed (exit {proc.returncode})")
        rows = [json.loads(line) for line in (Path(args.out_dir) / name / "rounds.jsonl").read_text().splitlines()]
        rec = summarize(name, rows)
        rec["rank"] = _effective_config(overrides, args.quick).rank
        rec["wall_s"] = round(time.time() - t0, 1)
        rec["quick"] = args.quick
        rec["shared_overrides"] = args.run_config
        records.append(rec)
    base = next((r for r in records if r["method"] == "lora-fedavg"), None)
    for rec in records:
        if base:
            rec["uplink_ratio_vs_lora_fedavg"] = base["uplink_bytes_per_client_round"] / rec["uplink_bytes_per_client_round"]
            rec["downlink_ratio_vs_lora_fedavg"] = (
                base["downlink_bytes_per_client_round"] / rec["downlink_bytes_per_client_round"]
            )
            if base["final_eval_loss"] and rec["final_eval_loss"]:
                rec["eval_loss_vs_lora_fedavg"] = rec["final_eval_loss"] / base["final_eval_loss"]
        emit(rec, args.out)


if __name__ == "__main__":
    main()
