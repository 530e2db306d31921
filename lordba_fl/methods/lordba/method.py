"""``lordba``: double-binary adapters, flip masks + scale deltas up, latent-space aggregation.

Client round (DESIGN.md §3): decode the broadcast (a delta against the version this node holds, or
the full state), load the signs with latent magnitude ``m0`` (or keep this node's own magnitudes),
train E local steps, keep at most ``flip.budget`` of the sign flips (largest latent pressure
``|L|`` first), send the flip mask and the scale deltas. The server aggregates with the latent vote
(β, τ, η) or ``refit`` and re-binarizes; it keeps the last ``server.history`` sign versions so each
node gets a delta against what it last acknowledged.
"""

from __future__ import annotations

import inspect
import logging
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lordba_fl.adapter.config import SCALE_LRS, LoRDBAConfig
from lordba_fl.adapter.fit import fit_float_factors_, normalize_gauge
from lordba_fl.adapter.layer import (
    attach_lordba_,
    initial_scale_values,
    lordba_layers,
    scale_lr_gain,
)
from lordba_fl.adapter.storage import export_peft_lora, init_from_, save_lordba
from lordba_fl.methods.base import Method
from lordba_fl.methods.lordba import privacy
from lordba_fl.methods.lordba.aggregation import RobustOptions, ServerState, collect_updates
from lordba_fl.methods.lordba.budgets import flip_allowance, halving_budget
from lordba_fl.methods.lordba.clientstate import (
    StateError,
    load_optimizer_,
    pack_floats,
    pack_optimizer,
    unpack_floats,
)
from lordba_fl.methods.lordba.codec import (
    CodecOptions,
    ShapeMismatchError,
    Update,
    decode_state,
    decode_update,
    encode_state,
    encode_update,
    read_header,
    scale_roundtrip,
)
from lordba_fl.methods.lordba.layout import (
    AdapterSpec,
    AdapterState,
    at_rank,
    checked_layers,
    embed_carriers,
    embed_scales,
    read_latents,
    read_scales,
    read_state,
    seeded_state,
    split_carriers,
    split_scales,
    truncate_state,
    with_rank,
    write_latents_,
    write_state_,
)
from lordba_fl.methods.lordba.settings import LoRDBASettings
from lordba_fl.registry import AGGREGATORS, ATTACKS
from lordba_fl.train import make_optimizer, train_local, trim_freed_memory
from lordba_fl.wire.replies import Bound

HELD_KEY = "lordba.held"  # context.state: the full-state frame this node holds
LATENT_KEY = "lordba.latent"  # context.state: a stateful node's latent magnitudes (compact)
OPTIMIZER_KEY = "lordba.optimizer"  # context.state: its AdamW moments (client.state=latent+optimizer)
RESIDUAL_KEY = "lordba.scale-residual"  # context.state: what quantizing its scale deltas lost (fp32)
log = logging.getLogger("lordba_fl")


def budget_flips(latent: torch.Tensor, broadcast_negative: torch.Tensor, budget: float,
                 overwrite: bool = False) -> torch.Tensor:
    """Flip mask ``sign(L) XOR S`` limited to ``budget * n`` flips, keeping the largest ``|L|`` (ties at
    the cut: the lowest positions).

    The cut is the k-th largest ``|L|`` among the wanted flips (``torch.kthvalue`` on those alone):
    ``torch.topk`` over all ``n`` values allocates ~70 MB of index and value buffers at rank 16 on
    SmolLM2, the peak of a device's round. ``overwrite``: ``latent`` is not needed after this call
    and holds the magnitudes in place."""
    flips = (latent < 0) ^ broadcast_negative  # (n,)
    k = flip_allowance(latent.numel(), budget)
    n_flips = int(flips.sum())
    if n_flips <= k:
        return flips
    if k == 0:
        return torch.zeros_like(flips)
    pressure = (latent.abs_() if overwrite else latent.abs()).masked_fill_(~flips, -1.0)  # (n,); wanted ones >= 0
    wanted = pressure[flips]  # (n_flips,)
    cut = torch.kthvalue(wanted, n_flips - k + 1).values  # the k-th largest
    del wanted
    keep = pressure > cut  # fewer than k
    ties = (pressure == cut).nonzero().squeeze(1)[: k - int(keep.sum())]
    keep[ties] = True
    return keep


@torch.no_grad()
def project_flips_(model: nn.Module, spec, broadcast_negative: torch.Tensor, budget: float) -> int:
    """Keep at most ``budget``'s flips (:func:`budget_flips`: the largest ``|L|``, ties at the cut the
    lowest positions) in the model's latents: every other latent whose sign left the broadcast goes back
    to the broadcast sign at the smallest magnitude (the nearest point of the budget's set). Returns how
    many were put back.

    Runs after every local step (``flip.every-step``), while the optimizer's moments are alive, so it
    works carrier by carrier in place: beyond a bit per sign it holds only the wanted flips' magnitudes
    (a flat copy of every latent cost a device ~55 MB at its peak)."""
    pairs = []  # (latent, its broadcast-negative view), in carrier-stream order
    for m, (a_neg, b_neg) in zip(checked_layers(model, spec), split_carriers(spec, broadcast_negative).values()):
        pairs += [(m.lordba_latent_A, a_neg), (m.lordba_latent_B, b_neg)]
    wanted = [(p < 0) ^ neg.to(p.device) for p, neg in pairs]
    n_flips = sum(int(w.sum()) for w in wanted)
    k = flip_allowance(spec.n_bits, budget)
    if n_flips <= k:
        return 0
    if k:
        magnitudes = torch.cat([p[w].abs().float() for (p, _), w in zip(pairs, wanted)])  # (n_flips,)
        cut = float(torch.kthvalue(magnitudes.cpu(), n_flips - k + 1).values)  # the k-th largest
        del magnitudes
    else:
        cut = math.inf
    keeps = [w & (p.abs() > cut) for (p, _), w in zip(pairs, wanted)]  # at most k in all
    ties_left = k - sum(int(keep.sum()) for keep in keeps)
    back_total = 0
    for (p, neg), w, keep in zip(pairs, wanted, keeps):
        if ties_left > 0:
            ties = (w & (p.abs() == cut)).nonzero()[:ties_left]  # (n, 2) in row-major order, whatever p's strides
            keep[ties.unbind(1)] = True
            ties_left -= len(ties)
        back = w & ~keep
        n = int(back.sum())
        if n:
            tiny = torch.finfo(p.dtype).tiny
            p[back] = torch.where(neg.to(p.device)[back], -tiny, tiny).to(p.dtype)
            back_total += n
    return back_total


@torch.no_grad()
def gradient_flips(model: nn.Module, spec, broadcast_negative: torch.Tensor, budget: float) -> torch.Tensor:
    """``flip.select=gradient``: the flip mask from the latents' summed straight-through gradients
    ``G`` (their ``.grad``, added up over the round's steps). A sign is wanted where descent pushes its
    latent across (``G > 0`` on a positive sign, ``G < 0`` on a negative one); the budget keeps the
    largest ``|G|`` (:func:`budget_flips`; ties at the cut: the lowest positions). No gradient: no flip."""
    parts = []
    for m in checked_layers(model, spec):
        for p in (m.lordba_latent_A, m.lordba_latent_B):
            parts.append(p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device))
    g = torch.cat(parts).float().cpu()  # (n_bits,)
    return budget_flips(g.neg(), broadcast_negative, budget) & (g != 0)


@torch.no_grad()
def write_flips_(model: nn.Module, spec, broadcast_negative: torch.Tensor, flips: torch.Tensor, m0: float) -> None:
    """Latents at ``+-m0`` carrying the signs ``broadcast XOR flips``."""
    latent = torch.full((spec.n_bits,), m0, dtype=torch.float32)
    write_latents_(model, spec, latent.masked_fill_(broadcast_negative ^ flips, -m0))


def flip_agreement(masks: list[torch.Tensor]) -> dict[str, float]:
    """How often clients flip the same signs: of the positions any client flipped, the fraction
    flipped by two or more (``flip_agreement``), and what independent clients with the same flip
    rates would give (``flip_agreement_chance``)."""
    if len(masks) < 2:
        return {}
    count = torch.stack(masks).sum(0)  # (n,) clients flipping each position
    any_ = int((count >= 1).sum())
    if any_ == 0:
        return {"flip_agreement": 0.0, "flip_agreement_chance": 0.0}
    p = torch.tensor([float(m.float().mean()) for m in masks], dtype=torch.float64)  # (K,)
    none = torch.prod(1 - p)
    one = sum(p[k] * torch.prod(1 - p[torch.arange(len(p)) != k]) for k in range(len(p)))
    chance = float((1 - none - one) / (1 - none)) if float(1 - none) > 0 else 0.0
    return {"flip_agreement": int((count >= 2).sum()) / any_, "flip_agreement_chance": chance}


def train_groups(model: nn.Module, spec: AdapterSpec, lr: float, latent_lr: float,
                 scale_lr: str = "uniform") -> list[dict]:
    """Optimizer groups of a LoRDBA client: the scales at ``lr`` (``scale_lr='relative'``: times each
    scale's :func:`scale_lr_gain`, one group per distinct gain), the latents at ``latent_lr`` (0: frozen)."""
    if scale_lr not in SCALE_LRS:
        raise ValueError(f"scale-lr must be one of {list(SCALE_LRS)}; got {scale_lr!r}")
    latents, by_gain = [], {}
    for m in lordba_layers(model).values():
        latents += [m.lordba_latent_A, m.lordba_latent_B]
        for k in spec.scales:
            gain = scale_lr_gain(m, k) if scale_lr == "relative" else 1.0
            by_gain.setdefault(gain, []).append(m.scale(k))
    for p in latents:
        p.requires_grad_(latent_lr > 0)
    for params in by_gain.values():
        for p in params:
            p.requires_grad_(True)
    groups = [{"params": params, "lr": lr * gain} for gain, params in by_gain.items()]
    if latent_lr > 0:
        groups.append({"params": latents, "lr": latent_lr})
    return groups


def float_factor_groups(model: nn.Module, spec: AdapterSpec, lr: float) -> list[dict]:
    """Optimizer groups of a warm-up round: ``L2`` (LoRA's ``B``, ``s_out`` folded in and held at 1)
    and the ``in``/``mid`` scales at ``lr``; ``L1`` at ``lr * sqrt(in)``: its entries are +-1 where
    LoRA's ``A`` entries are about ``1 / sqrt(in)``, so this gives Adam LoRA's relative step."""
    groups = [{"params": [], "lr": lr}]
    for m in lordba_layers(model).values():
        groups[0]["params"] += [m.scale(k) for k in spec.scales if k != "out"] + [m.lordba_latent_B]
        groups.append({"params": [m.lordba_latent_A], "lr": lr * m.in_features ** 0.5})
        if m.scale("out") is not None:
            m.scale("out").requires_grad_(False)
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    return groups


def gauge_normalized(spec: AdapterSpec, scales: torch.Tensor) -> torch.Tensor:
    """A scale stream moved, layer by layer, to a fresh (``normalized``) adapter's gauge
    (:func:`lordba_fl.adapter.fit.normalize_gauge`): every product is unchanged up to rounding."""
    out = scales.clone()
    for layer, views in zip(spec.layers, split_scales(spec, out).values()):
        cfg = LoRDBAConfig(rank=layer.rank, scales=spec.scales, scale_init="normalized")
        moved = normalize_gauge(dict(views), initial_scale_values(cfg, layer.in_features, layer.out_features))
        for k, v in views.items():
            v.copy_(moved[k])
    return out


FP16_MAX = 65504.0


def broadcast_problem(scales: torch.Tensor) -> str:
    """Why a new global scale stream cannot be broadcast (non-finite, or beyond fp16), or ``""``."""
    if not bool(torch.isfinite(scales).all()):
        return "the new scales hold NaN or inf"
    top = float(scales.abs().max()) if scales.numel() else 0.0
    return f"a new scale is {top:g}, beyond what the fp16 broadcast holds ({FP16_MAX:g})" if top > FP16_MAX else ""


class LoRDBAMethod(Method):
    name = "lordba"
    runtimes = ("transformers", "lean")
    reply_metrics = {"flip_rate": Bound(0, 1), "device_fit_error": Bound(0, 1e6)}
    settings_type = LoRDBASettings
    nested_ranks = True

    @classmethod
    def folder_suffix(cls, cfg) -> str:
        return f"-{cfg.aggregator}"  # lordba-refit, lordba-vote

    @property
    def private_replies(self) -> bool:
        return self.cfg.dp.on

    def __init__(self, cfg):
        super().__init__(cfg)
        self.options = CodecOptions(level=cfg.codec_level, scale_encoding=cfg.scale_encoding,
                                    scale_rounding=cfg.scale_rounding, scale_fraction=cfg.scale_fraction)
        self.state_options = CodecOptions(level=cfg.codec_level, state_mantissa_bits=cfg.state_mantissa_bits,
                                          state_scale_encoding=cfg.state_scale_encoding,
                                          scale_fraction=cfg.scale_fraction)
        # exact fp16 deltas: lower tiers (nested states, not tracked per node)
        self.exact_options = CodecOptions(level=cfg.codec_level, state_mantissa_bits=cfg.state_mantissa_bits)
        self.spec: AdapterSpec | None = None
        self.server: ServerState | None = None
        self.history: dict[int, torch.Tensor] = {}
        self.scale_history: dict[int, torch.Tensor] = {}
        self.initial_state: AdapterState | None = None
        self.node_versions: dict[int, int] = {}
        self.participations: dict[int, int] = {}  # dp: privatized uplinks received per node
        self.node_ranks: dict[int, int] = {}  # heterogeneous devices: the rank each node trains
        # codec.state-scale-encoding q8/q4/q3/q2: the scales each node holds (with node_versions), and
        # those of the frame in flight to it until its reply confirms the version
        self.node_scales: dict[int, torch.Tensor] = {}
        self.pending_scales: dict[int, tuple[int, torch.Tensor]] = {}
        self._tier_specs: dict[int, AdapterSpec] = {}

    # ---- model ----------------------------------------------------------------------------------
    def adapt(self, model: nn.Module) -> nn.Module:
        cfg = self.cfg
        attach_lordba_(model, LoRDBAConfig(rank=cfg.rank, alpha=cfg.alpha, scales=cfg.scales, seed=cfg.seed,
                                           scale_init=cfg.scale_init, sign_init=cfg.sign_init))
        self.spec = AdapterSpec.from_model(model)
        # version 0 as every party builds it from the run's seed: a first contact can be a delta against it
        self.initial_state = read_state(model, self.spec, version=0)
        if cfg.top_rank and cfg.top_rank != cfg.rank and self.seeded_base:
            # a lower tier: the leading components of the run's rank's version 0, not this node's own draw
            top = LoRDBAConfig(rank=cfg.top_rank, alpha=cfg.alpha * cfg.top_rank / cfg.rank, scales=cfg.scales,
                               seed=cfg.seed, scale_init=cfg.scale_init, sign_init=cfg.sign_init)
            top_spec = with_rank(self.spec, cfg.top_rank)
            self.initial_state = truncate_state(top_spec, self.spec, seeded_state(top_spec, top))
        return model

    @property
    def seeded_base(self) -> bool:
        """Whether version 0 is the seeded state every client builds itself (``server.seeded-base``),
        so the server keeps it and sends a node it has not served a delta against it. Not with
        ``init.from`` (clients do not have the file) nor ``init.signs=base-svd`` (an SVD of the base
        may differ in near-zero entries between BLAS builds). A node of a lower tier derives the
        leading part of the run's rank's version 0 (:func:`lordba_fl.methods.lordba.layout.seeded_state`)."""
        cfg = self.cfg
        return cfg.seeded_base and not cfg.init_from and cfg.sign_init == "random"

    def dp_noise_multiplier(self) -> float:
        """``z`` of this run's Gaussian noise (``dp.target-epsilon`` calibrated over ``rounds``)."""
        return privacy.noise_multiplier(self.cfg.dp, self.spec.n_bits, self.cfg.flip.flip_budget, self.cfg.rounds)

    def fp16_lora_bytes(self) -> int:
        return self.spec.fp16_lora_bytes()

    # ---- server ---------------------------------------------------------------------------------
    def init_server(self, model: nn.Module) -> None:
        cfg = self.cfg
        if cfg.init_from:  # checked here, before any round runs; clients get it in their first (full) downlink
            errors = sorted(init_from_(model, cfg.init_from).values())
            log.info("init.from=%s: %d layers%s", cfg.init_from, len(self.spec.layers),
                     f", median svd fit error {errors[len(errors) // 2]:.3f}" if errors else " (packed, exact)")
        self.server = ServerState.initial(read_state(model, self.spec, version=0))
        self.history = {0: self.server.state.negative.clone()}
        self.scale_history = {0: self.server.state.scales.clone()}  # what each kept version broadcast
        if cfg.dp.on:
            log.info("dp.mode=local: noise multiplier %.4g, flip randomized response p=%.4g",
                     self.dp_noise_multiplier(), cfg.dp.flip_noise)  # calibrated (or refused) at start
        self.aggregator = AGGREGATORS.get(cfg.aggregator)(self.spec, cfg)
        try:  # the interface: (server state, [(update, weight)], the round's flip budget)
            inspect.signature(self.aggregator).bind(None, [], 1.0)
        except (TypeError, ValueError):
            raise ValueError(f"server.aggregator {cfg.aggregator!r} made {self.aggregator!r}, which does not take "
                             "(server_state, updates, budget); see the aggregator interface in the docs") from None

    @property
    def version(self) -> int:
        return self.server.state.version

    @property
    def quantized_downlink(self) -> bool:
        """``codec.state-scale-encoding`` q8/q4/q3/q2: each node's scales move toward the global ones by
        nearest-rounded codes, and the server keeps what every node holds (its error feedback)."""
        return self.state_options.state_scale_encoding != "fp16"

    def note_rank(self, node_id: int, rank: int) -> None:
        self.tier_spec(rank)  # refuses a rank outside 1..R
        if self.node_ranks.get(node_id, rank) != rank:
            self.node_versions.pop(node_id, None)  # what it holds is at its old rank: the full state next
            self.node_scales.pop(node_id, None)
        self.node_ranks[node_id] = rank

    def tier_spec(self, rank: int) -> AdapterSpec:
        """The spec of the rank-``rank`` adapter nested in the global one (the global spec at its own rank)."""
        if rank not in self._tier_specs:
            self._tier_specs[rank] = self.spec if rank == self.cfg.rank else at_rank(self.spec, rank)
        return self._tier_specs[rank]

    def downlink(self, node_id: int, server_round: int) -> bytes:
        current = self.server.state
        held = self.node_versions.get(node_id)
        spec = self.tier_spec(self.node_ranks.get(node_id, self.cfg.rank))
        if self.seeded_base and (held is None or held not in self.history):
            held = 0  # first contact, or a version no longer kept: a delta against the seeded version 0
        base = None
        if held is not None and held in self.history and held in self.scale_history:
            base = AdapterState(held, self.history[held], self.scale_history[held])
        if spec is not self.spec:  # a lower tier: exactly the leading components of the global state
            current = truncate_state(self.spec, spec, current)
            base = None if base is None else truncate_state(self.spec, spec, base)
            return encode_state(current, spec, self.exact_options, round=server_round, base=base)
        if not self.quantized_downlink:
            return encode_state(current, spec, self.state_options, round=server_round, base=base)
        if base is not None and held != 0:  # the node holds its own approximation of version `held`
            if node_id not in self.node_scales:
                base = None  # not known (e.g. a resumed server): the full state
            else:
                base = AdapterState(held, base.negative, self.node_scales[node_id])
        frame = encode_state(current, spec, self.state_options, round=server_round, base=base)
        # what the node will hold: the frame decoded as the node decodes it (the codes' rounding included)
        self.pending_scales[node_id] = (current.version, decode_state(frame, spec, self.state_options, base=base).scales)
        return frame

    def note_held(self, node_id: int, version: int | None) -> None:
        pending = self.pending_scales.pop(node_id, None)
        if version is None or version not in self.history:
            self.node_versions.pop(node_id, None)
            self.node_scales.pop(node_id, None)
            return
        tracked = self.quantized_downlink and self.node_ranks.get(node_id, self.cfg.rank) == self.cfg.rank
        sent = pending is not None and pending[0] == version
        if tracked and not sent and not (node_id in self.node_scales and self.node_versions.get(node_id) == version):
            # what it holds is not what the server sent it: the full state (or version 0's delta) next time
            self.node_versions.pop(node_id, None)
            self.node_scales.pop(node_id, None)
            return
        self.node_versions[node_id] = version
        if sent:
            self.node_scales[node_id] = pending[1]

    def aggregate(self, server_round: int, replies) -> tuple[dict, list[tuple[int, str]]]:
        cfg = self.cfg
        dp = cfg.dp.on
        budget = cfg.warmup_budget if server_round <= cfg.warmup_rounds else cfg.flip.budget_at(server_round)
        accepted, rejected, rates = [], [], []
        for rank in sorted({self.node_ranks.get(r.node_id, cfg.rank) for r in replies}):
            # each tier decodes against its own nested spec (a reply of another rank is rejected) and
            # answers to its flip budget over its own signs; kept updates join the global layout
            # with the components they do not train unchanged
            spec = self.tier_spec(rank)
            members = [i for i, r in enumerate(replies) if self.node_ranks.get(r.node_id, cfg.rank) == rank]
            got, bad = collect_updates(  # under dp every client weighs the same: num_examples is data
                [(replies[i].frame, 1.0 if dp else replies[i].weight) for i in members], spec, self.options,
                version=self.version, round=server_round)
            rejected += [(members[j], why) for j, why in bad]
            dropped = {j for j, _ in bad}
            kept_idx = [members[j] for j in range(len(members)) if j not in dropped]
            got = [(self._rebased(replies[i].node_id, u), w) for (u, w), i in zip(got, kept_idx)]
            tier_budget = privacy.max_flip_rate(cfg.dp, budget, spec.n_bits) if dp else budget
            got, refused = RobustOptions(tier_budget if cfg.enforce_budget else 1.0).apply(got)
            rejected += [(kept_idx[j], why) for j, why in refused]
            rates += [u.flip_rate for u, _ in got]  # of the signs each client trains
            accepted += [(self._embed(spec, u), w) for u, w in got]
        accepted, _ = RobustOptions(1.0, cfg.weight_cap, cfg.norm_bound).apply(accepted)
        metrics = {"rejected": float(len(rejected)), "accepted": float(len(accepted))}
        reasons = [(replies[i].node_id, why) for i, why in rejected]
        if dp:
            metrics.update(self._account(replies))
        if not accepted:
            return metrics, reasons
        old = self.server.state
        warmup = server_round <= cfg.warmup_rounds
        try:
            candidate = self.aggregator(self.server, accepted, self.round_budget(server_round, warmup))
        except FloatingPointError as e:
            log.warning("round %d: aggregate refused, %s; keeping version %d", server_round, e, old.version)
            metrics["aggregate_refused"] = 1.0
            return metrics, reasons
        if warmup and cfg.scale_init == "normalized":
            # a warm-up's fits leave the gauge arbitrary (an SVD restart gives s_mid the singular
            # values): broadcast it in a fresh adapter's gauge, so the next rounds train conditioned
            st = candidate.state
            candidate.state = AdapterState(st.version, st.negative, gauge_normalized(self.spec, st.scales))
        bad = broadcast_problem(candidate.state.scales)
        if bad:
            # the round's updates would leave a state no client can receive: keep the current one
            log.warning("round %d: aggregate refused, %s; keeping version %d (turn on server.norm-bound / "
                        "server.scale-rule=median against such clients)", server_round, bad, old.version)
            metrics["aggregate_refused"] = 1.0
            return metrics, reasons
        self.server = candidate
        new = self.server.state
        self.history[new.version] = new.negative.clone()
        self.scale_history[new.version] = new.scales.clone()
        pinned = {0} if self.seeded_base else set()  # the seeded version stays: first contacts are deltas to it
        kept = [v for v in sorted(self.history) if v not in pinned]
        for v in kept[: max(0, len(kept) - self.cfg.history)]:
            del self.history[v], self.scale_history[v]
        metrics["client_flip_rate"] = sum(rates) / len(rates)
        metrics.update(flip_agreement([u.flips for u, _ in accepted]))
        metrics["global_flip_rate"] = float((new.negative ^ old.negative).float().mean())
        if "quorum_kept" in self.server.info:  # server.flip-quorum: the share of client flips confirmed
            metrics["quorum_kept"] = float(self.server.info["quorum_kept"])
        errors = sorted(self.server.info.get("fit_error", {}).values())
        if errors:  # refit: broadcast vs aggregate, relative Frobenius error per layer
            # 6 significant digits: float64 BLAS sums may differ in the last bits between processes
            metrics["fit_error_median"] = float(f"{errors[len(errors) // 2]:.6g}")
            metrics["fit_error_max"] = float(f"{errors[-1]:.6g}")
        return metrics, reasons

    def round_budget(self, server_round: int, warmup: bool) -> float:
        """The server flip budget the aggregator gets this round: ``server.flip-budget`` on
        ``server.flip-budget-start``'s halving schedule; a warm-up round may follow the device fits up to
        ``init.warmup-budget`` (warm-up rounds seed the signs)."""
        cfg = self.cfg
        if warmup:
            return max(cfg.server_flip_budget, cfg.warmup_budget)
        return halving_budget(cfg.server_flip_budget, cfg.server_flip_budget_start, server_round)

    def _rebased(self, node_id: int, u: Update) -> Update:
        """A node's scale delta against the global scales: it trained from its own held scales
        (``codec.state-scale-encoding`` q8/q4/q3/q2), so its scales are those plus its delta; with
        ``server.rebase-scales = false`` the delta is a change to the global scales as it came."""
        held = self.node_scales.get(node_id)
        if held is None or not self.cfg.rebase_scales:
            return u
        return Update(u.round, u.version, u.flips, held + u.scale_delta.float() - self.server.state.scales)

    def _embed(self, spec: AdapterSpec, u: Update) -> Update:
        """A tier's update in the global layout: no flips and no scale change beyond its components."""
        if spec is self.spec:
            return u
        flips = embed_carriers(spec, self.spec, u.flips, torch.zeros(self.spec.n_bits, dtype=torch.bool))
        delta = embed_scales(spec, self.spec, u.scale_delta, torch.zeros(self.spec.n_scales, dtype=u.scale_delta.dtype))
        return Update(u.round, u.version, flips, delta)

    def _account(self, replies) -> dict:
        """Count this round's privatized uplinks per node; ε of the node that sent the most so far."""
        for r in replies:
            self.participations[r.node_id] = self.participations.get(r.node_id, 0) + 1
        dp, z = self.cfg.dp, self.dp_noise_multiplier()
        bits = privacy.differing_bits(self.spec.n_bits, self.cfg.flip.flip_budget)
        most = max(self.participations.values(), default=0)
        return {"dp_epsilon": privacy.epsilon(z, dp.flip_epsilon, bits, most, dp.delta),
                "dp_epsilon_round": privacy.epsilon(z, dp.flip_epsilon, bits, 1, dp.delta),
                "dp_delta": dp.delta, "dp_noise_multiplier": z, "dp_max_participations": float(most)}

    def load_global_(self, model: nn.Module) -> None:
        write_state_(model, self.spec, self.server.state, latent_magnitude=self.cfg.flip.m0)

    def export(self, model: nn.Module, folder: Path) -> None:
        """The packed LoRDBA file ``adapter.lordba.safetensors`` and its exact PEFT LoRA export ``peft_lora/``."""
        save_lordba(model, folder / "adapter.lordba.safetensors")
        export_peft_lora(model, folder / "peft_lora")

    def server_state(self) -> tuple[dict, dict]:
        tensors = {
            "negative": self.server.state.negative,
            "scales": self.server.state.scales,
            "latent": self.server.latent,
        }
        groups = {"history": self.history, "history_scales": self.scale_history, "residual": self.server.residual,
                  "momentum": self.server.momentum, "node_scales": self.node_scales}
        for prefix, group in groups.items():
            tensors.update({f"{prefix}.{key}": t for key, t in (group or {}).items()})
        meta = {"version": self.version, "node_versions": {str(k): v for k, v in self.node_versions.items()},
                "participations": {str(k): v for k, v in self.participations.items()},
                "node_ranks": {str(k): v for k, v in self.node_ranks.items()}}
        return tensors, meta

    def load_server_state(self, tensors: dict, meta: dict) -> None:
        state = AdapterState(int(meta["version"]), tensors["negative"].clone(), tensors["scales"].clone())

        def group(prefix: str, key=str) -> dict:  # the tensors saved as "<prefix>.<key>", by key
            return {key(k.split(".", 1)[1]): t.clone() for k, t in tensors.items() if k.split(".", 1)[0] == prefix}

        self.server = ServerState(state, tensors["latent"].clone(), group("residual") or None,
                                  momentum=group("momentum") or None)
        self.history, self.scale_history = group("history", int), group("history_scales", int)
        self.node_versions = {int(k): int(v) for k, v in meta["node_versions"].items()}
        self.participations = {int(k): int(v) for k, v in meta.get("participations", {}).items()}
        self.node_ranks = {int(k): int(v) for k, v in meta.get("node_ranks", {}).items()}
        self.node_scales = group("node_scales", int)
        self.pending_scales = {}

    # ---- client ---------------------------------------------------------------------------------
    def _held(self, state) -> AdapterState | None:
        if state is None or HELD_KEY not in state:
            return None
        try:
            return decode_state(state[HELD_KEY]["frame"], self.spec, self.state_options)
        except ShapeMismatchError:  # kept at another rank (this node changed tier): it holds nothing usable
            return None

    def _receive(self, frame: bytes, state) -> AdapterState:
        held = self._held(state)
        if self.seeded_base and read_header(frame).base_version == 0 and (held is None or held.version != 0):
            held = self.initial_state  # a first contact (or a silent node): a delta against the seeded version 0
        glob = decode_state(frame, self.spec, self.state_options, base=held)
        if state is not None:
            from flwr.app import ConfigRecord

            state[HELD_KEY] = ConfigRecord({"frame": encode_state(glob, self.spec, self.state_options)})
        return glob

    def client_load_(self, model: nn.Module, frame: bytes, state) -> int:
        glob = self._receive(frame, state)
        write_state_(model, self.spec, glob, latent_magnitude=self.cfg.flip.m0)
        return glob.version

    def _float_fit_round(self, model, tok, glob: AdapterState, examples, seed) -> dict:
        """A warm-up round (``init.warmup-rounds``), the federated form of the paper's QAT-full: train
        unconstrained float factors like LoRA (``A = L1 s_mid s_in`` from the broadcast signs,
        ``B = diag(s_out) S2`` folded into a float ``L2``, zero in round 1 like LoRA's ``B``), then
        fit the product back to signs + scales on the device: from the broadcast carriers, and (with
        an unlimited ``init.warmup-budget``) from its own SVD aligned to them, keeping the better."""
        cfg = self.cfg
        write_state_(model, self.spec, glob, latent_magnitude=1.0)
        layers = lordba_layers(model)
        start = {}
        with torch.no_grad():
            for name, m in layers.items():
                if m.scale_targets is not None:  # train from a fresh adapter's gauge (same product)
                    moved = normalize_gauge({k: m.scale(k).detach() for k in m.scale_names}, m.scale_targets)
                    for k, v in moved.items():
                        m.scale(k).copy_(v)
                s_out = m.scale("out")
                start[name] = (m.lordba_latent_A.detach().clone(), m.lordba_latent_B.detach().clone(),
                               None if s_out is None else s_out.detach().clone())
                if s_out is not None:  # B = diag(s_out) S2 becomes one float factor
                    m.lordba_latent_B.mul_(s_out[:, None])
                    s_out.fill_(1.0)
        groups = float_factor_groups(model, self.spec, cfg.lr)
        for m in layers.values():
            m.float_factors = True
        try:
            metrics = train_local(model, groups, tok, examples, cfg.train, seed)
        finally:
            for m in layers.values():
                m.float_factors = False
        budget = cfg.warmup_budget
        errors = []
        for name, m in layers.items():
            limit = None if budget >= 1.0 else flip_allowance(m.rank * (m.in_features + m.out_features), budget)
            errors.append(fit_float_factors_(m, *start[name], limit, cfg.flip.m0, restart=limit is None)[1])
        metrics["device_fit_error"] = float(f"{sorted(errors)[len(errors) // 2]:.6g}")
        return metrics

    def client_train(self, model, tok, frame, state, examples, server_round, seed):
        cfg, flip = self.cfg, self.cfg.flip
        keep = state if cfg.stateful else None  # where this node's own state lives, if it keeps one
        glob = self._receive(frame, state)
        if server_round <= cfg.warmup_rounds:
            metrics = self._float_fit_round(model, tok, glob, examples, seed)
            for p in model.parameters():
                p.grad = None
            flips = budget_flips(read_latents(model, self.spec), glob.negative, cfg.warmup_budget)
            delta = read_scales(model, self.spec) - glob.scales
            if cfg.scale_error_feedback:
                delta = self._with_feedback_(delta, state, seed)
            metrics.update(flip_rate=float(flips.float().mean()), held_version=float(glob.version))
            update = Update(server_round, glob.version, flips, delta)
            return encode_update(update, self.spec, self.options, rng=seed), metrics
        own = keep[LATENT_KEY] if keep is not None and LATENT_KEY in keep else None
        if own is not None:
            # a stateful node keeps its magnitudes; the broadcast decides the signs
            mags = unpack_floats(own["magnitude"], self.spec.n_bits, own["dtype"])
            write_latents_(model, self.spec, mags)
            write_state_(model, self.spec, glob, latent_magnitude=None)
        else:
            write_state_(model, self.spec, glob, latent_magnitude=flip.m0)
        by_gradient = flip.select == "gradient" and flip.latent_lr > 0
        groups = train_groups(model, self.spec, cfg.lr * cfg.scale_lr_ratio, 0.0 if by_gradient else flip.latent_lr,
                              cfg.scale_lr)
        latents = [p for m in checked_layers(model, self.spec) for p in (m.lordba_latent_A, m.lordba_latent_B)]
        if by_gradient:  # outside the optimizer: their .grad sums the round's straight-through gradients
            for p in latents:
                p.grad = None
                p.requires_grad_(True)
        opt = make_optimizer(groups, cfg.train)
        if cfg.client_state == "latent+optimizer" and keep is not None and OPTIMIZER_KEY in keep:
            try:
                load_optimizer_(opt, keep[OPTIMIZER_KEY], keep[OPTIMIZER_KEY]["dtype"])
            except StateError as e:  # e.g. flip.latent-lr switched on since: start the moments afresh
                log.warning("dropping this node's stored optimizer state: %s", e)
        after_step = None
        budget = flip.budget_at(server_round)
        if flip.every_step and by_gradient:  # the step's signs: the summed gradient's flips so far
            after_step = lambda _step: write_flips_(  # noqa: E731
                model, self.spec, glob.negative, gradient_flips(model, self.spec, glob.negative, budget), flip.m0)
        elif flip.every_step:
            after_step = lambda _step: project_flips_(model, self.spec, glob.negative, budget)  # noqa: E731
        metrics = train_local(model, groups, tok, examples, cfg.train, seed, after_step=after_step, optimizer=opt)
        chosen = gradient_flips(model, self.spec, glob.negative, budget) if by_gradient else None
        for p in [p for g in groups for p in g["params"]] + latents:
            p.grad = None  # free the gradients before the uplink is encoded (peak memory on devices)
        if keep is None or cfg.client_state != "latent+optimizer":
            opt = None  # the moments are not kept: free them too
        if cfg.train.return_memory:
            trim_freed_memory()
        latent = read_latents(model, self.spec)
        flips = chosen if by_gradient else budget_flips(latent, glob.negative, budget, overwrite=keep is None)
        delta = read_scales(model, self.spec) - glob.scales
        metrics["flip_rate"] = float(flips.float().mean())
        if cfg.dp.on:
            flips, delta = privacy.privatize(flips, delta, cfg.dp, self.dp_noise_multiplier())
        if cfg.scale_error_feedback:
            delta = self._with_feedback_(delta, state, seed)
        update = Update(server_round, glob.version, flips, delta)
        if keep is not None:
            self._keep_(keep, latent, opt)
        del latent, opt  # not needed by the encoder (peak memory on devices)
        metrics["held_version"] = float(glob.version)
        return encode_update(update, self.spec, self.options, rng=seed), metrics

    def attack(self, uplink: bytes, downlink: bytes, attack: str) -> bytes:
        """The attack's ``signs`` form (:mod:`lordba_fl.attacks`) on this client's flips and scale deltas."""
        u = decode_update(uplink, self.spec, self.options)
        flips, delta = ATTACKS.get(attack).form("signs", attack)(u.flips, u.scale_delta)
        return encode_update(Update(u.round, u.version, flips, delta), self.spec, self.options, rng=0)

    def _with_feedback_(self, delta: torch.Tensor, state, seed: int) -> torch.Tensor:
        """``delta`` plus this node's stored quantization residual; stores the new residual (what the
        server will not receive of it, with the same stochastic rounding the encoder uses)."""
        n = self.spec.n_scales
        if state is not None and RESIDUAL_KEY in state:
            kept = np.frombuffer(state[RESIDUAL_KEY]["values"], np.float32)
            if kept.size == n and np.isfinite(kept).all():
                delta = delta + torch.from_numpy(kept.copy())
        sent = scale_roundtrip(delta, self.spec, self.options, seed)
        if state is not None:
            from flwr.app import ConfigRecord

            residual = (delta.numpy().astype(np.float32) - sent).astype(np.float32)
            state[RESIDUAL_KEY] = ConfigRecord({"values": residual.tobytes()})
        return delta

    def _keep_(self, state, latent: torch.Tensor, opt: torch.optim.Optimizer) -> None:
        """Store this node's latent magnitudes (and AdamW moments) compactly in ``context.state``."""
        from flwr.app import ConfigRecord

        dtype = self.cfg.client_state_dtype
        state[LATENT_KEY] = ConfigRecord({"dtype": dtype, "magnitude": pack_floats(latent.abs(), dtype)})
        if self.cfg.client_state == "latent+optimizer":
            state[OPTIMIZER_KEY] = ConfigRecord({"dtype": dtype, **pack_optimizer(opt, dtype)})
