"""Faults injected into simulated clients (``faults.*`` run-config keys): failures, slow replies,
corrupted uplinks and byzantine updates, each decided from ``(seed, round, partition)`` so a run is
reproducible. Off by default; the server's defences are in :mod:`lordba_fl.methods.lordba.aggregation`."""

from __future__ import annotations

import math
import random
import time

from lordba_fl.registry import ATTACKS
from lordba_fl.runconfig import RunConfig

REPLAY_KEY = "faults.replay"  # context.state: a byzantine node's first update, sent again later
HOSTILE_KEY = "faults.hostile"  # context.state: a node's last honest frame, for a hostile replay


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
        if ATTACKS.get(f.attack).replays:
            from flwr.app import ConfigRecord

            if REPLAY_KEY in state:
                frame = state[REPLAY_KEY]["frame"]
            else:
                state[REPLAY_KEY] = ConfigRecord({"frame": frame})
        else:
            frame = method.attack(frame, downlink, f.attack)  # the method applies the attack's form
    if rng.random() < f.corrupt_prob:
        if rng.random() < 0.5:
            frame = frame[: max(1, math.floor(len(frame) * rng.random()))]  # truncated
        else:
            frame = bytes(rng.getrandbits(8) for _ in range(len(frame)))  # random bytes
    return frame


# ---- hostile replies ------------------------------------------------------------------------------
# What a compromised device can put in a reply, one kind per entry: garbage metrics (non-finite,
# wrong type, unknown keys, a flood of keys), bad weights, mutated frames, a replayed frame of an
# earlier round, the same frame as another node, no frame at all. The server must refuse each with a
# reason and go on (lordba_fl.wire.replies, the methods' decoders); simulations/bench_chaos.py sends
# thousands of them.
HOSTILE_KINDS = (
    "metric-inf", "metric-nan", "metric-list", "metric-unknown", "metric-flood", "rank-inf",
    "weight-negative", "weight-zero", "weight-huge", "weight-nan",
    "frame-bitflip", "frame-truncate", "frame-trailing", "frame-random", "frame-missing",
    "frame-replay", "frame-duplicate",
)


def hostile_reply(kind: str, frame: bytes, metrics: dict, rng: random.Random, earlier: bytes | None = None,
                  other: bytes | None = None) -> tuple[bytes | None, dict]:
    """``(frame, metrics)`` a hostile client sends instead of its honest ones (``None``: no frame).

    ``earlier``: one of its frames from a previous round (``frame-replay``); ``other``: another
    node's frame of this round (``frame-duplicate``); either falls back to a random mutation."""
    m = dict(metrics)
    f: bytes | None = frame
    if kind == "metric-inf":
        m["held-version"] = math.inf
    elif kind == "metric-nan":
        m["train_loss"] = math.nan
    elif kind == "metric-list":
        m["train_loss"] = [1.0, 2.0]
    elif kind == "metric-unknown":
        m["evil"] = 1.0
    elif kind == "metric-flood":
        m.update({f"k{i}": float(i) for i in range(1000)})
    elif kind == "rank-inf":
        m["rank"] = math.inf
    elif kind == "weight-negative":
        m["num-examples"] = -float(rng.randint(1, 100))
    elif kind == "weight-zero":
        m["num-examples"] = 0.0
    elif kind == "weight-huge":
        m["num-examples"] = 10.0 ** rng.randint(13, 300)
    elif kind == "weight-nan":
        m["num-examples"] = math.nan
    elif kind == "frame-bitflip":
        b = bytearray(frame)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= rng.randint(1, 255)
        f = bytes(b)
    elif kind == "frame-truncate":
        f = frame[: rng.randrange(len(frame))]
    elif kind == "frame-trailing":
        f = frame + bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))
    elif kind == "frame-random":
        f = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 2 * len(frame))))
    elif kind == "frame-missing":
        f = None
    elif kind == "frame-replay":
        f = earlier if earlier is not None else frame[:-1]
    elif kind == "frame-duplicate":
        f = other if other is not None else frame + b"\0"
    else:
        raise ValueError(f"unknown hostile reply kind {kind!r}; known: {HOSTILE_KINDS}")
    return f, m


def hostile(cfg: RunConfig, frame: bytes, metrics: dict, state, server_round: int, partition: int
            ) -> tuple[bytes | None, dict]:
    """What this client sends, as ``faults.hostile-fraction`` decides: its honest ``(frame, metrics)``
    or a hostile reply of a seeded random kind (:func:`hostile_reply`)."""
    p = cfg.faults.hostile_fraction
    if p <= 0:
        return frame, metrics
    rng = random.Random(f"hostile/{cfg.seed}/{server_round}/{partition}")
    earlier = state[HOSTILE_KEY]["frame"] if state is not None and HOSTILE_KEY in state else None
    if state is not None:
        from flwr.app import ConfigRecord

        state[HOSTILE_KEY] = ConfigRecord({"frame": frame})
    if rng.random() >= p:
        return frame, metrics
    return hostile_reply(rng.choice(HOSTILE_KINDS), frame, metrics, rng, earlier=earlier)
