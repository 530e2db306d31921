"""``fedkseed``: FedKSeed (Qin et al. 2024, arXiv 2312.06353), zeroth-order steps on shared seeds.

Every party draws the same pool of ``K`` seeds (:data:`K_SEEDS`, from the run's seed). A client
step picks a seed ``s`` uniformly, perturbs the trainable values ``θ`` along ``z(s) ~ N(0, I)`` and
takes the two-point estimate of the directional derivative (MeZO),

    g = (L(θ + ε z) - L(θ - ε z)) / (2 ε),        θ <- θ - lr g z,

so its whole round is the list of ``(seed index, g)`` pairs: the uplink. The server adds the
example-weighted mean of each seed's accumulated ``g`` to a global coefficient per seed, and the
model is ``θ_t = θ_0 - lr Σ_k c_k z(s_k)``: what a client needs is the coefficients that changed
since the version it holds (one group per version, applied in order, so every party computes
bit-identical values), kept with its values in its ``context.state``.

Here the trainable values are the PEFT LoRA factors on the frozen quantized base (the authors
perturb every weight of a full-precision model, which a quantized base does not allow; their code
perturbs whatever requires grad, so this is the same algorithm on fewer values). Defaults follow
the authors' ``main.py``: ``K = 4096``, ``ε = 5e-4``, uniform seed sampling (not FedKSeed-Pro's
probability-weighted sampling). ``lr`` is the run's: a zeroth-order step needs a far smaller one
than Adam on the same values.
"""

from __future__ import annotations

import struct

import numpy as np
import torch
from torch import nn

from lordba_fl.methods.lora import LORA_CONTAINER, LoRAFedAvg, encode_lora, note_version
from lordba_fl.registry import ATTACKS
from lordba_fl.train import batch_to, collate, encode_examples, micro_batches, model_device, pad_id_of
from lordba_fl.errors import MalformedFrameError, NonFiniteError

K_SEEDS = 4096
EPS = 5e-4
_PAIRS, _GROUPS = 4, 5  # LORA frame kinds: an uplink of (seed index, g) pairs; a downlink of version groups
_PAIR = struct.Struct("<If")  # seed index, accumulated g
_GROUP = struct.Struct("<II")  # version, pairs in it
STATE_KEY = "fedkseed.held"  # context.state: this node's values (fp32) and their version


class StaleSeedsError(ValueError):
    """A downlink builds on a version this node does not hold (its state was lost or is newer)."""


def seed_pool(seed: int, k: int = K_SEEDS) -> np.ndarray:
    """The ``k`` shared seeds of a run (every party draws the same)."""
    return np.random.default_rng([seed, 0x5EED]).integers(1, 2**62, k, dtype=np.int64)


def direction(seed: int, n: int) -> torch.Tensor:
    """``z(seed)``: ``n`` standard normal values from torch's CPU generator, the same on every party."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(n, generator=g)


def encode_pairs(pairs: dict[int, float], server_round: int, version: int) -> bytes:
    payload = struct.pack("<I", len(pairs)) + b"".join(_PAIR.pack(i, g) for i, g in sorted(pairs.items()))
    return encode_lora(_PAIRS, 0, server_round, version, payload, compress=False)


def _read_pairs(body, pos: int, count: int, end: int, k: int) -> tuple[list[tuple[int, float]], int]:
    if pos + count * _PAIR.size > end:
        raise MalformedFrameError(f"FedKSeed frame declares {count} pairs past its {end} bytes")
    out = []
    for j in range(count):
        i, g = _PAIR.unpack_from(body, pos + j * _PAIR.size)
        if i >= k:
            raise MalformedFrameError(f"FedKSeed pair {j} names seed {i}; the pool has {k}")
        if not np.isfinite(g):
            raise NonFiniteError(f"FedKSeed pair {j} carries a non-finite coefficient {g}")
        out.append((i, g))
    return out, pos + count * _PAIR.size


def decode_pairs(frame: bytes, k: int = K_SEEDS, max_pairs: int | None = None) -> tuple[int, int, list[tuple[int, float]]]:
    """(round, version, pairs) of an uplink; every index and coefficient checked, indices distinct."""
    (kind, bits, rnd, version, reserved, raw_len, comp_len), _ = LORA_CONTAINER.open(frame)
    if kind != _PAIRS or bits or reserved or comp_len or raw_len < 4:
        raise MalformedFrameError(f"LoRA frame kind {kind} is not a FedKSeed uplink (kind {_PAIRS}, stored)")
    body = memoryview(frame)[LORA_CONTAINER.header_bytes :]
    (count,) = struct.unpack_from("<I", body, 0)
    if max_pairs is not None and count > max_pairs:
        raise MalformedFrameError(f"FedKSeed uplink has {count} pairs; a client takes at most {max_pairs} steps")
    pairs, pos = _read_pairs(body, 4, count, raw_len, k)
    if pos != raw_len or len({i for i, _ in pairs}) != count:
        raise MalformedFrameError("FedKSeed uplink has trailing bytes or a seed index twice")
    return rnd, version, pairs


def encode_groups(groups: list[tuple[int, list[tuple[int, float]]]], server_round: int, version: int, base: int) -> bytes:
    parts = [struct.pack("<I", len(groups))]
    for v, pairs in groups:
        parts.append(_GROUP.pack(v, len(pairs)))
        parts += [_PAIR.pack(i, g) for i, g in pairs]
    return encode_lora(_GROUPS, 0, server_round, version, b"".join(parts), compress=False, reserved=base)


def decode_groups(frame: bytes, k: int = K_SEEDS) -> tuple[int, int, list[tuple[int, list[tuple[int, float]]]]]:
    """(base version, version, [(version, pairs)]) of a downlink: versions base+1..version, in order."""
    (kind, bits, _, version, base, raw_len, comp_len), _ = LORA_CONTAINER.open(frame)
    if kind != _GROUPS or bits or comp_len or raw_len < 4:
        raise MalformedFrameError(f"LoRA frame kind {kind} is not a FedKSeed downlink (kind {_GROUPS}, stored)")
    if base > version or version - base > (raw_len - 4) // _GROUP.size:
        raise MalformedFrameError(f"FedKSeed downlink from version {base} to {version} cannot fit its {raw_len} bytes")
    body = memoryview(frame)[LORA_CONTAINER.header_bytes :]
    (n,) = struct.unpack_from("<I", body, 0)
    if n != version - base:
        raise MalformedFrameError(f"FedKSeed downlink from version {base} to {version} carries {n} groups")
    groups, pos = [], 4
    for j in range(n):
        if pos + _GROUP.size > raw_len:
            raise MalformedFrameError("FedKSeed downlink is cut inside its group table")
        v, count = _GROUP.unpack_from(body, pos)
        if v != base + 1 + j:
            raise MalformedFrameError(f"FedKSeed group {j} is of version {v}; expected {base + 1 + j}")
        pairs, pos = _read_pairs(body, pos + _GROUP.size, count, raw_len, k)
        groups.append((v, pairs))
    if pos != raw_len:
        raise MalformedFrameError("FedKSeed downlink has trailing bytes")
    return base, version, groups


class FedKSeed(LoRAFedAvg):
    name = "fedkseed"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.seeds = seed_pool(cfg.seed)
        self.init_values: torch.Tensor | None = None
        self.history: list[list[tuple[int, float]]] = []  # per version v >= 1: the coefficient changes
        self.node_versions: dict[int, int] = {}

    def adapt(self, model: nn.Module) -> nn.Module:
        model = super().adapt(model)
        self.init_values = self.read_values(model)  # θ_0: the seeded PEFT init, the same on every party
        return model

    def apply_(self, values: torch.Tensor, pairs: list[tuple[int, float]]) -> torch.Tensor:
        """``values - lr Σ c z(s)`` over ``pairs`` in order, in place (the same arithmetic on every party)."""
        for i, c in pairs:
            values.add_(direction(self.seeds[i], values.numel()), alpha=-self.cfg.lr * float(np.float32(c)))
        return values

    # ---- server ---------------------------------------------------------------------------------
    def init_server(self, model) -> None:
        super().init_server(model)
        self.history, self.node_versions = [], {}

    def note_held(self, node_id: int, version: int | None) -> None:
        note_version(self.node_versions, node_id, version, self._version)

    def downlink(self, node_id: int, server_round: int) -> bytes:
        base = self.node_versions.get(node_id, 0)
        groups = [(v, self.history[v - 1]) for v in range(base + 1, self._version + 1)]
        return encode_groups(groups, server_round, self._version, base)

    def decode_reply(self, reply) -> list[tuple[int, float]]:
        rnd, version, pairs = decode_pairs(reply.frame, len(self.seeds), self.cfg.train.steps)
        if version != self._version:
            raise ValueError(f"reply trained from version {version}; the server is at {self._version}")
        if self._round is not None and rnd != self._round:
            raise ValueError(f"frame of round {rnd} replayed in round {self._round}")
        return pairs

    def combine(self, accepted: list) -> torch.Tensor:
        total = sum(r.weight for r, _ in accepted)
        coef: dict[int, float] = {}
        for reply, pairs in accepted:
            for i, g in pairs:
                coef[i] = coef.get(i, 0.0) + reply.weight / total * g
        changes = [(i, float(np.float32(c))) for i, c in sorted(coef.items())]  # what the downlink carries
        self.history.append(changes)
        return self.apply_(self.global_values.clone(), changes)

    def server_state(self):
        tensors, meta = super().server_state()
        return tensors, {**meta, "history": self.history,
                         "node_versions": {str(k): v for k, v in self.node_versions.items()}}

    def load_server_state(self, tensors, meta) -> None:
        super().load_server_state(tensors, meta)
        self.history = [[(int(i), float(c)) for i, c in group] for group in meta["history"]]
        self.node_versions = {int(k): int(v) for k, v in meta.get("node_versions", {}).items()}

    # ---- client ---------------------------------------------------------------------------------
    def client_load_(self, model, frame: bytes, state) -> int:
        base, version, groups = decode_groups(frame, len(self.seeds))
        if base == 0:
            values = self.init_values.clone()
        else:
            if state is None or STATE_KEY not in state or int(state[STATE_KEY]["version"]) != base:
                held = "none" if state is None or STATE_KEY not in state else int(state[STATE_KEY]["version"])
                raise StaleSeedsError(f"the FedKSeed downlink builds on version {base}; this node holds {held}")
            values = torch.from_numpy(np.frombuffer(state[STATE_KEY]["values"], np.float32).copy())
        for _, pairs in groups:
            self.apply_(values, pairs)
        if state is not None:
            from flwr.app import ConfigRecord

            state[STATE_KEY] = ConfigRecord({"values": values.numpy().tobytes(), "version": version})
        self.write_values_(model, values)
        return version

    @torch.no_grad()
    def _loss(self, model, batch) -> float:
        return float(model(**batch).loss)

    @torch.no_grad()
    def client_train(self, model, tok, frame, state, examples, server_round, seed):
        version = self.client_load_(model, frame, state)
        values = self.read_values(model)
        n, cfg = values.numel(), self.cfg.train
        rng = np.random.default_rng([seed, 0x2E0])
        batches = micro_batches(encode_examples(tok, examples, cfg.seq_len), cfg, seed)
        pad, device = pad_id_of(tok), model_device(model)
        model.eval()
        coef: dict[int, float] = {}
        losses = []
        for _ in range(cfg.steps):
            batch = batch_to(collate(next(batches), pad), device)
            i = int(rng.integers(len(self.seeds)))
            z = direction(self.seeds[i], n)
            self.write_values_(model, values + EPS * z)
            plus = self._loss(model, batch)
            self.write_values_(model, values - EPS * z)
            minus = self._loss(model, batch)
            if not (np.isfinite(plus) and np.isfinite(minus)):
                continue  # as the authors: a step whose loss is not finite is skipped
            g = float(np.float32((plus - minus) / (2 * EPS)))
            values.add_(z, alpha=-self.cfg.lr * g)
            coef[i] = coef.get(i, 0.0) + g
            losses.append((plus + minus) / 2)
        self.write_values_(model, values)
        metrics = {"steps": float(cfg.steps), "held_version": float(version)}
        if losses:  # every step skipped (non-finite losses): no loss to report
            metrics["train_loss"] = float(np.mean(losses))
        return encode_pairs({i: float(np.float32(c)) for i, c in coef.items()}, server_round, version), metrics

    def attack(self, uplink: bytes, downlink: bytes, attack: str) -> bytes:
        """The attack's ``coefficient`` form (:mod:`lordba_fl.attacks`) on every seed's coefficient."""
        rnd, version, pairs = decode_pairs(uplink, len(self.seeds))
        form = ATTACKS.get(attack).form("coefficient", attack)
        return encode_pairs({i: float(np.float32(form(g))) for i, g in pairs}, rnd, version)
