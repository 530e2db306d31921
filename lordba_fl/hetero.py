"""Heterogeneous devices: each client trains the adapter rank its device affords (nested ranks).

``hetero.tiers = "4:0.3,8:0.3,16:0.4"`` assigns each partition a rank, drawn once per (run seed,
partition) with those probabilities; a SuperNode started with ``--node-config "partition-id=3 rank=8"``
declares its own (and may set its ``local-steps`` and ``batch-size``), or states a memory budget,
``memory-mb=900``: the node then trains the largest rank, batch and checkpointing setting whose
*measured* peak RSS of a client round fits it (a table written by ``python -m simulations.bench_edge
--sweep``; :data:`MEMORY_TABLE` ships the one measured for SmolLM2-135M on a 2-core x86 machine, and
``memory-table=<file>`` points a node at its own). Every tier's adapter is the leading ``r`` components of the global rank-``R``
adapter at the same scaling ``alpha / R`` (:func:`lordba_fl.methods.lordba.layout.at_rank`), so the server
aggregates every tier's update in one space and broadcasts each tier exactly its nested part.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

# measured peak RSS of one client round per (model, quant, seq_len, rank, batch, checkpointing):
# written by `python -m simulations.bench_edge --sweep --out lordba_fl/edge_memory.jsonl`
MEMORY_TABLE = Path(__file__).with_name("edge_memory.jsonl")


def parse_tiers(text: str, top_rank: int) -> tuple[tuple[int, float], ...]:
    """``"4:0.3,8:0.7"`` -> ((4, 0.3), (8, 0.7)); ranks in 1..top_rank, shares > 0 summing to 1; ``""`` -> ()."""
    if not text.strip():
        return ()
    tiers = []
    for part in text.split(","):
        rank, sep, share = part.strip().partition(":")
        try:
            r, p = int(rank), float(share)
        except ValueError:
            r, p = 0, math.nan
        if not sep or not 1 <= r <= top_rank or not 0.0 < p <= 1.0:
            raise ValueError(f"hetero.tiers entries are rank:share with a rank in 1..{top_rank} (the run's rank) and a "
                             f"share in (0, 1], e.g. '4:0.3,8:0.3,{top_rank}:0.4'; got {part.strip()!r}")
        tiers.append((r, p))
    ranks = [r for r, _ in tiers]
    if len(set(ranks)) != len(ranks):
        raise ValueError(f"hetero.tiers lists a rank twice: {text!r}")
    if abs(sum(p for _, p in tiers) - 1.0) > 1e-6:
        raise ValueError(f"hetero.tiers shares must sum to 1; {text!r} sums to {sum(p for _, p in tiers):g}")
    return tuple(sorted(tiers))


def tier_rank(tiers: tuple[tuple[int, float], ...], seed: int, partition_id: int, top_rank: int) -> int:
    """The rank of ``partition_id``: a seeded draw from ``tiers`` (``top_rank`` without tiers)."""
    if not tiers:
        return top_rank
    digest = hashlib.blake2b(f"tier/{seed}/{partition_id}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "little") / 2.0**64
    acc = 0.0
    for rank, share in tiers:
        acc += share
        if u < acc:
            return rank
    return tiers[-1][0]


def node_rank(node_config: dict, tiers: tuple[tuple[int, float], ...], seed: int, partition_id: int,
              top_rank: int) -> int:
    """A node's rank: its ``rank`` node-config entry if it declares one, else its tier's."""
    if "rank" in node_config:
        r = node_config["rank"]
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= top_rank:
            raise ValueError(f"node_config rank must be an integer in 1..{top_rank} (the run's rank); got {r!r}")
        return r
    return tier_rank(tiers, seed, partition_id, top_rank)


@dataclass(frozen=True)
class NodeProfile:
    """What one node trains: its adapter rank and, where it sets them, its local steps, batch and
    gradient checkpointing (None: the run's)."""

    rank: int
    local_steps: int | None = None
    batch_size: int | None = None
    gradient_checkpointing: bool | None = None
    peak_rss_mb: float | None = None  # the measured peak of the chosen setting (memory-mb)


def _positive_int(node_config: dict, key: str) -> int | None:
    if key not in node_config:
        return None
    v = node_config[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"node_config {key} must be a positive integer; got {v!r}")
    return v


def load_memory_table(path: str | Path) -> list[dict]:
    """The rows of a memory table (JSON lines with model, quant, seq_len, rank, batch_size,
    gradient_checkpointing, peak_rss_MB); a missing file or column is an error naming the fix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"memory table {path} not found; measure one on the device with "
                                "`python -m simulations.bench_edge --sweep --out <file>` and set memory-table=<file>")
    need = ("model", "quant", "seq_len", "rank", "batch_size", "gradient_checkpointing", "peak_rss_MB")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = [k for k in need if k not in row]
        if missing:
            raise ValueError(f"memory table {path} line {i} lacks {missing}; rows need {list(need)}")
        rows.append(row)
    return rows


def fit_memory(rows: list[dict], budget_mb: float, *, model: str, quant: str, seq_len: int, top_rank: int,
               rank: int | None = None, runtime: str = "transformers") -> dict:
    """The measured setting a node with ``budget_mb`` trains: among the rows of this model, base, model
    runtime and sequence length (ranks up to ``top_rank``, or exactly ``rank`` when the node declares one)
    whose peak fits, the largest rank, then the largest batch, then without checkpointing (faster)."""
    same = [r for r in rows if r["model"] == model and r["quant"] == quant and int(r["seq_len"]) == seq_len
            and r.get("model_runtime", "transformers") == runtime
            and int(r["rank"]) <= top_rank and (rank is None or int(r["rank"]) == rank)]
    if not same:
        raise ValueError(f"the memory table has no measurement for model {model!r}, quant {quant!r}, "
                         f"model-runtime {runtime!r}, seq-len {seq_len}"
                         f"{'' if rank is None else f', rank {rank}'} (ranks <= {top_rank}); measure them with "
                         "`python -m simulations.bench_edge --sweep` on the device")
    fits = [r for r in same if float(r["peak_rss_MB"]) <= budget_mb]
    if not fits:
        low = min(same, key=lambda r: float(r["peak_rss_MB"]))
        raise ValueError(f"memory-mb={budget_mb:g} fits no measured setting: the smallest, rank {low['rank']} batch "
                         f"{low['batch_size']} checkpointing {low['gradient_checkpointing']}, peaks at "
                         f"{float(low['peak_rss_MB']):.0f} MB")
    return max(fits, key=lambda r: (int(r["rank"]), int(r["batch_size"]), not r["gradient_checkpointing"]))


def node_profile(node_config: dict, tiers: tuple[tuple[int, float], ...], seed: int, partition_id: int,
                 top_rank: int, *, model: str = "", quant: str = "", seq_len: int = 0,
                 runtime: str = "transformers") -> NodeProfile:
    """A node's :class:`NodeProfile` from its node config (``rank``, ``local-steps``, ``batch-size``,
    ``memory-mb``, ``memory-table``), else its tier's rank."""
    steps, batch = _positive_int(node_config, "local-steps"), _positive_int(node_config, "batch-size")
    declared = node_rank(node_config, tiers, seed, partition_id, top_rank) if "rank" in node_config else None
    if "memory-mb" not in node_config:
        rank = declared if declared is not None else tier_rank(tiers, seed, partition_id, top_rank)
        return NodeProfile(rank, steps, batch)
    budget = node_config["memory-mb"]
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
        raise ValueError(f"node_config memory-mb must be a positive number of MB; got {budget!r}")
    if batch is not None:
        raise ValueError("node_config sets both memory-mb and batch-size; memory-mb chooses the batch, drop one")
    rows = load_memory_table(node_config.get("memory-table", MEMORY_TABLE))
    best = fit_memory(rows, float(budget), model=model, quant=quant, seq_len=seq_len, top_rank=top_rank, rank=declared,
                      runtime=runtime)
    return NodeProfile(int(best["rank"]), steps, int(best["batch_size"]), bool(best["gradient_checkpointing"]),
                       float(best["peak_rss_MB"]))
