"""FLoRA (Wang et al., NeurIPS 2024): heterogeneous LoRA ranks aggregated by *stacking*.

Each round every sampled node trains a fresh LoRA at its own rank ``r_k`` (``A`` drawn like PEFT's,
``B = 0``; ``alpha`` scaled so ``alpha / r_k`` is the run's) on top of the global model, and replies
with its fp16 factors. The server does not average factors: it stacks them, ``A = [p_1 A_1; ...;
p_K A_K]`` and ``B = [B_1, ..., B_K]`` (``p_k`` the example weights), so ``B A = sum_k p_k B_k A_k``
is the weighted mean of the clients' products exactly, whatever their ranks. The stack is merged into
the global model (the paper merges it into the float base weights and re-initializes the LoRA).

Here the base is quantized, so merging into it would re-quantize; instead every party keeps the
merged update as a frozen low-rank term beside the base (a forward hook on each LoRA layer adds
``x Aᵀ Bᵀ`` for the concatenated stacks of all rounds). It is the same function as a float merge. Its
rank grows by the sampled ranks every round, and so does what a node must download:

* **downlink**: the stacks of the rounds since the version the node holds (its ``context.state``
  keeps the stacks it has; a node with no known version gets them all), one ``LORA`` frame of kind
  ``STACK`` (its reserved field is the version it builds on). Nothing is averaged away, so nothing
  can be sent once and truncated: this is FLoRA's price, metered like every other byte.
* **uplink**: the fresh fp16 factors at the node's rank, like ``lora-hetlora``; a reply of another
  rank is rejected.
* **export**: the merged update as a PEFT LoRA of rank ``K`` (all stacked components, ``alpha = K``).

The stack payload: ``u32 groups``, then per group ``u32 version, u16 rank, u16 0, f32 weight``
(``weight`` already times ``alpha / r``), then the groups' fp16 values in the flat LoRA layout of
:mod:`lordba_fl.methods.lora` at their ranks. The merged factors are computed by one function from
those bytes on every party, so a node's model is the server's bit for bit.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from lordba_fl.errors import MalformedFrameError, NonFiniteError
from lordba_fl.methods.lora.frame import (
    FP16,
    LORA_CONTAINER,
    decode_lora,
    encode_lora,
    fp16_values,
    note_version,
    save_peft_factors,
)
from lordba_fl.methods.lora.hetero import HeteroRankLoRA
from lordba_fl.methods.lora.method import lora_layers, lora_modules
from lordba_fl.registry import ATTACKS
from lordba_fl.train import train_local
from lordba_fl.wire.replies import Bound

_STACK = 2  # LORA frame kind: stacked groups since a base version
_GROUP = struct.Struct("<IHHf")  # version, rank, 0, weight (times the LoRA scaling)
HELD_KEY = "flora.held"  # context.state: the stack frame of every group this node holds (base version 0)


class StaleBaseError(ValueError):
    """A stack frame builds on a version this node does not hold (its state was lost or is newer)."""


@dataclass(frozen=True)
class Group:
    """One client's contribution to one round's stack."""

    version: int  # the global version this stack made
    rank: int
    weight: float  # p_k * alpha / r (fp32)
    values: np.ndarray  # fp16 flat LoRA factors at ``rank`` (A rows, then Bᵀ rows, per layer)


def encode_stack(groups: list[Group], server_round: int, version: int, base: int) -> bytes:
    table = b"".join(_GROUP.pack(g.version, g.rank, 0, g.weight) for g in groups)
    size = 4 + len(table) + sum(g.values.nbytes for g in groups)
    if size > 0xFFFFFFFF:
        raise ValueError(f"the FLoRA stacks since version {base} are {size:,} bytes, past the 4 GiB one frame carries; "
                         "run fewer rounds or sample fewer clients per round (the stack grows with both)")
    payload = struct.pack("<I", len(groups)) + table + b"".join(g.values.tobytes() for g in groups)
    return encode_lora(_STACK, 0, server_round, version, payload, compress=False, reserved=base)


def decode_stack(frame: bytes, sizes) -> tuple[int, int, list[Group]]:
    """(base version, version, groups) of a stack frame; ``sizes(rank)`` is the number of fp16 values
    of a rank-``rank`` group in the receiver's layout. Every size, rank, weight and value is checked."""
    (kind, bits, _, version, base, raw_len, comp_len), _ = LORA_CONTAINER.open(frame)
    if kind != _STACK or comp_len or bits:
        raise MalformedFrameError(f"LoRA frame kind {kind} is not a FLoRA stack (lora-flora sends kind {_STACK})")
    body = memoryview(frame)[LORA_CONTAINER.header_bytes :]
    if raw_len < 4:
        raise MalformedFrameError(f"FLoRA stack of {raw_len} bytes has no group count")
    (n,) = struct.unpack_from("<I", body, 0)
    if 4 + n * _GROUP.size > raw_len:
        raise MalformedFrameError(f"FLoRA stack declares {n} groups; its {raw_len} bytes cannot hold their table")
    if base > version:
        raise MalformedFrameError(f"FLoRA stack builds on version {base}, past its own version {version}")
    if version - base > n:  # each version has a group: bounds the version range by the table's size
        raise MalformedFrameError(f"FLoRA stack covers versions {base + 1}..{version} with only {n} groups")
    groups, pos = [], 4 + n * _GROUP.size
    for i in range(n):
        v, rank, pad, weight = _GROUP.unpack_from(body, 4 + i * _GROUP.size)
        if not base < v <= version or (groups and v < groups[-1].version) or pad:
            raise MalformedFrameError(f"FLoRA stack group {i} is of version {v}; the frame covers {base + 1}..{version} "
                                      "in order")
        if rank < 1 or not math.isfinite(weight) or weight <= 0:
            raise MalformedFrameError(f"FLoRA stack group {i} has rank {rank} and weight {weight}; ranks are >= 1, "
                                      "weights finite and > 0")
        size = 2 * sizes(rank)
        if pos + size > raw_len:
            raise MalformedFrameError(f"FLoRA stack group {i} (rank {rank}) needs {size} bytes past byte {pos}; "
                                     f"the payload has {raw_len}: another model's layers?")
        groups.append(Group(v, rank, weight, np.frombuffer(body[pos : pos + size], np.float16)))
        pos += size
    if pos != raw_len:
        raise MalformedFrameError(f"FLoRA stack payload has {raw_len} bytes; its {n} groups fill {pos}")
    if {g.version for g in groups} != set(range(base + 1, version + 1)):
        raise MalformedFrameError(f"FLoRA stack from version {base} to {version} lacks a group of some version")
    for i, g in enumerate(groups):
        if not np.isfinite(g.values).all():
            raise NonFiniteError(f"FLoRA stack group {i} carries NaN or Inf values")
    return base, version, groups


def _merged_hook(module: nn.Module, args, output):
    merged = getattr(module, "_flora_merged", None)
    if merged is None:
        return output
    a, b = merged
    x = args[0]
    return output + F.linear(F.linear(x.to(a.dtype), a), b).to(output.dtype)


def install_merged_(model: nn.Module, factors) -> None:
    """Make every LoRA layer of ``model`` add its merged update (``factors`` from :meth:`FLoRA.merged`,
    ``None``: none) to its output; the hook is registered once per layer."""
    for i, (_, m) in enumerate(lora_modules(model)):
        if not getattr(m, "_flora_hooked", False):
            m.register_forward_hook(_merged_hook)
            m._flora_hooked = True
        if factors is None:
            m._flora_merged = None
        else:
            dev = m.lora_A["default"].weight.device
            m._flora_merged = (factors[i][0].to(dev), factors[i][1].to(dev))


class FLoRA(HeteroRankLoRA):
    """``lora-flora``: stacked heterogeneous LoRA, merged into the global model every round."""

    name = "lora-flora"
    reply_metrics = {"merged_rank": Bound(0, 2.0**32, integer=True)}

    def __init__(self, cfg):
        super().__init__(cfg)
        self.groups: list[Group] = []
        self.node_versions: dict[int, int] = {}

    @property
    def scaling(self) -> float:
        return self.cfg.alpha / self.cfg.rank

    def group_size(self, rank: int) -> int:
        return int(self.segments_at(rank).sum())

    def merged(self, groups: list[Group] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Per layer ``(A (K, in), B (out, K))`` in fp32 with ``B A = sum_g weight_g B_g A_g`` (the merged
        update, scaling included) of ``groups`` (default: the server's); ``None`` when nothing is stacked."""
        groups = self.groups if groups is None else groups
        if not groups:
            return None
        per_group = [(self.split(torch.from_numpy(g.values.astype(np.float32)), g.rank), g.weight) for g in groups]
        return [(torch.cat([layers[i][0] * w for layers, w in per_group]),
                 torch.cat([layers[i][1].t() for layers, _ in per_group], dim=1)) for i in range(len(self.layers_shapes))]

    @torch.no_grad()
    def _fresh_lora_(self, model, seed: int | None) -> None:
        """PEFT's LoRA init at this node's rank (``A`` Kaiming-uniform, ``B = 0``): a zero update."""
        with torch.random.fork_rng():
            torch.manual_seed(self.cfg.seed if seed is None else seed)
            for _, a, b in lora_layers(model):
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                b.zero_()

    # ---- server ---------------------------------------------------------------------------------
    def init_server(self, model) -> None:
        super().init_server(model)
        self.groups, self.node_versions = [], {}

    def note_held(self, node_id: int, version: int | None) -> None:
        note_version(self.node_versions, node_id, version, self._version)

    def downlink(self, node_id: int, server_round: int) -> bytes:
        base = self.node_versions.get(node_id, 0)
        return encode_stack([g for g in self.groups if g.version > base], server_round, self._version, base)

    def combine(self, accepted: list) -> torch.Tensor:
        total = sum(r.weight for r, _ in accepted)
        version = self._version + 1
        for reply, values in accepted:
            weight = float(np.float32(reply.weight / total * self.scaling))
            self.groups.append(Group(version, self.rank_of(reply.node_id), weight, values.numpy().astype(np.float16)))
        return self.global_values  # the LoRA itself stays at its init: the update lives in the stacks

    def load_global_(self, model) -> None:
        self._fresh_lora_(model, None)
        install_merged_(model, self.merged())

    def export(self, model, folder: Path) -> None:
        """The merged update as a PEFT LoRA of rank K = every stacked component (``alpha = K``: the
        weights and scaling are folded into ``A``)."""
        merged = self.merged()
        if merged is None:
            return super().export(model, folder)
        save_peft_factors(folder / "peft_lora", [n for n, _ in lora_modules(model)], merged, alpha=merged[0][0].shape[0])

    def server_state(self):
        tensors, meta = super().server_state()
        for i, g in enumerate(self.groups):
            tensors[f"group.{i}"] = torch.from_numpy(g.values.copy())
        meta = {**meta, "groups": [[g.version, g.rank, g.weight] for g in self.groups],
                "node_versions": {str(k): v for k, v in self.node_versions.items()}}
        return tensors, meta

    def load_server_state(self, tensors, meta) -> None:
        super().load_server_state(tensors, meta)
        self.groups = [Group(int(v), int(r), float(w), tensors[f"group.{i}"].numpy().astype(np.float16))
                       for i, (v, r, w) in enumerate(meta.get("groups", []))]
        self.node_versions = {int(k): int(v) for k, v in meta.get("node_versions", {}).items()}

    # ---- client ---------------------------------------------------------------------------------
    def _receive(self, frame: bytes, state) -> tuple[int, list[Group]]:
        """The groups this node holds after ``frame`` (its earlier ones from ``state``, then the new)."""
        base, version, new = decode_stack(frame, self.group_size)
        held: list[Group] = []
        if base:
            if state is None or HELD_KEY not in state:
                raise StaleBaseError(f"the FLoRA stack builds on version {base}; this node holds none (state lost): "
                                     "it gets every stack next round")
            _, held_version, held = decode_stack(state[HELD_KEY]["frame"], self.group_size)
            if held_version != base:
                raise StaleBaseError(f"the FLoRA stack builds on version {base}; this node holds {held_version}")
        groups = held + new
        if state is not None:
            from flwr.app import ConfigRecord

            state[HELD_KEY] = ConfigRecord({"frame": encode_stack(groups, 0, version, 0)})
        return version, groups

    def _load(self, model, frame: bytes, state, seed: int | None) -> tuple[int, list[Group]]:
        """The global model from ``frame`` (and the stacks ``state`` holds) with a fresh zero LoRA."""
        version, groups = self._receive(frame, state)
        self._fresh_lora_(model, seed)
        install_merged_(model, self.merged(groups))
        return version, groups

    def client_load_(self, model, frame: bytes, state) -> int:
        return self._load(model, frame, state, None)[0]

    def client_train(self, model, tok, frame, state, examples, server_round, seed):
        version, groups = self._load(model, frame, state, seed)
        params = []
        for _, a, b in lora_layers(model):
            a.requires_grad_(True)
            b.requires_grad_(True)
            params += [a, b]
        metrics = train_local(model, [{"params": params, "lr": self.cfg.lr}], tok, examples, self.cfg.train, seed)
        payload = self.read_values(model).numpy().astype(np.float16)
        if not np.isfinite(payload).all():
            raise ValueError("the trained LoRA factors overflow fp16; lower the learning rate")
        metrics["held_version"] = float(version)
        metrics["merged_rank"] = float(sum(g.rank for g in groups))
        return encode_lora(FP16, 0, server_round, version, payload.tobytes(), compress=False), metrics

    def attack(self, uplink: bytes, downlink: bytes, attack: str) -> bytes:
        """The attack's ``factors`` form (:mod:`lordba_fl.attacks`) on the fresh factors (their product
        is the update), clipped to fp16."""
        form = ATTACKS.get(attack).form("factors", attack)
        _, _, rnd, version, raw = decode_lora(uplink, self.segments, (FP16,))
        parts = []
        for a, bt in self.split(torch.from_numpy(fp16_values(raw).copy()), self.cfg.rank):
            a, bt = form(a, bt)
            parts += [a.reshape(-1), bt.reshape(-1)]
        out = np.clip(torch.cat(parts).numpy(), -65504, 65504).astype(np.float16)
        return encode_lora(FP16, 0, rnd, version, out.tobytes(), compress=False)
