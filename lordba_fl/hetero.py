"""Heterogeneous devices: each client trains the adapter rank its device affords (nested ranks).

``hetero.tiers = "4:0.3,8:0.3,16:0.4"`` assigns each partition a rank, drawn once per (run seed,
partition) with those probabilities; a SuperNode started with ``--node-config "partition-id=3 rank=8"``
declares its own. Every tier's adapter is the leading ``r`` components of the global rank-``R``
adapter at the same scaling ``alpha / R`` (:func:`lordba_fl.wire.layout.at_rank`), so the server
aggregates every tier's update in one space and broadcasts each tier exactly its nested part.
"""

from __future__ import annotations

import hashlib
import math


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
