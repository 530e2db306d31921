"""Per-round JSON lines, and at the end a terminal table, a CSV and PNG plots.

Each run writes ``<out-dir>/<run name>/rounds.jsonl``; plots cover every run that shares the parent
folder, so methods run side by side compare on one figure.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

COLUMNS = [
    "round", "method", "clients_sampled", "clients_succeeded", "tier_mix", "up_payload_mean", "up_wire_mean", "up_wire_max",
    "down_payload_mean", "down_wire_mean", "fp16_lora_bytes", "total_up_wire", "total_down_wire",
    "train_loss", "eval_loss", "perplexity", "accuracy_unseen", "accuracy_seen", "accuracy_heldout", "accuracy_pooled", "client_flip_rate",
    "global_flip_rate", "flip_agreement", "fit_error_median", "wall_s",
]


def round_row(run_round: int, method: str, summary: dict, train: dict, evaluation: dict, wall_s: float) -> dict:
    """One round's JSON line from the ledger summary and the metrics."""
    up, down, tot = summary["up"], summary["down"], summary["totals"]
    row = {
        "round": run_round,
        "method": method,
        "clients_sampled": int(train.get("clients_sampled", 0)),
        "clients_succeeded": int(train.get("accepted", 0)),
        "up_payload_sum": up["payload"]["sum"], "up_payload_mean": up["payload"]["mean"], "up_payload_max": up["payload"]["max"],
        "up_wire_sum": up["wire"]["sum"], "up_wire_mean": up["wire"]["mean"], "up_wire_max": up["wire"]["max"],
        "down_payload_sum": down["payload"]["sum"], "down_payload_mean": down["payload"]["mean"],
        "down_payload_max": down["payload"]["max"],
        "down_wire_sum": down["wire"]["sum"], "down_wire_mean": down["wire"]["mean"], "down_wire_max": down["wire"]["max"],
        "fp16_lora_bytes": up["fp16_lora"]["max"] or down["fp16_lora"]["max"],
        "total_up_wire": tot["up_wire_bytes"], "total_down_wire": tot["down_wire_bytes"],
        "total_up_payload": tot["up_payload_bytes"], "total_down_payload": tot["down_payload_bytes"],
        "wall_s": round(wall_s, 2),
    }
    row.update({k: v for k, v in train.items() if k not in row})
    row.update(evaluation)
    return row


class RunRecorder:
    """Appends round rows to ``rounds.jsonl`` and writes the end-of-run table, CSV and plots."""

    def __init__(self, run_dir: Path, rows: list[dict] | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = list(rows or [])
        self.path = self.run_dir / "rounds.jsonl"
        with self.path.open("w") as f:  # rewrite what is known (a resumed run starts from its checkpoint)
            for row in self.rows:
                f.write(json.dumps(row) + "\n")

    def log(self, row: dict) -> None:
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def write_csv(self) -> Path:
        path = self.run_dir / "rounds.csv"
        keys = sorted({k for r in self.rows for k in r}, key=lambda k: (COLUMNS.index(k) if k in COLUMNS else 99, k))
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.rows)
        return path

    def table(self, width: int = 100) -> str:
        """The run at a glance, at most ``width`` columns (every field is in ``rounds.jsonl`` / ``rounds.csv``)."""
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"{self.rows[0]['method'] if self.rows else ''} per round", box=None, padding=(0, 1))
        cols = [(head, get) for head, key, get in TABLE if any(_getter(key)(r) is not None for r in self.rows)]
        for head, _ in cols:
            t.add_column(head, justify="right")
        for r in self.rows:
            t.add_row(*[get(r) for _, get in cols])
        console = Console(width=width, record=True, file=open(os.devnull, "w"))
        console.print(t)
        return console.export_text()

    def plot(self) -> list[Path]:
        return plot_runs(self.run_dir.parent)


def _accuracy(r: dict):
    return next((v for k, v in r.items() if k.startswith("accuracy_")), None)


def _per_client(direction: str):
    """Wire bytes per sampled client in a round: every message (``<d>_wire_per_client``: training and the
    client-side evaluation's broadcast), else the training messages' mean."""
    return lambda r: r.get(f"{direction}_wire_per_client", r.get(f"{direction}_wire_mean"))


def _getter(key):
    return key if callable(key) else (lambda r: r.get(key))


def _num(key, scale: float = 1.0, digits: int = 4, kind: str = "g"):
    get = _getter(key)
    return lambda r: "" if get(r) is None else f"{get(r) / scale:,.{digits}{kind}}"


# (header, field or function giving the value, its text): what the end-of-run table shows
TABLE = (
    ("round", "round", lambda r: str(r["round"])),
    ("clients", "clients_sampled", lambda r: f"{r.get('clients_succeeded', 0)}/{r.get('clients_sampled', 0)}"),
    ("up KB", _per_client("up"), _num(_per_client("up"), 1e3)),
    ("down KB", _per_client("down"), _num(_per_client("down"), 1e3)),
    ("total MB", "total_up_wire", lambda r: f"{(r.get('total_up_wire', 0) + r.get('total_down_wire', 0)) / 1e6:,.4g}"),
    ("train loss", "train_loss", _num("train_loss", kind="f")),
    ("eval loss", "eval_loss", _num("eval_loss", kind="f")),
    ("accuracy", _accuracy, _num(_accuracy, digits=3)),
    ("flips", "global_flip_rate", _num("global_flip_rate", digits=2)),
    ("s", "wall_s", _num("wall_s", digits=3)),
)


def progress_line(row: dict, rounds: int) -> str:
    """The one line a round prints: eval loss, the task metric, wire bytes per sampled client both ways
    (every message of the round), clients, time."""
    parts = [f"round {row['round']:>{len(str(rounds))}}/{rounds}"]
    if row.get("eval_loss") is not None:
        parts.append(f"eval loss {row['eval_loss']:.4f}")
    acc = _accuracy(row)
    if acc is not None:
        parts.append(f"accuracy {acc:.3f}")
    if row["round"] > 0:
        parts += [f"up {(_per_client('up')(row) or 0) / 1e3:,.1f} KB", f"down {(_per_client('down')(row) or 0) / 1e3:,.1f} KB",
                  f"clients {row.get('clients_succeeded', 0)}/{row.get('clients_sampled', 0)}"]
    parts.append(f"{row.get('wall_s', 0):.1f} s")
    return "  ".join(parts)


def load_runs(folder: Path) -> dict[str, list[dict]]:
    runs = {}
    for path in sorted(Path(folder).glob("*/rounds.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows:
            runs[path.parent.name] = rows
    return runs


def plot_runs(folder: Path) -> list[Path]:
    """bytes.png (per round and cumulative, both directions) and quality.png (eval loss vs cumulative bytes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = load_runs(folder)
    if not runs:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in runs.items():
        rr = [r for r in rows if r["round"] > 0]
        x = [r["round"] for r in rr]
        axes[0].plot(x, [r["up_wire_mean"] for r in rr], marker="o", label=f"{name} up")
        axes[0].plot(x, [r["down_wire_mean"] for r in rr], marker="x", linestyle="--", label=f"{name} down")
        axes[1].plot(x, [r["total_up_wire"] + r["total_down_wire"] for r in rr], marker="o", label=name)
    axes[0].set(title="wire bytes per client-round", xlabel="round", ylabel="bytes", yscale="log")
    axes[1].set(title="cumulative wire bytes (both directions)", xlabel="round", ylabel="bytes", yscale="log")
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = [Path(folder) / "bytes.png"]
    fig.savefig(out[0], dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in runs.items():
        pts = [(r.get("total_up_wire", 0) + r.get("total_down_wire", 0), r["eval_loss"]) for r in rows if "eval_loss" in r]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set(title="eval loss vs cumulative wire bytes", xlabel="bytes (up + down, all clients)", ylabel="eval loss", xscale="symlog")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.append(Path(folder) / "quality.png")
    fig.savefig(out[1], dpi=110)
    plt.close(fig)
    return out
