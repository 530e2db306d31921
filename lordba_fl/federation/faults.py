"""Faults injected into simulated clients (``faults.*`` run-config keys): failures, slow replies,
corrupted uplinks and byzantine updates, each decided from ``(seed, round, partition)`` so a run is
reproducible. Off by default; the server's defences are in :mod:`lordba_fl.aggregation`."""

from __future__ import annotations

import math
import random
import time

from lordba_fl.runconfig import RunConfig

REPLAY_KEY = "faults.replay"  # context.state: a byzantine node's first update, sent again later


def _draws(cfg: RunConfig, server_round: int, partition: int) -> random.Random:
    """This client-round's fault draws, in order: fail, slow, corrupt, then how to corrupt."""
    return random.Random(f"faults/{cfg.seed}/{server_round}/{partition}")


def byzantine_partitions(cfg: RunConfig, num_partitions: int) -> set[int]:
    """The fixed, seeded set of attacking partitions: ``round(fraction * N)`` of them (at least one)."""
    f = cfg.faults.byzantine_fraction
    if f <= 0:
        return set()
    order = random.Random(f"byzantine/{cfg.seed}").sample(range(num_partitions), num_partitions)
    return set(order[: max(1, round(f * num_partitions))])


def before_training(cfg: RunConfig, server_round: int, partition: int) -> None:
    """Fail or stall this client now, as ``faults.fail-prob`` / ``faults.slow-prob`` decide."""
    f, rng = cfg.faults, _draws(cfg, server_round, partition)
    if rng.random() < f.fail_prob:
        raise RuntimeError(f"injected failure (faults.fail-prob={f.fail_prob}) in round {server_round}")
    if rng.random() < f.slow_prob and f.slow_s > 0:
        time.sleep(f.slow_s)


def after_training(cfg: RunConfig, method, frame: bytes, state, server_round: int, partition: int,
                   num_partitions: int, downlink: bytes) -> bytes:
    """The uplink this client actually sends: attacked if it is byzantine (``method.attack``, given
    the round's ``downlink``), corrupted by chance."""
    f = cfg.faults
    rng = _draws(cfg, server_round, partition)
    rng.random(), rng.random()  # fail and slow: decided by before_training
    if partition in byzantine_partitions(cfg, num_partitions):
        if f.attack == "replay":
            from flwr.app import ConfigRecord

            if REPLAY_KEY in state:
                frame = state[REPLAY_KEY]["frame"]
            else:
                state[REPLAY_KEY] = ConfigRecord({"frame": frame})
        else:
            frame = method.attack(frame, downlink, f.attack)
    if rng.random() < f.corrupt_prob:
        if rng.random() < 0.5:
            frame = frame[: max(1, math.floor(len(frame) * rng.random()))]  # truncated
        else:
            frame = bytes(rng.getrandbits(8) for _ in range(len(frame)))  # random bytes
    return frame
