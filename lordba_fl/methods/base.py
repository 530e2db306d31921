"""Federated methods: LoRDBA and the LoRA baselines, behind one interface and one registry.

A :class:`Method` knows how to adapt a frozen base model, what the server holds, how a client's
round turns the broadcast into a reply, and how the server aggregates replies. The Flower strategy
and apps (``lordba_fl.federation.strategy``, ``clients/``, ``server/``) only move its frames and count bytes,
so every method runs under the same harness and logs the same fields.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from lordba_fl.registry import METHODS
from lordba_fl.runconfig import RunConfig, settings_for
from lordba_fl.train import TrainConfig


@dataclass
class Reply:
    """One decoded-to-bytes client reply: who sent it, its frame and its weight (num-examples)."""

    node_id: int
    frame: bytes
    weight: float


@dataclass(frozen=True)
class MethodSettings:
    """What every method reads from a run: the adapter's rank and scaling (``alpha / rank``), the
    learning rate, the seed of its initial adapter and the local training loop. A method declares
    its own settings type (a subclass, :attr:`Method.settings_type`) and receives only that, never
    the whole run config: :func:`lordba_fl.runconfig.settings_for` picks its fields from the run
    config by name. A field declared ``option(default, "my.key", "help")`` is a run-config key of the
    method's own: parsed, checked (the settings' ``__post_init__``, when the run starts) and listed
    in the configuration page like the core's."""

    rank: int
    alpha: float
    lr: float
    seed: int
    train: TrainConfig
    codec_level: int  # zstd level of compressed frames (codec.level)


class Method(ABC):
    """Interface every federated method implements (see the module docstring)."""

    name: str = ""
    settings_type: type = MethodSettings
    # True: nodes may train lower ranks than the run's (hetero.tiers, a node's ``rank``), each served
    # a nested adapter; the method keeps ``node_ranks`` ({node id: rank}) from :meth:`note_rank`
    nested_ranks: bool = False
    # reply metrics this method's clients send besides the common ones (lordba_fl.wire.replies.REPLY_METRICS):
    # name -> accepted values; the server refuses a reply with any other key
    reply_metrics: dict = {}
    # model runtimes (``model-runtime``) the method's adapter works on: the lean runtime has no PEFT
    runtimes: tuple[str, ...] = ("transformers",)

    def __init__(self, cfg):
        self.cfg = cfg  # an instance of settings_type

    @property
    def private_replies(self) -> bool:
        """True when this method's clients privatize their updates (local DP): their replies then carry
        no data-dependent metric and count as one example each."""
        return False

    @classmethod
    def folder_suffix(cls, cfg) -> str:
        """What a run's default folder name adds after the method (``cfg``: this method's settings)."""
        return ""

    # ---- model ----------------------------------------------------------------------------------
    @abstractmethod
    def adapt(self, model: nn.Module) -> nn.Module:
        """Attach this method's adapter to a frozen base (deterministic given ``cfg.seed``)."""

    @abstractmethod
    def fp16_lora_bytes(self) -> int:
        """Payload of fp16 LoRA factors of the same layers and rank (the byte baseline)."""

    # ---- server ---------------------------------------------------------------------------------
    def init_from_data(self, model: nn.Module, tok, task) -> None:
        """Server side, before :meth:`init_server`: a method whose initial adapter depends on training
        data (Fed-SB's gradient basis) computes it here from ``task``; the default uses none."""

    @abstractmethod
    def init_server(self, model: nn.Module) -> None:
        """Initial global state from an adapted model."""

    @abstractmethod
    def downlink(self, node_id: int, server_round: int) -> bytes:
        """The frame that brings ``node_id`` to the current global state."""

    def note_held(self, node_id: int, version: int | None) -> None:
        """A node reported holding ``version`` (None: unknown, e.g. after an error reply)."""

    def note_rank(self, node_id: int, rank: int) -> None:
        """A node declared the adapter rank it trains; a method without nested ranks refuses another rank."""
        if rank != self.cfg.rank:
            raise ValueError(f"node {node_id} trains rank {rank}; method {self.name!r} serves rank {self.cfg.rank} only")

    @abstractmethod
    def aggregate(self, server_round: int, replies: Sequence[Reply]) -> tuple[dict, list[tuple[int, str]]]:
        """Aggregate training replies into a new global state; returns (metrics incl. ``accepted`` and
        ``rejected`` counts, the rejected replies as ``(node_id, reason)``). A rejected reply changes nothing."""

    @abstractmethod
    def load_global_(self, model: nn.Module) -> None:
        """Put the current global adapter into an adapted model (server-side eval, export)."""

    def export(self, model: nn.Module, folder: Path) -> None:
        """Write the final global adapter (already loaded into ``model``) under ``folder``: a PEFT LoRA
        directory ``peft_lora/`` by default."""
        model.save_pretrained(str(folder / "peft_lora"))

    @abstractmethod
    def server_state(self) -> tuple[dict, dict]:
        """(tensors, json-able metadata) of the full server state, for checkpoints."""

    @abstractmethod
    def load_server_state(self, tensors: dict, meta: dict) -> None:
        """Inverse of :meth:`server_state`."""

    @property
    @abstractmethod
    def version(self) -> int:
        """Version of the global state."""

    # ---- client ---------------------------------------------------------------------------------
    @abstractmethod
    def client_load_(self, model: nn.Module, frame: bytes, state) -> int:
        """Load the broadcast into the adapted model (``state``: the node's ``context.state``); returns its version."""

    @abstractmethod
    def client_train(self, model: nn.Module, tok, frame: bytes, state, examples, server_round: int, seed: int) -> tuple[bytes, dict]:
        """One client round: load the broadcast, train locally, return (reply frame, metrics)."""

    def attack(self, uplink: bytes, downlink: bytes, attack: str) -> bytes:
        """What a byzantine client sends instead of ``uplink`` (``faults.attack``: ``invert-flips``,
        ``flip-all`` or ``explode-scales``; ``replay`` is method-independent, in :mod:`lordba_fl.federation.faults`)."""
        raise NotImplementedError(f"method {self.name!r} has no byzantine attacks")


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` selectable as ``method = cls.name`` (its module must be imported
    before the run starts; an import path ``method = "pkg.module:Class"`` needs no registration)."""
    METHODS.register(cls.name, cls)
    return cls


def make_method(cfg: RunConfig) -> Method:
    """The method ``cfg.method`` names (a registered name or an import path), built on its own settings."""
    cls = METHODS.get(cfg.method)
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ValueError(f"method {cfg.method!r} is {cls!r}, not a subclass of lordba_fl.methods.Method")
    return cls(settings_for(cls.settings_type, cfg))
