"""Markdown tables for the README and docs, regenerated from the benchmarks' JSON lines (never typed in).

Usage::

    python -m simulations.tables                                   # both, from the default files
    python -m simulations.tables --centralized results/centralized.jsonl --frontier results/frontier/frontier.jsonl

Centralized: one row per (task, method) from the last ``curve`` record of each (the chosen lr):
eval loss at every evaluated step, the lr and the fraction of signs flipped. Frontier: one row per
run from the last ``run`` record of each (task, run): final / best eval loss, bytes per client-round
each way, their ratios to ``lora-fedavg`` r = 16 (printed as "N x smaller"), cumulative bytes per
client, global flip rate per round (LoRDBA).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _last(path: Path, kind: str, key) -> list[dict]:
    """The last record of ``kind`` per ``key(record)``, in first-seen order."""
    if not path.is_file():
        return []
    out: dict = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == kind:
            out[key(rec)] = rec
    return list(out.values())


def _f(v, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def centralized_table(path: Path) -> str:
    recs = _last(path, "curve", lambda r: (r["task"], r["method"], r["seed"]))
    if not recs:
        return f"(no curve records in {path})"
    steps = recs[0]["steps"]
    lines = [f"| task | method | lr | seed | {' | '.join(f'step {s}' for s in steps)} | signs flipped |",
             "|---|---|---|---|" + "---|" * len(steps) + "---|"]
    for r in recs:
        flipped = r.get("signs_flipped")
        losses = " | ".join(_f(v) for v in r["eval_loss"])
        lines.append(f"| {r['task']} | {r['method']} | {r['lr']:g} | {r['seed']} | {losses} | "
                     f"{'–' if flipped is None else f'{100 * flipped:.1f}%'} |")
    return "\n".join(lines)


def _times(ratio) -> str:
    return "–" if not ratio else f"{1 / ratio:.1f}x"


def frontier_table(path: Path) -> str:
    recs = _last(path, "run", lambda r: (r["task"], r["run"]))
    if not recs:
        return f"(no run records in {path})"
    lines = ["| task | run | lr | final eval loss | vs lora-fedavg r16 | best | up B / client-round | smaller | "
             "down B / client-round | smaller | cumulative B / client | global flips per round |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(recs, key=lambda r: (r["task"], r.get("final_eval_loss") or 1e9)):
        loss_ratio = r.get("final_eval_loss_ratio_to_ref")
        flips = r.get("global_flip_rate")
        flips = "–" if not flips else " ".join(f"{100 * (f or 0):.2f}%" for f in flips)
        lines.append(
            f"| {r['task']} | {r['run']} | {r.get('lr') or '–'} | {_f(r.get('final_eval_loss'))} | "
            f"{'–' if loss_ratio is None else f'{100 * (loss_ratio - 1):+.2f}%'} | {_f(r.get('best_eval_loss'))} | "
            f"{r.get('up_bytes_per_client_round', 0):,.0f} | {_times(r.get('up_bytes_per_client_round_ratio_to_ref'))} | "
            f"{r.get('down_bytes_per_client_round', 0):,.0f} | "
            f"{_times(r.get('down_bytes_per_client_round_ratio_to_ref'))} | "
            f"{r.get('total_bytes_per_client', 0):,.0f} | {flips} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--centralized", type=Path, default=Path("results/centralized.jsonl"))
    p.add_argument("--frontier", type=Path, default=Path("results/frontier/frontier.jsonl"))
    args = p.parse_args(argv)
    print("### Centralized\n\n" + centralized_table(args.centralized) + "\n")
    print("### Frontier\n\n" + frontier_table(args.frontier))


if __name__ == "__main__":
    main()
