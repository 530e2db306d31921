"""Robustness under faults and attacks: the same run clean, with 30% client failures per round, and
with 20% byzantine partitions (each attack), for ``lordba`` with and without the robust options and
for ``lora-fedavg`` (plain FedAvg: the baseline users know).

Each run is the launcher on Flower's simulation engine (10 SuperNodes, 5 sampled per round, server-side
evaluation only), same data and seed. One JSON line per run with ``method``, ``robust``, ``scenario``,
``rounds_completed``, ``rounds``, ``final_eval_loss`` and ``vs_clean``, its relative difference to
the same method's clean run.

Usage: ``python -m simulations.bench_faults [--model smollm2-135m] [--rounds 4] [--only lora-fedavg]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from simulations.common import emit, launch

SCENARIOS = {
    "clean": {},
    "fail-30%": {"faults.fail-prob": 0.3},
    "byzantine-20%-invert-flips": {"faults.byzantine-fraction": 0.2, "faults.attack": "invert-flips"},
    "byzantine-20%-flip-all": {"faults.byzantine-fraction": 0.2, "faults.attack": "flip-all"},
    "byzantine-20%-explode-scales": {"faults.byzantine-fraction": 0.2, "faults.attack": "explode-scales"},
    "byzantine-20%-replay": {"faults.byzantine-fraction": 0.2, "faults.attack": "replay"},
}
ROBUST = {"server.enforce-budget": True, "server.scale-rule": "median", "server.norm-bound": 2.0, "server.weight-cap": 2.0}
PLAIN = {"server.enforce-budget": False}
# the lordba defences compared: every one off, all on, and the two cheapest alone
DEFENCES = {"plain": PLAIN, "robust": ROBUST, "budget+norm-bound": {"server.enforce-budget": True, "server.norm-bound": 2.0}}
# 10 SuperNodes, 5 sampled per round, 2 local steps: a few minutes per run with SmolLM2 on 2 cores
SMALL_RUN = {
    "clients-per-round": 5, "data.shakespeare.max-clients": 10, "train.local-steps": 2, "train.batch-size": 2,
    "train.seq-len": 64, "eval.examples": 32, "eval.generate": 0, "eval.client-side": False,
}


def run_one(method: str, defences: str, scenario: str, model: str, rounds: int, out_dir: Path) -> dict:
    name = f"{method}-{defences}-{scenario}"
    over = {**SMALL_RUN, "method": method, "model": model, "rounds": rounds, "out-dir": str(out_dir), "name": name,
            **SCENARIOS[scenario]}
    if method == "lordba":
        over.update(DEFENCES[defences])
    rows, code, wall = launch(over, supernodes=10)
    trained = [x for x in rows if x["round"] > 0]
    return {
        "bench": "faults", "method": method, "robust": defences == "robust", "defences": defences,
        "scenario": scenario, "model": model,
        "rounds": rounds, "rounds_completed": len(trained), "exit_code": code,
        "final_eval_loss": trained[-1]["eval_loss"] if trained else None,
        "clients_failed": sum(x.get("clients_failed", 0) for x in trained),
        "rejected": sum(x.get("rejected", 0) for x in trained),
        "accepted": sum(x.get("accepted", 0) for x in trained),
        "aggregate_refused": sum(x.get("aggregate_refused", 0) for x in trained),
        "wall_s": round(wall, 1),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--only", default="", help="run only the plans whose name contains this (e.g. lora-fedavg)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--out-dir", type=Path, default=Path("results/faults"))
    p.add_argument("--out", type=Path, default=Path("results/bench_faults.jsonl"))
    args = p.parse_args(argv)
    plan = [("lordba", d, s) for d in ("plain", "robust") for s in SCENARIOS]
    plan += [("lora-fedavg", "plain", s) for s in SCENARIOS]
    plan += [("lordba", "budget+norm-bound", s) for s in ("clean", "byzantine-20%-explode-scales")]
    plan = [x for x in plan if args.only in "-".join(x)]
    clean: dict[tuple, float] = {}
    if args.out.is_file():  # a clean run measured earlier into the same file (a resumed or partial sweep)
        for line in args.out.read_text().splitlines():
            r = json.loads(line)
            if r.get("scenario") == "clean" and r.get("model") == args.model and r.get("rounds") == args.rounds:
                clean[(r["method"], r.get("defences", "robust" if r["robust"] else "plain"))] = r["final_eval_loss"]
    for method, defences, scenario in plan:
        rec = run_one(method, defences, scenario, args.model, args.rounds, args.out_dir.resolve())
        if scenario == "clean":
            clean[(method, defences)] = rec["final_eval_loss"]
        base = clean.get((method, defences))
        if base and rec["final_eval_loss"] is not None:
            rec["vs_clean"] = round(rec["final_eval_loss"] / base - 1, 4)
        emit(rec, args.out)


if __name__ == "__main__":
    main()
