"""Byte accounting for Flower messages: one record type for every method, and per-round summaries.

For each message, both directions:

* ``payload_bytes``: the method's encoded data in the message (every array's bytes plus every
  ``bytes`` value of a config record) — what the method chose to send;
* ``wire_bytes``: what Flower actually pushes for it: ``sum(len(obj.deflate()))`` over
  ``flwr.supercore.inflatable.inflatable_object.get_all_nested_objects(message)`` (Flower's own
  push loop deflates exactly these objects; headers, record names, metadata and metrics included);
* ``fp16_lora_bytes``: the payload fp16 LoRA of the same layers and rank would need
  (``2 * r * (in + out)`` per layer), so ratios can be quoted against the standard baseline.

A :class:`ByteLedger` collects :class:`MessageBytes` records and writes one JSON-ready summary per
round: sum, mean and max per client for each direction, and the running totals.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

DIRECTIONS = ("down", "up")


def wire_bytes(message: Message) -> int:
    """Bytes Flower pushes for ``message``: every nested object's deflated content, each once."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def payload_bytes(message: Message) -> int:
    """Bytes of data the message carries: array contents and ``bytes`` config values."""
    return recorddict_bytes(message.content) if message.has_content() else 0


def recorddict_bytes(records) -> int:
    """Data bytes of a ``RecordDict`` (a message's content or a node's ``context.state``)."""
    total = 0
    for record in records.values():
        if isinstance(record, ArrayRecord):
            total += sum(len(arr.data) for arr in record.values())
        elif isinstance(record, ConfigRecord):
            for value in record.values():
                if isinstance(value, bytes):
                    total += len(value)
                elif isinstance(value, list):
                    total += sum(len(v) for v in value if isinstance(v, bytes))
    return total


def lora_fp16_bytes(shapes: Iterable[tuple[int, int]], rank: int) -> int:
    """Payload of fp16 LoRA factors ``A (r, in)`` + ``B (out, r)`` over layers of ``(in, out)`` shapes."""
    return sum(2 * rank * (n_in + n_out) for n_in, n_out in shapes)


@dataclass(frozen=True)
class MessageBytes:
    """Byte accounting of one message; every strategy (LoRDBA and the baselines) logs this record.

    Parameters
    ----------
    round : int
        Server round the message belongs to.
    direction : str
        ``"down"`` (server to client) or ``"up"`` (client to server).
    node_id : int
        The client's node id (destination for ``down``, source for ``up``).
    payload_bytes, wire_bytes, fp16_lora_bytes : int
        See the module docstring.
    method : str
        The method that produced the message (``"lordba"``, ``"lora-fedavg"``, ...).
    phase : str
        ``"train"`` or ``"evaluate"`` (the message type).
    """

    round: int
    direction: str
    node_id: int
    payload_bytes: int
    wire_bytes: int
    fp16_lora_bytes: int
    method: str = ""
    phase: str = "train"

    def __post_init__(self):
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}; got {self.direction!r}")
        for name in ("payload_bytes", "wire_bytes", "fp16_lora_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative; got {getattr(self, name)}")

    @classmethod
    def of(
        cls, message: Message, *, round: int, direction: str, node_id: int, fp16_lora_bytes: int, method: str = "",
        phase: str = "train",
    ) -> MessageBytes:
        """Measure ``message``."""
        return cls(
            round, direction, node_id, payload_bytes(message), wire_bytes(message), fp16_lora_bytes, method, phase
        )


def _stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {"sum": 0, "mean": 0.0, "max": 0, "count": 0}
    return {"sum": sum(values), "mean": sum(values) / len(values), "max": max(values), "count": len(values)}


@dataclass
class ByteLedger:
    """All :class:`MessageBytes` of a run, with per-round summaries and running totals."""

    records: list[MessageBytes] = field(default_factory=list)

    def add(self, record: MessageBytes) -> None:
        self.records.append(record)

    def round_summary(self, round: int, phase: str | None = "train") -> dict:
        """``{direction: {payload|wire|fp16_lora: {sum, mean, max, count}}, totals: ...}`` for one round.

        Per-round statistics cover messages of ``phase`` (None: all); ``totals`` are running sums of
        every message (all phases) up to and including ``round``.
        """
        out: dict = {"round": round}
        for direction in DIRECTIONS:
            recs = [
                r for r in self.records
                if r.round == round and r.direction == direction and (phase is None or r.phase == phase)
            ]
            out[direction] = {
                kind: _stats([getattr(r, f"{kind}_bytes") for r in recs]) for kind in ("payload", "wire", "fp16_lora")
            }
        out["totals"] = {
            f"{direction}_{kind}_bytes": sum(
                getattr(r, f"{kind}_bytes") for r in self.records if r.round <= round and r.direction == direction
            )
            for direction in DIRECTIONS
            for kind in ("payload", "wire", "fp16_lora")
        }
        return out

    def tier_summary(self, round: int, ranks: dict[int, int], phase: str = "train") -> dict[int, dict]:
        """Per adapter rank (heterogeneous devices): ``{rank: {clients, up_wire_mean, down_wire_mean,
        up_payload_mean, down_payload_mean}}`` over one round's ``phase`` messages; ``ranks`` maps node ids
        to the rank they train (nodes missing from it are left out)."""
        out: dict[int, dict] = {}
        for rank in sorted(set(ranks.values())):
            recs = [r for r in self.records if r.round == round and r.phase == phase and ranks.get(r.node_id) == rank]
            if not recs:
                continue
            row = {"clients": len({r.node_id for r in recs if r.direction == "up"})}
            for direction in DIRECTIONS:
                for kind in ("wire", "payload"):
                    row[f"{direction}_{kind}_mean"] = _stats([getattr(r, f"{kind}_bytes") for r in recs
                                                              if r.direction == direction])["mean"]
            out[rank] = row
        return out

    def write_jsonl(self, path: str | Path) -> None:
        """Every message record, one JSON object per line."""
        with Path(path).open("w") as f:
            for r in self.records:
                f.write(json.dumps(asdict(r)) + "\n")
