"""The Flower strategy every method runs under: per-node downlink frames, byte metering, safe aggregation.

:class:`AdapterStrategy` subclasses Flower's ``FedAvg`` (its round loop, ``start``, is untouched) and
delegates the maths to a :class:`lordba_fl.methods.Method`: each sampled node gets its own frame
(a LoRDBA node gets a delta against the version it last acknowledged), every message in both
directions is recorded as a :class:`~lordba_fl.wire.metering.MessageBytes`, and replies that are errors,
lack a frame, or fail to decode are dropped and logged, never applied. Node sampling is seeded per
round, so a resumed run samples exactly what an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import time
from collections.abc import Iterable

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from lordba_fl.methods import Method, Reply
from lordba_fl.wire.metering import ByteLedger, MessageBytes
from lordba_fl.wire.replies import ReplyError, cap_weights, validate_metrics

log = logging.getLogger("lordba_fl")
# substrings of a failed client's reason that mean it ran out of memory (Ray's OOM killer, torch, the kernel)
_OOM_SIGNS = ("outofmemory", "out of memory", "oom", "memory", "killed", "sigkill")


def reason_class(reason: str) -> str:
    """A refusal reason without its numbers and node ids, so reasons of one kind count together
    (``"metric 'held-version' must be finite"``, ``"ChecksumError"``, ``"duplicate frame"``)."""
    import re

    text = reason.removeprefix("malformed reply: ")
    m = re.match(r"^(\w+Error):", text) or re.match(r"^<class '(?:[\w.]+\.)?(\w+)'>", text)  # ours, or Ray's
    if m:
        return m.group(1)
    text = re.split(r"[;([]|: node|, got|; got", text, maxsplit=1)[0]
    return re.sub(r"-?\d[\d.e+-]*", "N", text).strip()[:80]


class RunStalledError(RuntimeError):
    """Too many training rounds in a row aggregated too few replies; the message says why they failed."""


def stalled_message(streak: list[tuple[int, int, list[str]]], min_clients: int) -> str:
    """What to tell the user when ``streak`` (``[(round, accepted, reasons)]``) stops the run."""
    reasons = [r for _, _, rs in streak for r in rs]
    counts: dict[str, int] = {}
    for r in reasons:
        key = r.splitlines()[0][:160] if r else "no reason given"
        counts[key] = counts.get(key, 0) + 1
    top = "; ".join(f"{n} x {why}" for why, n in sorted(counts.items(), key=lambda kv: -kv[1])[:3]) or "no replies at all"
    rounds = ", ".join(f"round {rnd}: {acc} aggregated" for rnd, acc, _ in streak)
    oom = any(any(s in r.lower() for s in _OOM_SIGNS) for r in reasons)
    died = any("ActorDiedError" in r for r in reasons)
    if died:
        fix = ("the simulation engine's workers died (killed by a signal or for memory) and are not restarted "
               "within a run; a resumed run starts fresh ones. If memory killed them, lower train.batch-size or "
               "rank, turn on train.gradient-checkpointing, or run fewer clients at once (--cpus-per-client)")
    elif oom:
        fix = ("the clients ran out of memory: lower train.batch-size or rank, turn on train.gradient-checkpointing, "
               "or give each client more memory (fewer clients per machine: --cpus-per-client)")
    else:
        fix = "fix what the clients report above (their logs have the tracebacks), or lower faults.min-clients"
    return (f"stopped: {len(streak)} training rounds in a row aggregated fewer than faults.min-clients = {min_clients} "
            f"replies ({rounds}); clients failed with: {top}. {fix}. The last good round is checkpointed: rerun "
            "with resume=true to continue from it.")
FRAME_RECORD = "adapter"
FRAME_KEY = "frame"
FRAME_STYPE = "lordba-fl/frame"


def frame_record(frame: bytes) -> ArrayRecord:
    """One framed buffer as the message's only array (raw bytes, no numpy header)."""
    return ArrayRecord({FRAME_KEY: Array(dtype="uint8", shape=(len(frame),), stype=FRAME_STYPE, data=frame)})


def read_frame(content: RecordDict) -> bytes:
    """The frame of a message; a clear error when it is missing or of the wrong type."""
    try:
        arr = content[FRAME_RECORD][FRAME_KEY]
    except KeyError:
        raise ValueError(f"message has no '{FRAME_RECORD}/{FRAME_KEY}' frame; is the other side a lordba-fl app?") from None
    if arr.stype != FRAME_STYPE:
        raise ValueError(f"frame array has stype {arr.stype!r}, expected {FRAME_STYPE!r}")
    return bytes(arr.data)


def sample_round(ordered: list[int], seed: int, run_round: int, phase: str, k: int) -> list[int]:
    """The ``k`` nodes of one round and phase, drawn from ``ordered`` (nodes in partition order) by a
    generator seeded with the run's seed, the round and the phase; sorted."""
    rng = random.Random(f"{seed}/{run_round}/{phase}")
    return sorted(rng.sample(ordered, k))


class AdapterStrategy(FedAvg):
    """FedAvg's loop with a method's frames, per-node downlinks and byte accounting.

    Parameters
    ----------
    method : Method
        The federated method (server side initialised).
    clients_per_round : int
        Nodes sampled for training and for evaluation each round; the run waits for this many.
    seed : int
        Seeds node sampling (per round and phase).
    round_offset : int
        Rounds already done (resume): Flower's round ``i`` is run round ``i + round_offset``.
    weight_cap : float
        A reply's weight (its ``num-examples``) is capped at this times the round's median (0: off).
    min_clients, max_failed_rounds : int
        A training round aggregating fewer than ``min_clients`` replies is failed; ``max_failed_rounds``
        failed rounds in a row raise :class:`RunStalledError` (0: never).
    """

    def __init__(self, method: Method, clients_per_round: int, seed: int = 0, round_offset: int = 0,
                 ledger: ByteLedger | None = None, client_eval: bool = True, weight_cap: float = 0.0,
                 min_clients: int = 1, max_failed_rounds: int = 0):
        super().__init__(
            fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=clients_per_round,
            min_evaluate_nodes=clients_per_round, min_available_nodes=clients_per_round,
        )
        self.method = method
        self.clients_per_round = clients_per_round
        self.seed = seed
        self.round_offset = round_offset
        self.ledger = ledger or ByteLedger()
        self.round_metrics: dict[int, dict] = {}
        self.round_workers: dict[int, dict[str, dict]] = {}
        self.round_started: dict[int, float] = {}
        self.sent: dict[tuple[int, str], list[int]] = {}  # (round, phase) -> nodes a message went to
        self.client_eval = client_eval  # False: no federated evaluation round trip (eval.client-side)
        self.partitions: dict[int, float] = {}  # node id -> its partition id (asked once per node)
        self.weight_cap = weight_cap
        self.min_clients, self.max_failed_rounds = min_clients, max_failed_rounds
        self.failed_streak: list[tuple[int, int, list[str]]] = []  # consecutive failed rounds
        self.round_failures: dict[int, list[tuple[int, str]]] = {}  # run round -> (node, reason) of every refusal

    # ---- sampling -------------------------------------------------------------------------------
    def _sample(self, grid, run_round: int, phase: str) -> list[int]:
        deadline = time.time() + 600
        while True:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) >= self.clients_per_round:
                break
            if time.time() > deadline:
                raise TimeoutError(
                    f"only {len(nodes)} nodes connected after 600 s; clients-per-round is {self.clients_per_round}: "
                    "start more SuperNodes or lower clients-per-round"
                )
            time.sleep(1.0)
        unknown = [n for n in nodes if n not in self.partitions]
        if unknown:
            self._ask_partitions(grid, unknown, run_round)
        # sample over the nodes ordered by partition: the simulation engine draws new random node ids
        # every run, so sampling the ids themselves would give the same seed different data
        ordered = sorted(nodes, key=lambda n: (self.partitions.get(n, math.inf), n))
        return sample_round(ordered, self.seed, run_round, phase, self.clients_per_round)

    def _ask_partitions(self, grid, nodes: list[int], run_round: int) -> None:
        """One small query message per node not seen before: which partition does it hold (metered)."""
        msgs = []
        for node in nodes:
            content = RecordDict({"config": ConfigRecord({"server-round": run_round, "query": "partition-id"})})
            msgs.append(Message(content=content, dst_node_id=node, message_type=MessageType.QUERY))
        replies = list(grid.send_and_receive(msgs, timeout=60))
        for direction, batch in (("down", msgs), ("up", replies)):
            for msg in batch:
                node = msg.metadata.dst_node_id if direction == "down" else msg.metadata.src_node_id
                self.ledger.add(MessageBytes.of(msg, round=run_round, direction=direction, node_id=node,
                                                fp16_lora_bytes=0, method=self.method.name, phase="query"))
        for msg in replies:
            node = msg.metadata.src_node_id
            try:
                if msg.has_error():
                    continue
                metrics = validate_metrics(msg.content["metrics"], required=("partition-id",),
                                           extra=self.method.reply_metrics)
                if "rank" in metrics:  # the adapter rank this node trains (heterogeneous devices)
                    self.method.note_rank(node, int(metrics["rank"]))
                self.partitions[node] = metrics["partition-id"]
            except (KeyError, TypeError, ValueError) as e:  # ReplyError is a ValueError
                # the node stays unknown (sampled last) and is asked again
                log.warning("round %d query: dropped reply from node %d: %s", run_round, node, e)

    def _messages(self, run_round: int, grid, phase: str, message_type: str) -> list[Message]:
        msgs = []
        self.sent[(run_round, phase)] = nodes = self._sample(grid, run_round, phase)
        for node in nodes:
            frame = self.method.downlink(node, run_round)
            content = RecordDict({
                FRAME_RECORD: frame_record(frame),
                "config": ConfigRecord({"server-round": run_round, "version": self.method.version}),
            })
            msg = Message(content=content, dst_node_id=node, message_type=message_type)
            self.ledger.add(MessageBytes.of(
                msg, round=run_round, direction="down", node_id=node, fp16_lora_bytes=self.method.fp16_lora_bytes(),
                method=self.method.name, phase=phase,
            ))
            msgs.append(msg)
        return msgs

    # ---- train ----------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid) -> Iterable[Message]:
        run_round = server_round + self.round_offset
        self.round_started[run_round] = time.time()
        return self._messages(run_round, grid, "train", MessageType.TRAIN)

    def _collect(self, run_round: int, replies: Iterable[Message], phase: str):
        good, metrics, failed = [], [], []
        digests: dict[bytes, int] = {}  # frame digest -> the node that sent it first this round
        replies = list(replies)
        answered = {msg.metadata.src_node_id for msg in replies}
        for node in self.sent.pop((run_round, phase), []):
            if node not in answered:
                # lost link, killed process or past server.round-timeout: whether it stored the
                # broadcast is unknown, so it gets the full state next time it is sampled
                failed.append((node, "no reply within server.round-timeout"))
                self.method.note_held(node, None)
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                failed.append((node, msg.error.reason))
                self.method.note_held(node, None)  # its state is unknown now: send it the full state next
                continue
            self.ledger.add(MessageBytes.of(
                msg, round=run_round, direction="up", node_id=node, fp16_lora_bytes=self.method.fp16_lora_bytes(),
                method=self.method.name, phase=phase,
            ))
            try:
                frame = read_frame(msg.content) if phase == "train" and FRAME_RECORD in msg.content else b""
                if frame:  # a replayed frame is refused even when its first copy failed another check
                    digest = hashlib.blake2b(frame, digest_size=16).digest()
                    if digest in digests:
                        raise ReplyError(f"duplicate frame: node {digests[digest]} sent the same bytes this round")
                    digests[digest] = node
                m = validate_metrics(msg.content["metrics"], extra=self.method.reply_metrics)
                if "rank" in m:  # heterogeneous devices: a node may change tier between rounds
                    self.method.note_rank(node, int(m["rank"]))
                if m.get("tier-mismatch"):
                    if "rank" not in m:
                        raise ReplyError("a tier-mismatch reply must say the rank it trains")
                    failed.append((node, f"it trains rank {int(m['rank'])} now, not the tier it was sent; "
                                         "it gets that tier's full state next"))
                    continue
                validate_metrics(m, required=("num-examples", "held-version"), extra=self.method.reply_metrics)
                weight = m["num-examples"]
                if phase == "train" and not frame:
                    frame = read_frame(msg.content)  # raises: a training reply without its frame
                self.method.note_held(node, int(m["held-version"]))
            except (KeyError, TypeError, ValueError) as e:  # ReplyError is a ValueError
                failed.append((node, f"malformed reply: {e}"))
                self.method.note_held(node, None)
                continue
            good.append(Reply(node, frame, weight))
            metrics.append(m)
            if "worker-pid" in m:  # the latest counters of each worker process that served this round
                w = self.round_workers.setdefault(run_round, {}).setdefault(str(int(m["worker-pid"])), {})
                w["base_loads"] = max(w.get("base_loads", 0), int(m["worker-base-loads"]))
                w["clients_served"] = max(w.get("clients_served", 0), int(m["worker-clients-served"]))
        for node, why in failed:
            log.warning("round %d %s: dropped reply from node %d: %s", run_round, phase, node, why)
        # aggregate in partition order, not arrival order: float sums (and so the new state) do not
        # depend on which client answered first, so a resumed run reproduces an uninterrupted one
        order = sorted(range(len(good)), key=lambda i: (float(metrics[i].get("partition-id", -1)), good[i].node_id))
        good, metrics = [good[i] for i in order], [metrics[i] for i in order]
        capped = cap_weights([r.weight for r in good], self.weight_cap)
        good = [Reply(r.node_id, r.frame, w) for r, w in zip(good, capped)]
        return good, metrics, failed

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        run_round = server_round + self.round_offset
        good, metrics, failed = self._collect(run_round, replies, "train")
        agg, rejected = self.method.aggregate(run_round, good) if good else ({"accepted": 0.0, "rejected": 0.0}, [])
        for node, why in rejected:
            log.warning("round %d: rejected update from node %d: %s", run_round, node, why)
        self.round_failures[run_round] = failed + list(rejected)
        out = {"clients_sampled": float(self.clients_per_round), "clients_failed": float(len(failed)),
               "clients_silent": float(sum(why.startswith("no reply") for _, why in failed))}
        out.update(agg)
        out.update(_weighted(metrics, ("train_loss", "flip_rate", "device_fit_error")))
        states = [float(m["client-state-bytes"]) for m in metrics if "client-state-bytes" in m]
        if states:
            out["client_state_bytes_max"] = max(states)
        self.round_metrics.setdefault(run_round, {}).update(out)
        accepted = int(out.get("accepted", 0))
        if accepted < self.min_clients:
            self.failed_streak.append((run_round, accepted, [why for _, why in failed + rejected]))
            log.error("round %d: only %d of %d sampled clients aggregated (faults.min-clients = %d)", run_round,
                      accepted, self.clients_per_round, self.min_clients)
            if self.max_failed_rounds and len(self.failed_streak) >= self.max_failed_rounds:
                raise RunStalledError(stalled_message(self.failed_streak, self.min_clients))
        else:
            self.failed_streak = []
        return ArrayRecord(), MetricRecord({k: float(v) for k, v in out.items()})

    # ---- evaluate -------------------------------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid) -> Iterable[Message]:
        if not self.client_eval:
            return []
        return self._messages(server_round + self.round_offset, grid, "evaluate", MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        if not self.client_eval:
            return None
        run_round = server_round + self.round_offset
        _, metrics, failed = self._collect(run_round, replies, "evaluate")
        out = {f"client_{k}": v for k, v in _weighted(metrics, ("eval_loss", "perplexity")).items()}
        out["clients_eval_failed"] = float(len(failed))
        self.round_metrics.setdefault(run_round, {}).update(out)
        return MetricRecord(out) if out else None

    def summary(self) -> None:
        log.info("AdapterStrategy: method=%s clients-per-round=%d", self.method.name, self.clients_per_round)


def _weighted(metrics: list[dict], keys: tuple[str, ...]) -> dict[str, float]:
    out = {}
    for key in keys:
        pairs = [(float(m["num-examples"]), float(m[key])) for m in metrics if key in m]
        total = sum(w for w, _ in pairs)
        if pairs and total > 0:
            out[key] = sum(w * v for w, v in pairs) / total
    return out
