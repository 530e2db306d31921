"""Quality cost of client-level DP (``dp.mode=local``): the same small SmolLM2 federation as
``bench_faults`` (10 SuperNodes, 5 sampled per round, ``server.aggregator=vote``, which DP needs)
without DP and with the noise calibrated to each target ε over the run's rounds.

One JSON line per run: ``target_epsilon``, the accounted ``dp_epsilon`` after the last round (for the
client sampled most often), ``noise_multiplier``, ``final_eval_loss``, ``vs_no_dp`` and the uplink
bytes per client-round.

Usage: ``python -m simulations.bench_privacy [--epsilons 8,64] [--clip 0.01] [--rounds 4]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from simulations.bench_faults import SMALL_RUN
from simulations.common import emit, launch


def run_one(target: float, clip: float, flip_epsilon: float, model: str, rounds: int, out_dir: Path) -> dict:
    name = "no-dp" if target == 0 else f"dp-eps{target:g}-clip{clip:g}-flip{flip_epsilon:g}"
    # dp.mode=local needs one flip budget for every round (the default halves down to none): 2% in both arms
    over = {**SMALL_RUN, "model": model, "rounds": rounds, "server.aggregator": "vote", "flip.budget": 0.02,
            "out-dir": str(out_dir), "name": name}
    if target > 0:
        over.update({"dp.mode": "local", "dp.target-epsilon": target, "dp.clip": clip, "dp.flip-epsilon": flip_epsilon})
    rows, code, wall = launch(over, supernodes=10)
    trained = [x for x in rows if x["round"] > 0]
    last = trained[-1] if trained else {}
    return {
        "bench": "privacy", "model": model, "rounds": rounds, "rounds_completed": len(trained), "exit_code": code,
        "target_epsilon": target, "clip": clip, "flip_epsilon": flip_epsilon,
        "dp_epsilon": last.get("dp_epsilon"), "dp_delta": last.get("dp_delta"),
        "noise_multiplier": last.get("dp_noise_multiplier"),
        "initial_eval_loss": rows[0]["eval_loss"] if rows else None,
        "final_eval_loss": last.get("eval_loss"),
        "up_payload_mean": sum(x["up_payload_mean"] for x in trained) / len(trained) if trained else None,
        "wall_s": round(wall, 1),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--epsilons", default="8,64", help="target ε values (comma list)")
    p.add_argument("--clip", type=float, default=0.01)
    p.add_argument("--flip-epsilon", type=float, default=0.0)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--out-dir", type=Path, default=Path("results/privacy"))
    p.add_argument("--out", type=Path, default=Path("results/bench_privacy.jsonl"))
    args = p.parse_args(argv)
    base = None
    for target in [0.0] + [float(e) for e in args.epsilons.split(",")]:
        rec = run_one(target, args.clip, args.flip_epsilon, args.model, args.rounds, args.out_dir.resolve())
        if target == 0:
            base = rec["final_eval_loss"]
        elif base and rec["final_eval_loss"] is not None:
            rec["vs_no_dp"] = round(rec["final_eval_loss"] / base - 1, 4)
        emit(rec, args.out)


if __name__ == "__main__":
    main()
