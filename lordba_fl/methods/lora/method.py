"""LoRA baselines in the same harness: ``lora-fedavg``, ``ffa-lora``, ``lora-q2``, ``lora-q4``,
``lora-q2-both``.

All use PEFT LoRA (same targets, rank and alpha as LoRDBA) on the same frozen quantized base and the
same training loop; the adapter travels in the frames of :mod:`lordba_fl.methods.lora.frame`.

* ``lora-fedavg``: fp16 factors both ways, FedAvg of ``A`` and ``B``.
* ``ffa-lora``: ``A`` frozen at its (seeded, shared) init; only ``B`` trains and travels (fp16).
* ``lora-q2`` / ``lora-q4``: fp16 down; up, the update ``θ_k - θ`` quantized per channel to 2 / 4
  bits (min-max affine, fp16 offset and step per channel, stochastic rounding) + zstd; the server
  adds the weighted mean of the dequantized updates.
* ``lora-q2-both``: ``lora-q2`` with a 2-bit downlink too (versioned deltas, server-side error feedback).
"""

from __future__ import annotations

import math
import struct

import numpy as np
import torch
from torch import nn

from lordba_fl.adapter.config import LoRDBAConfig
from lordba_fl.adapter.storage import peft_lora_config
from lordba_fl.errors import MalformedFrameError
from lordba_fl.methods.base import Method
from lordba_fl.methods.lora.frame import (
    DELTAS, FP16, LORA_CONTAINER, QUANT, STATE_KEY, decode_lora, dequantize_channels, encode_lora, fp16_values,
    note_version, quantize_channels, raw_size,
)
from lordba_fl.registry import ATTACKS
from lordba_fl.train import train_local
from lordba_fl.wire.frame import bounded_inflate


def lora_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every PEFT LoRA layer (its ``default`` adapter), in module order."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(getattr(m, "lora_A", None), nn.ModuleDict) and "default" in m.lora_A]


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
    """``(name, A (r, in), B (out, r))`` of every PEFT LoRA layer, in module order."""
    return [(name, m.lora_A["default"].weight, m.lora_B["default"].weight) for name, m in lora_modules(model)]


class LoRAFedAvg(Method):
    name = "lora-fedavg"
    train_a = True  # ffa-lora freezes A
    bits = 0  # 0: fp16 up; 2 / 4: quantized updates

    def __init__(self, cfg):
        super().__init__(cfg)
        self.global_values: torch.Tensor | None = None
        self._version = 0
        self._round: int | None = None  # the round being aggregated: its replies must carry it

    # ---- layout ---------------------------------------------------------------------------------
    def adapt(self, model: nn.Module) -> nn.Module:
        from peft import get_peft_model

        targets = list(LoRDBAConfig().target_modules)
        cfg = peft_lora_config(r=self.cfg.rank, lora_alpha=self.cfg.alpha, target_modules=targets, lora_dropout=0.0)
        with torch.random.fork_rng():
            torch.manual_seed(self.cfg.seed)  # every party builds the same initial A
            model = get_peft_model(model, cfg)
        model.eval()
        self.layers_shapes = [(n, a.shape[1], b.shape[0]) for n, a, b in lora_layers(model)]
        self.segments = self.segments_at(self.cfg.rank)
        return model

    def segments_at(self, rank: int) -> np.ndarray:
        """Channel lengths of the flat layout at ``rank``: per layer ``rank`` rows of ``A`` (if it
        travels), then ``rank`` rows of ``Bᵀ``."""
        seg = []
        for _, n_in, n_out in self.layers_shapes:
            seg += ([n_in] * rank if self.train_a else []) + [n_out] * rank
        return np.array(seg, dtype=np.int64)

    def fp16_lora_bytes(self) -> int:
        return 2 * self.cfg.rank * sum(i + o for _, i, o in self.layers_shapes)

    def read_values(self, model) -> torch.Tensor:
        parts = []
        for _, a, b in lora_layers(model):
            if self.train_a:
                parts.append(a.detach().reshape(-1))
            parts.append(b.detach().t().reshape(-1))  # Bᵀ: (r, out)
        return torch.cat(parts).float().cpu()

    @torch.no_grad()
    def write_values_(self, model, values: torch.Tensor) -> None:
        pos = 0
        for _, a, b in lora_layers(model):
            if self.train_a:
                a.copy_(values[pos : pos + a.numel()].view_as(a))
                pos += a.numel()
            bt = values[pos : pos + b.numel()].view(b.shape[1], b.shape[0])  # (r, out)
            b.copy_(bt.t())
            pos += b.numel()

    # ---- server ---------------------------------------------------------------------------------
    def init_server(self, model) -> None:
        self.global_values = self.read_values(model)
        self._version = 0

    @property
    def version(self) -> int:
        return self._version

    def _full_frame(self, server_round: int) -> bytes:
        payload = self.global_values.numpy().astype(np.float16)
        if not np.isfinite(payload).all():
            raise ValueError("global LoRA state overflows fp16")
        return encode_lora(FP16, 0, server_round, self._version, payload.tobytes(), compress=False)

    def downlink(self, node_id: int, server_round: int) -> bytes:
        return self._full_frame(server_round)

    def aggregate(self, server_round: int, replies) -> dict:
        self._round = server_round  # replies must be frames of this round (a replayed frame is refused)
        accepted, rejected = [], []
        for r in replies:
            try:
                accepted.append((r, self.decode_reply(r)))
            except (ValueError,) as e:  # CodecError is a ValueError
                rejected.append((r.node_id, f"{type(e).__name__}: {e}"))
        metrics = {"rejected": float(len(rejected)), "accepted": float(len(accepted))}
        if not accepted:
            return metrics, rejected
        if not math.isfinite(math.fsum(r.weight for r, _ in accepted)) or any(not r.weight > 0 for r, _ in accepted):
            # the strategy checks every weight; a direct caller may not: never divide by a bad total
            return {**metrics, "accepted": 0.0, "aggregate_refused": 1.0}, rejected + [
                (r.node_id, f"weight {r.weight!r} is not a positive finite number") for r, _ in accepted]
        new = self.combine(accepted)
        if not bool(torch.isfinite(new).all()) or not bool((new.abs() <= 65504).all()):
            # an aggregate no client can receive in fp16: keep the current state
            metrics["aggregate_refused"] = 1.0
            return metrics, rejected
        self.global_values = new
        self._version += 1
        return metrics, rejected

    def decode_reply(self, reply) -> torch.Tensor:
        """A reply's flat values (fp16 methods) or update (quantized ones); raises on a bad frame."""
        return self._decode_reply(reply.frame)

    def combine(self, accepted: list) -> torch.Tensor:
        """The new global values from ``[(reply, decoded values)]``: the example-weighted mean (FedAvg;
        quantized methods add the mean update to the current values)."""
        total = sum(r.weight for r, _ in accepted)
        mean = sum(r.weight * v for r, v in accepted) / total
        return self.global_values + mean if self.bits else mean

    def _decode_reply(self, frame: bytes, segments: np.ndarray | None = None) -> torch.Tensor:
        segments = self.segments if segments is None else segments
        if self.bits:
            _, bits, rnd, version, raw = decode_lora(frame, segments, (QUANT,))
            if bits != self.bits:
                raise MalformedFrameError(f"update quantized to {bits} bits; this run uses {self.bits}")
            values = dequantize_channels(raw, segments, bits)
        else:
            _, _, rnd, version, raw = decode_lora(frame, segments, (FP16,))
            values = fp16_values(raw)
        if version != self._version:
            raise ValueError(f"reply trained from version {version}; the server is at {self._version}")
        if self._round is not None and rnd != self._round:
            raise ValueError(f"frame of round {rnd} replayed in round {self._round}")
        return torch.from_numpy(values.copy())

    def load_global_(self, model) -> None:
        self.write_values_(model, self.global_values)

    def server_state(self):
        return {"values": self.global_values}, {"version": self._version}

    def load_server_state(self, tensors, meta) -> None:
        self.global_values = tensors["values"].clone()
        self._version = int(meta["version"])

    # ---- client ---------------------------------------------------------------------------------
    def client_load_(self, model, frame: bytes, state) -> int:
        _, _, _, version, raw = decode_lora(frame, self.segments, (FP16,))
        self.write_values_(model, torch.from_numpy(fp16_values(raw)))
        return version

    def client_train(self, model, tok, frame, state, examples, server_round, seed):
        version = self.client_load_(model, frame, state)
        start = self.read_values(model)
        params = []
        for _, a, b in lora_layers(model):
            a.requires_grad_(self.train_a)
            b.requires_grad_(True)
            params += ([a] if self.train_a else []) + [b]
        metrics = train_local(model, [{"params": params, "lr": self.cfg.lr}], tok, examples, self.cfg.train, seed)
        trained = self.read_values(model)
        if self.bits:
            delta = (trained - start).numpy()
            payload = quantize_channels(delta, self.segments, self.bits, np.random.default_rng(seed))
            frame_up = encode_lora(QUANT, self.bits, server_round, version, payload, compress=True, level=self.cfg.codec_level)
        else:
            payload = trained.numpy().astype(np.float16)
            frame_up = encode_lora(FP16, 0, server_round, version, payload.tobytes(), compress=False)
        metrics["held_version"] = float(version)
        return frame_up, metrics

    def attack(self, uplink: bytes, downlink: bytes, attack: str) -> bytes:
        """The attack's ``update`` form (:mod:`lordba_fl.attacks`) on the client's update ``trained - start``."""
        start = fp16_values(decode_lora(downlink, self.segments, (FP16,))[4]).astype(np.float32)
        if self.bits:
            _, bits, rnd, version, raw = decode_lora(uplink, self.segments, (QUANT,))
            update = dequantize_channels(raw, self.segments, bits)
        else:
            _, _, rnd, version, raw = decode_lora(uplink, self.segments, (FP16,))
            update = fp16_values(raw).astype(np.float32) - start
        update = ATTACKS.get(attack).form("update", attack)(start, update)
        if self.bits:
            payload = quantize_channels(update, self.segments, self.bits, np.random.default_rng(0))
            return encode_lora(QUANT, self.bits, rnd, version, payload, compress=True, level=self.cfg.codec_level)
        values = np.clip(start + update, -65504, 65504).astype(np.float16)  # what fp16 can carry
        return encode_lora(FP16, 0, rnd, version, values.tobytes(), compress=False)


class FFALoRA(LoRAFedAvg):
    name = "ffa-lora"
    train_a = False  # A stays at its shared, seeded init everywhere; only B is in the flat layout


class LoRAQ2(LoRAFedAvg):
    name = "lora-q2"
    bits = 2


class LoRAQ4(LoRAFedAvg):
    name = "lora-q4"
    bits = 4


_DELTA_HEAD = struct.Struct("<II")  # version, payload bytes


class LoRAQ2Both(LoRAQ2):
    """``lora-q2`` with its downlink quantized too: the global state moves only by 2-bit deltas.

    Each round the server quantizes the mean update plus what earlier rounds' quantization lost
    (server-side error feedback, stochastic rounding) and adds the dequantized delta to the global
    values, so the state is exactly what a node rebuilds from the deltas. A node that holds version
    ``v`` downloads the deltas of ``v+1..t`` (one zstd-compressed frame); a node the server knows
    nothing of starts from the seeded version 0 every party builds (its deltas are the whole
    history); one more than :attr:`max_catchup` versions behind gets the fp16 state once (then it
    holds the state to fp16 precision, as ``lora-fedavg`` nodes do).
    """

    name = "lora-q2-both"
    max_catchup = 16  # versions of deltas kept; a node further behind gets the full state

    def __init__(self, cfg):
        super().__init__(cfg)
        self.history: dict[int, bytes] = {}
        self.node_versions: dict[int, int] = {}
        self.residual: torch.Tensor | None = None

    def adapt(self, model: nn.Module) -> nn.Module:
        model = super().adapt(model)
        self.init_values = self.read_values(model)  # version 0: the seeded init, the same on every party
        return model

    def init_server(self, model) -> None:
        super().init_server(model)
        self.history, self.node_versions = {}, {}
        self.residual = torch.zeros_like(self.global_values)

    def note_held(self, node_id: int, version: int | None) -> None:
        note_version(self.node_versions, node_id, version, self._version)

    def _delta_size(self) -> int:
        return raw_size(QUANT, self.bits, self.segments)

    def downlink(self, node_id: int, server_round: int) -> bytes:
        base = self.node_versions.get(node_id, 0)  # a node the server does not know holds version 0
        versions = range(base + 1, self._version + 1)
        if any(v not in self.history for v in versions):  # further behind than the deltas kept
            return self._full_frame(server_round)
        payload = b"".join(_DELTA_HEAD.pack(v, len(self.history[v])) + self.history[v] for v in versions)
        return encode_lora(DELTAS, self.bits, server_round, self._version, payload, compress=True, reserved=base, level=self.cfg.codec_level)

    def combine(self, accepted: list) -> torch.Tensor:
        total = sum(r.weight for r, _ in accepted)
        target = sum(r.weight * v for r, v in accepted) / total + self.residual
        rng = np.random.default_rng([self.cfg.seed, self._version + 1])
        raw = quantize_channels(target.numpy().astype(np.float32), self.segments, self.bits, rng)
        delta = torch.from_numpy(dequantize_channels(raw, self.segments, self.bits))
        self.residual = target - delta  # what this round's broadcast could not carry: next round's
        self.history[self._version + 1] = raw
        for v in [v for v in self.history if v <= self._version + 1 - self.max_catchup]:
            del self.history[v]
        return self.global_values + delta

    def server_state(self):
        tensors, meta = super().server_state()
        tensors["residual"] = self.residual
        for v, raw in self.history.items():
            tensors[f"delta_{v}"] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        return tensors, {**meta, "node_versions": {str(k): v for k, v in self.node_versions.items()}}

    def load_server_state(self, tensors, meta) -> None:
        super().load_server_state(tensors, meta)
        self.residual = tensors["residual"].clone()
        self.history = {int(k.split("_")[1]): bytes(t.numpy().tobytes()) for k, t in tensors.items()
                        if k.startswith("delta_")}
        self.node_versions = {int(k): int(v) for k, v in meta.get("node_versions", {}).items()}

    def client_load_(self, model, frame: bytes, state) -> int:
        (kind, bits, _, version, base, raw_len, comp_len), _ = LORA_CONTAINER.open(frame)
        if kind == FP16:
            version = super().client_load_(model, frame, state)
            values = self.read_values(model)
        elif kind == DELTAS and bits == self.bits:
            size = self._delta_size()
            count = version - base
            if not 0 <= count <= self.max_catchup or raw_len != count * (_DELTA_HEAD.size + size):
                raise MalformedFrameError(f"lora-q2-both downlink from version {base} to {version} declares {raw_len} "
                                          f"bytes; {count} deltas take {count * (_DELTA_HEAD.size + size)}")
            if base == 0:
                values = self.init_values.clone()
            elif state is None or STATE_KEY not in state or int(state[STATE_KEY]["version"]) != base:
                held = "none" if state is None or STATE_KEY not in state else int(state[STATE_KEY]["version"])
                raise ValueError(f"the lora-q2-both deltas build on version {base}; this node holds {held}: the server "
                                 "sends the full state after this error")
            else:
                values = torch.from_numpy(np.frombuffer(state[STATE_KEY]["values"], np.float32).copy())
            body = frame[LORA_CONTAINER.header_bytes :]
            raw = bounded_inflate(body, raw_len, raw_len, "lora-q2-both deltas") if comp_len else body
            pos = 0
            for j in range(count):
                v, n = _DELTA_HEAD.unpack_from(raw, pos)
                if v != base + 1 + j or n != size:
                    raise MalformedFrameError(f"lora-q2-both delta {j} is of version {v} and {n} bytes; expected "
                                              f"{base + 1 + j} and {size}")
                values = values + torch.from_numpy(dequantize_channels(raw[pos + _DELTA_HEAD.size : pos + _DELTA_HEAD.size + n],
                                                                       self.segments, self.bits))
                pos += _DELTA_HEAD.size + n
            self.write_values_(model, values)
        else:
            raise MalformedFrameError(f"LoRA frame kind {kind} / {bits} bits is not what lora-q2-both broadcasts")
        if state is not None:
            from flwr.app import ConfigRecord

            state[STATE_KEY] = ConfigRecord({"values": values.numpy().astype(np.float32).tobytes(), "version": version})
        return version
