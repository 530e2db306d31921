"""Heterogeneous devices benchmark: a mixed-rank LoRDBA federation against uniform top and uniform
lowest rank, with the frontier's settings (same data, seed, sampling; ``simulations/frontier.py``).

    python -m simulations.hetero                       # shakespeare, tiers 4:0.3,8:0.3,16:0.4, seed 0
    python -m simulations.hetero --seeds 0 1 --tiers "4:0.5,16:0.5"
    python -m simulations.hetero --quick               # tiny model, 2 rounds: a smoke run

One JSON line per run (``kind: "run"``: final / best eval loss, bytes per client-round each way
overall and per tier, the tier mix of the last round) and ``hetero.png`` (eval loss per round).
LoRA heterogeneity baselines (``--methods``): ``lora-hetlora`` (zero-padding), ``lora-flexlora``
(SVD redistribution) and ``lora-flora`` (stacking), each mixed, against ``lora-fedavg`` at the uniform
top and lowest rank.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lordba_fl.hetero import parse_tiers
from simulations.common import emit, launch
from simulations.frontier import (
    SUPERNODES,
    load_records,
    map_lrs,
    run_config_for,
    summarize,
)

DEFAULT_TIERS = "4:0.3,8:0.3,16:0.4"


METHODS = ("lordba", "lora-hetlora", "lora-flexlora", "lora-flora")


def plan(tiers: str, seeds, task: str, methods=("lordba",), only=None) -> list[tuple[dict, dict]]:
    """(frontier run spec, extra run config) for uniform top, uniform lowest and the mixed federation of
    each method. LoRDBA's variants are ``uniform-r<R>``, ``uniform-r<r>``, ``mixed``; a LoRA
    heterogeneity baseline's uniform runs are ``lora-fedavg`` at those ranks (what zero-padding reduces
    to with one rank; shared by the baselines, planned once) and its mixed run ``<method>-mixed``.
    ``only``: variant names to keep (unknown ones raise ``ValueError`` listing the planned ones)."""
    parsed = parse_tiers(tiers, top_rank=1 << 16)  # the global rank is the top tier's
    top, low = parsed[-1][0], parsed[0][0]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; the benchmark knows {list(METHODS)}")
    runs = []
    for seed in seeds:
        for method in methods:
            base = {"task": task, "family": "lordba" if method == "lordba" else "lora", "seed": seed}
            if method == "lordba":
                base["overrides"] = {"method": "lordba"}
                runs.append(({**base, "rank": top, "variant": f"uniform-r{top}"}, {}))
                runs.append(({**base, "rank": low, "variant": f"uniform-r{low}"}, {}))
                runs.append(({**base, "rank": top, "variant": "mixed"}, {"hetero.tiers": tiers}))
                continue
            if not any(s["variant"].startswith("lora-fedavg-r") and s["seed"] == seed for s, _ in runs):
                for r in (top, low):
                    runs.append(({**base, "rank": r, "variant": f"lora-fedavg-r{r}", "overrides": {"method": "lora-fedavg"}}, {}))
            runs.append(({**base, "rank": top, "variant": f"{method}-mixed", "overrides": {"method": method}},
                         {"hetero.tiers": tiers}))
    if only:
        names = sorted({s["variant"] for s, _ in runs})
        missing = sorted(set(only) - set(names))
        if missing:
            raise ValueError(f"--only {missing}: not planned; planned variants: {names}")
        runs = [(s, e) for s, e in runs if s["variant"] in only]
    return runs


def tier_fields(rows: list[dict]) -> dict:
    """Per tier, bytes per client-round each way over the training rounds (means of the round means,
    weighted by the tier's clients), and the last round's tier mix."""
    out: dict = {}
    train = [r for r in rows if r.get("round", 0) > 0]
    ranks = sorted({int(k[4:].split("_")[0]) for r in train for k in r if k.startswith("tier") and k[4:5].isdigit()})
    for rank in ranks:
        n = sum(r.get(f"tier{rank}_clients", 0) for r in train)
        for d in ("up", "down"):
            total = sum(r.get(f"tier{rank}_clients", 0) * r.get(f"tier{rank}_{d}_wire_mean", 0.0) for r in train)
            out[f"tier{rank}_{d}_bytes_per_client_round"] = total / n if n else None
        out[f"tier{rank}_client_rounds"] = n
    if train and "tier_mix" in train[-1]:
        out["tier_mix_last_round"] = train[-1]["tier_mix"]
    return out


def plot(records: list[dict], out_dir: Path) -> Path:
    """Left: eval loss per round (the lowest seed's runs). Right: final eval loss (mean over seeds, bars
    from min to max) against bytes per client-round, up + down, on a log axis: who wins at what cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.4))
    first = min(r["seed"] for r in records)
    for rec in records:
        if rec["seed"] == first:
            ax.plot(range(len(rec["eval_losses"])), rec["eval_losses"], marker="o", ms=3,
                    ls="-" if rec["family"] == "lordba" else "--", label=rec["variant"])
    ax.set_xlabel("round")
    ax.set_ylabel("eval loss")
    ax.set_title(f"eval loss per round (seed {first})")
    ax.legend(fontsize=7)
    by_variant: dict[str, list[dict]] = {}
    for rec in records:
        by_variant.setdefault(rec["variant"], []).append(rec)
    for name, recs in sorted(by_variant.items()):
        losses = [r["final_eval_loss"] for r in recs]
        cost = [r["up_bytes_per_client_round"] + r["down_bytes_per_client_round"] for r in recs]
        mean_loss, mean_cost = sum(losses) / len(losses), sum(cost) / len(cost)
        bx.errorbar([mean_cost], [mean_loss], yerr=[[mean_loss - min(losses)], [max(losses) - mean_loss]],
                    fmt="o" if recs[0]["family"] == "lordba" else "s", capsize=3)
        bx.annotate(f"{name} ({len(recs)} seed{'s' if len(recs) > 1 else ''})", (mean_cost, mean_loss),
                    fontsize=7, xytext=(4, 3), textcoords="offset points")
    bx.set_xscale("log")
    bx.set_xlabel("bytes per client-round, up + down (log)")
    bx.set_ylabel("final eval loss")
    bx.set_title("final loss vs bytes")
    path = out_dir / "hetero.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    from flwr.common.config import parse_config_args

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="shakespeare", choices=("shakespeare", "gsm"))
    p.add_argument("--tiers", default=DEFAULT_TIERS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--run-config", default="", help="overrides of every run, Flower syntax")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--only", nargs="+", metavar="VARIANT", help="run only these variants (e.g. lora-hetlora-mixed)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out-dir", type=Path)
    args = p.parse_args(argv)
    out_dir = (args.out_dir or Path("results/hetero-quick" if args.quick else "results/hetero")).resolve()
    out = out_dir / "hetero.jsonl"
    user = parse_config_args([args.run_config]) if args.run_config.strip() else {}
    lrs = map_lrs(None)
    methods = tuple(m for m in args.methods.split(",") if m)
    for spec, extra in plan(args.tiers, args.seeds, args.task, methods, args.only):
        rc = run_config_for(spec, lrs, args.quick, {**user, **extra}, str(out_dir))
        rc["name"] = f"{spec['variant']}-s{spec['seed']}"
        print(f"[hetero] {rc['name']} ...", file=sys.stderr, flush=True)
        rows, code, wall = launch(rc, SUPERNODES)
        rec = summarize(spec, rows, code, wall, rc)
        rec.update(tier_fields(rows))
        rec["tiers"] = extra.get("hetero.tiers", "")
        rec["quick"] = args.quick
        emit(rec, out)
    records = [r for r in load_records(out) if r.get("kind") == "run"]
    print(f"[hetero] {out}, {plot(records, out_dir)}", file=sys.stderr)


if __name__ == "__main__":
    main()
