"""The flat layout of a LoRDBA adapter's federated state, and moving it in and out of a model.

Everything the protocol moves (sign carriers, flip masks, scales, scale deltas) is one flat tensor
per kind, laid out by an :class:`AdapterSpec`:

* **carrier stream** (``n_bits`` entries): for each adapted layer in table order, ``A`` (``(r, in)``,
  row-major) then ``B`` (``(out, r)``, row-major). A sign state is the boolean mask of its ``-1``
  entries (``sign(0) = +1``); a flip mask is a boolean tensor of the same layout.
* **scale stream** (``n_scales`` entries): for each layer, its ``in`` (``in``), ``mid`` (``r``) and
  ``out`` (``out``) scales, in that order, restricted to the configured scale set.

Flat streams make aggregation a handful of vectorized operations over all layers at once and let the
codec work on one buffer per kind. :func:`split_carriers` / :func:`split_scales` give per-layer views.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from lordba_fl.adapter.config import SCALE_NAMES, LoRDBAConfig
from lordba_fl.adapter.layer import (
    LoRDBALinear,
    initial_scale_values,
    lordba_layers,
    scratch_latents,
)
from lordba_fl.adapter.storage import base_fingerprint

UNVERSIONED = 0xFFFFFFFF  # "no version" on the wire (u32)


@dataclass(frozen=True)
class LayerSpec:
    """One adapted linear layer: its module name and shapes."""

    name: str
    in_features: int
    out_features: int
    rank: int

    def scale_size(self, kind: str) -> int:
        return {"in": self.in_features, "mid": self.rank, "out": self.out_features}[kind]

    @property
    def n_bits(self) -> int:
        return self.rank * (self.in_features + self.out_features)


@dataclass(frozen=True)
class AdapterSpec:
    """Layer table, scale set and model fingerprint shared by every party of a federation.

    Parameters
    ----------
    layers : tuple of LayerSpec
        Adapted layers in wire order (module order of the model).
    scales : tuple of str
        Trained scales, a subset of ``("in", "mid", "out")`` in that order.
    fingerprint : bytes
        16 bytes identifying the base model and adapter scaling; frames for another model are refused.
    """

    layers: tuple[LayerSpec, ...]
    scales: tuple[str, ...]
    fingerprint: bytes
    carrier_offsets: np.ndarray = field(init=False, repr=False, compare=False)  # (L + 1,) into the carrier stream
    scale_offsets: np.ndarray = field(init=False, repr=False, compare=False)  # (L + 1,) into the scale stream
    scale_segments: np.ndarray = field(init=False, repr=False, compare=False)  # (L * len(scales),) lengths
    _table: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if not self.layers:
            raise ValueError("an AdapterSpec needs at least one layer; attach LoRDBA adapters to the model first")
        if len(self.fingerprint) != 16:
            raise ValueError(f"fingerprint must be 16 bytes; got {len(self.fingerprint)}")
        bad = [s for s in self.scales if s not in SCALE_NAMES]
        if bad or not self.scales or tuple(s for s in SCALE_NAMES if s in self.scales) != tuple(self.scales):
            raise ValueError(f"scales must be a non-empty ordered subset of {SCALE_NAMES}; got {self.scales!r}")
        names = [layer.name for layer in self.layers]
        if len(set(names)) != len(names):
            raise ValueError("layer names in an AdapterSpec must be unique")
        for layer in self.layers:
            if min(layer.in_features, layer.out_features, layer.rank) < 1 or not layer.name:
                raise ValueError(f"invalid layer {layer}: names must be non-empty and sizes positive")
        seg = np.array([layer.scale_size(k) for layer in self.layers for k in self.scales], dtype=np.int64)
        bits = np.array([0] + [layer.n_bits for layer in self.layers], dtype=np.int64)
        per_layer = seg.reshape(len(self.layers), len(self.scales)).sum(axis=1)
        object.__setattr__(self, "carrier_offsets", np.cumsum(bits))
        object.__setattr__(self, "scale_offsets", np.concatenate([[0], np.cumsum(per_layer)]))
        object.__setattr__(self, "scale_segments", seg)
        object.__setattr__(self, "_table", self._build_table())

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: nn.Module) -> AdapterSpec:
        """The spec of a model with LoRDBA adapters attached (``attach_lordba_`` or ``load_lordba_``)."""

        layers = lordba_layers(model)
        cfg = getattr(model, "lordba_config", None)
        if not layers or cfg is None:
            raise ValueError("model has no LoRDBA adapters; call attach_lordba_(model, cfg) first")
        table = tuple(LayerSpec(n, m.in_features, m.out_features, m.rank) for n, m in layers.items())
        return cls(table, tuple(cfg.scales), model_fingerprint(base_fingerprint(model), cfg.scaling))

    # ---- sizes ----------------------------------------------------------------------------------
    @property
    def n_bits(self) -> int:
        """Entries of the carrier stream (all sign bits)."""
        return int(self.carrier_offsets[-1])

    @property
    def n_scales(self) -> int:
        """Entries of the scale stream."""
        return int(self.scale_offsets[-1])

    def fp16_lora_bytes(self) -> int:
        """Bytes of fp16 LoRA factors ``A (r, in)`` and ``B (out, r)`` of the same shapes: the baseline."""
        return 2 * self.n_bits

    def table_bytes(self) -> bytes:
        """Canonical binary layer table (names, shapes, stream offsets) as carried in every frame."""
        return self._table

    def _build_table(self) -> bytes:
        parts = []
        for i, layer in enumerate(self.layers):
            name = layer.name.encode()
            parts.append(len(name).to_bytes(2, "little") + name)
            parts.append(
                np.array(
                    [layer.in_features, layer.out_features, layer.rank, self.carrier_offsets[i], self.scale_offsets[i]],
                    dtype="<u8",
                ).tobytes()
            )
        return b"".join(parts)

    def describe_table(self, table: bytes) -> str:
        """Why a received layer table differs from this one (first difference), for error messages."""
        theirs, pos = [], 0
        try:
            while pos < len(table):
                n = int.from_bytes(table[pos : pos + 2], "little")
                raw_name = table[pos + 2 : pos + 2 + n]
                name = raw_name.decode()
                vals = np.frombuffer(table[pos + 2 + n : pos + 2 + n + 40], dtype="<u8")
                if len(raw_name) != n or vals.size != 5:
                    return "the layer table is malformed"
                theirs.append((name, *map(int, vals[:3])))
                pos += 2 + n + 40
        except (UnicodeDecodeError, ValueError):
            return "the layer table is malformed"
        ours = [(layer.name, layer.in_features, layer.out_features, layer.rank) for layer in self.layers]
        for i, (a, b) in enumerate(zip(theirs, ours)):
            if a != b:
                return f"layer {i}: frame has {a[0]!r} (in={a[1]}, out={a[2]}, r={a[3]}), expected {b[0]!r} (in={b[1]}, out={b[2]}, r={b[3]})"
        if len(theirs) != len(ours):
            return f"frame has {len(theirs)} layers, expected {len(ours)}"
        return "layer offsets differ"


def model_fingerprint(base_id: str, scaling: float) -> bytes:
    """16-byte identity of a base model (:func:`lordba_fl.adapter.storage.base_fingerprint`) and adapter scaling."""
    return hashlib.blake2b(json.dumps([base_id, float(scaling)]).encode(), digest_size=16).digest()


# --------------------------------------------------------------------------------------------------
# Flat state


@dataclass
class AdapterState:
    """A LoRDBA adapter as the protocol sees it: signs and scales in flat layout, with a version.

    ``negative`` is the boolean ``-1`` mask of the carrier stream (``(n_bits,)``) and ``scales`` the
    fp32 scale stream (``(n_scales,)``).
    """

    version: int
    negative: torch.Tensor
    scales: torch.Tensor

    def signs(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return 1.0 - 2.0 * self.negative.to(dtype)  # (n_bits,) of +-1

    def clone(self) -> AdapterState:
        return AdapterState(self.version, self.negative.clone(), self.scales.clone())

    def equals(self, other: AdapterState) -> bool:
        return (
            self.version == other.version
            and torch.equal(self.negative, other.negative)
            and torch.equal(self.scales, other.scales)
        )


def split_carriers(spec: AdapterSpec, flat: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer ``(A (r, in), B (out, r))`` views of a carrier-stream tensor."""
    if flat.shape != (spec.n_bits,):
        raise ValueError(f"carrier stream must have shape ({spec.n_bits},); got {tuple(flat.shape)}")
    out = {}
    for i, layer in enumerate(spec.layers):
        lo = int(spec.carrier_offsets[i])
        mid = lo + layer.rank * layer.in_features
        a = flat[lo:mid].view(layer.rank, layer.in_features)
        b = flat[mid : int(spec.carrier_offsets[i + 1])].view(layer.out_features, layer.rank)
        out[layer.name] = (a, b)
    return out


def split_scales(spec: AdapterSpec, flat: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """Per-layer ``{kind: view}`` of a scale-stream tensor."""
    if flat.shape != (spec.n_scales,):
        raise ValueError(f"scale stream must have shape ({spec.n_scales},); got {tuple(flat.shape)}")
    out, pos = {}, 0
    for layer in spec.layers:
        out[layer.name] = {}
        for kind in spec.scales:
            n = layer.scale_size(kind)
            out[layer.name][kind] = flat[pos : pos + n]
            pos += n
    return out


# --------------------------------------------------------------------------------------------------
# Nested ranks: a rank-r adapter is the leading r components of a rank-R one (S1 rows, S2 columns and
# s_mid entries 0..r-1; s_in and s_out shared), at the same scaling g = alpha / R.


def at_rank(spec: AdapterSpec, rank: int) -> AdapterSpec:
    """The spec of the leading ``rank`` components of ``spec``'s adapter (same layers, scales, fingerprint)."""
    top = max(layer.rank for layer in spec.layers)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= top:
        raise ValueError(f"a nested rank must be an integer in 1..{top} (the global adapter's rank); got {rank!r}")
    return with_rank(spec, rank)


def _nested(src: AdapterSpec, dst: AdapterSpec) -> list[tuple[LayerSpec, LayerSpec]]:
    pairs = list(zip(src.layers, dst.layers))
    if len(src.layers) != len(dst.layers) or src.scales != dst.scales or any(
            (a.name, a.in_features, a.out_features) != (b.name, b.in_features, b.out_features) for a, b in pairs):
        raise ValueError("nested specs must share layers and scales; build one with at_rank(spec, r)")
    return pairs


def truncate_carriers(spec: AdapterSpec, low: AdapterSpec, flat: torch.Tensor) -> torch.Tensor:
    """The carrier stream of ``low`` (rank r) holding the leading r components of ``flat`` (``spec``)."""
    _nested(spec, low)
    parts = []
    for (a, b), layer in zip(split_carriers(spec, flat).values(), low.layers):
        parts += [a[: layer.rank].reshape(-1), b[:, : layer.rank].reshape(-1)]
    return torch.cat(parts)


def embed_carriers(low: AdapterSpec, spec: AdapterSpec, flat: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """``fill`` (a ``spec`` stream) with its leading components replaced by ``flat`` (a ``low`` stream)."""
    _nested(spec, low)
    out = fill.clone()
    for (a, b), (a_low, b_low), layer in zip(split_carriers(spec, out).values(), split_carriers(low, flat).values(),
                                             low.layers):
        a[: layer.rank] = a_low
        b[:, : layer.rank] = b_low
    return out


def truncate_scales(spec: AdapterSpec, low: AdapterSpec, flat: torch.Tensor) -> torch.Tensor:
    """The scale stream of ``low``: ``s_in``, ``s_out`` as they are, ``s_mid[:r]``."""
    _nested(spec, low)
    parts = []
    for sc, layer in zip(split_scales(spec, flat).values(), low.layers):
        parts += [sc[k][: layer.rank] if k == "mid" else sc[k] for k in spec.scales]
    return torch.cat(parts)


def embed_scales(low: AdapterSpec, spec: AdapterSpec, flat: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """``fill`` (a ``spec`` scale stream) with ``s_in``, ``s_out`` and ``s_mid[:r]`` taken from ``flat`` (``low``)."""
    _nested(spec, low)
    out = fill.clone()
    for sc, sc_low, layer in zip(split_scales(spec, out).values(), split_scales(low, flat).values(), low.layers):
        for k in spec.scales:
            sc[k][: layer.rank if k == "mid" else None] = sc_low[k]
    return out


def with_rank(spec: AdapterSpec, rank: int) -> AdapterSpec:
    """``spec``'s layers, scales and fingerprint at ``rank`` (higher or lower; :func:`at_rank` checks nesting)."""
    return AdapterSpec(tuple(LayerSpec(l.name, l.in_features, l.out_features, rank) for l in spec.layers),
                       spec.scales, spec.fingerprint)


def seeded_state(spec: AdapterSpec, cfg: LoRDBAConfig) -> AdapterState:
    """Version 0 as ``attach_lordba_(model, cfg)`` builds it (``init='scratch'``, random signs) for a
    model whose adapted layers are ``spec``'s, without building the model: the same draws from
    ``cfg.seed`` in layer order, the same initial scales (the outermost zero). A node of a lower tier
    derives its version 0 from the top rank's this way, so a first contact can be a delta against it."""
    if cfg.seed is None or cfg.init != "scratch" or cfg.sign_init != "random" or tuple(cfg.scales) != spec.scales:
        raise ValueError("seeded_state needs a seeded scratch config with random signs and the spec's scales")
    g = torch.Generator().manual_seed(cfg.seed)
    outermost = spec.scales[-1]
    negative, scales = [], []
    for layer in spec.layers:
        if layer.rank != cfg.rank:
            raise ValueError(f"layer {layer.name} has rank {layer.rank}; the config's is {cfg.rank}")
        la, lb = scratch_latents(cfg, layer.in_features, layer.out_features, g)
        negative += [(la < 0).reshape(-1), (lb < 0).reshape(-1)]
        start = initial_scale_values(cfg, layer.in_features, layer.out_features)
        scales += [torch.full((layer.scale_size(k),), 0.0 if k == outermost else start[k]) for k in spec.scales]
    return AdapterState(0, torch.cat(negative), torch.cat(scales))


def truncate_state(spec: AdapterSpec, low: AdapterSpec, state: AdapterState) -> AdapterState:
    """The rank-r broadcast nested in ``state``: exactly its leading r components, same version."""
    return AdapterState(state.version, truncate_carriers(spec, low, state.negative),
                        truncate_scales(spec, low, state.scales))


def checked_layers(model: nn.Module, spec: AdapterSpec) -> list[LoRDBALinear]:
    layers = lordba_layers(model)
    got = [(n, m.in_features, m.out_features, m.rank) for n, m in layers.items()]
    want = [(s.name, s.in_features, s.out_features, s.rank) for s in spec.layers]
    if got != want:
        diff = next((f"{g} vs {w}" for g, w in zip(got, want) if g != w), f"{len(got)} vs {len(want)} layers")
        raise ValueError(f"model's LoRDBA layers do not match the spec ({diff}); build the spec from this model")
    scales = tuple(getattr(model, "lordba_config").scales)
    if scales != spec.scales:
        raise ValueError(f"model trains scales {scales}, the spec carries {spec.scales}; use the same LoRDBAConfig")
    return list(layers.values())


@torch.no_grad()
def read_latents(model: nn.Module, spec: AdapterSpec) -> torch.Tensor:
    """The model's sign latents as one fp32 carrier-stream tensor ``(n_bits,)`` (a CPU copy)."""
    parts = []
    for m in checked_layers(model, spec):
        parts += [m.lordba_latent_A.reshape(-1), m.lordba_latent_B.reshape(-1)]
    return torch.cat(parts).float().cpu()


@torch.no_grad()
def write_latents_(model: nn.Module, spec: AdapterSpec, flat: torch.Tensor) -> None:
    """Inverse of :func:`read_latents`: copy a carrier-stream tensor into the model's latents, in place."""
    layers = checked_layers(model, spec)
    for layer, (a, b) in zip(layers, split_carriers(spec, flat).values()):
        layer.lordba_latent_A.copy_(a)  # copy_ moves across devices
        layer.lordba_latent_B.copy_(b)


@torch.no_grad()
def read_scales(model: nn.Module, spec: AdapterSpec) -> torch.Tensor:
    """The model's scales as one fp32 scale-stream tensor ``(n_scales,)`` (a CPU copy)."""
    parts = [m.scale(k).reshape(-1) for m in checked_layers(model, spec) for k in spec.scales]
    return torch.cat(parts).float().cpu()


def read_state(model: nn.Module, spec: AdapterSpec, version: int = 0) -> AdapterState:
    """The model's current adapter (signs of its latents, its scales) as an :class:`AdapterState`."""
    return AdapterState(version, read_latents(model, spec) < 0, read_scales(model, spec))


@torch.no_grad()
def write_state_(
    model: nn.Module, spec: AdapterSpec, state: AdapterState, *, latent_magnitude: float | None = None
) -> None:
    """Load ``state`` into the model in place: scales always; latents set to ``latent_magnitude * S``.

    With ``latent_magnitude=None`` latents whose sign already agrees with ``S`` keep their value and
    the others are set to ``|latent| * S`` (a stateful client keeps its own magnitudes).
    """
    layers = checked_layers(model, spec)
    if latent_magnitude is not None and not latent_magnitude > 0:
        raise ValueError(f"latent_magnitude must be positive (m0 in DESIGN.md); got {latent_magnitude}")
    if state.negative.shape != (spec.n_bits,) or state.scales.shape != (spec.n_scales,):
        raise ValueError(
            f"state has shapes {tuple(state.negative.shape)}, {tuple(state.scales.shape)}; "
            f"the spec needs ({spec.n_bits},), ({spec.n_scales},)"
        )
    signs = split_carriers(spec, state.signs())
    scales = split_scales(spec, state.scales)
    for layer, m in zip(spec.layers, layers):
        for param, s in zip((m.lordba_latent_A, m.lordba_latent_B), signs[layer.name]):
            s = s.to(param.device, param.dtype)
            if latent_magnitude is None:
                # clamp so a zero latent still carries a -1 (sign(-0.0) would read as +1)
                param.copy_(param.abs().clamp_min(torch.finfo(param.dtype).tiny) * s)
            else:
                param.copy_(s * latent_magnitude)
        for kind, v in scales[layer.name].items():
            m.scale(kind).copy_(v.to(m.scale(kind).device, m.scale(kind).dtype))
