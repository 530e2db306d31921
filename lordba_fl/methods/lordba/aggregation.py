"""Server-side aggregation of LoRDBA updates in latent space (DESIGN.md §3).

The server holds the broadcast signs ``S^t``, fp32 scales ``s^t`` and a real-valued latent ``Λ^t``
(never sent), all in the flat layout of :mod:`lordba_fl.methods.lordba.layout`. Aggregators are pure: they return a
new :class:`ServerState` and never modify the one they were given, so a round that fails half-way, or
a reply that fails to decode, leaves the global state exactly as it was.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lordba_fl.adapter.fit import fit_from, fit_lordba
from lordba_fl.methods.lordba.budgets import flip_allowance
from lordba_fl.methods.lordba.codec import CodecError, CodecOptions, Update, decode_update
from lordba_fl.methods.lordba.layout import AdapterSpec, AdapterState, split_carriers, split_scales


@dataclass
class ServerState:
    """Global adapter (``state``: signs, fp32 scales, version) plus the server-only latent ``Λ`` (fp32)."""

    state: AdapterState
    latent: torch.Tensor
    residual: dict[str, torch.Tensor] | None = None  # refit error feedback: per layer (out, in) fp32
    info: dict = field(default_factory=dict)  # what the last aggregation measured (not state)
    momentum: dict[str, torch.Tensor] | None = None  # refit server momentum: per layer (out, in) fp32

    @classmethod
    def initial(cls, state: AdapterState) -> ServerState:
        """``Λ^0 = S^0``: the starting signs are held with full confidence."""
        return cls(state.clone(), state.signs())

    def clone(self) -> ServerState:
        copy = lambda d: None if d is None else {k: v.clone() for k, v in d.items()}  # noqa: E731
        return ServerState(self.state.clone(), self.latent.clone(), copy(self.residual), momentum=copy(self.momentum))

    def equals(self, other: ServerState) -> bool:
        same = lambda a, b: (a or {}).keys() == (b or {}).keys() and all(  # noqa: E731
            torch.equal(v, b[k]) for k, v in (a or {}).items())
        return (self.state.equals(other.state) and torch.equal(self.latent, other.latent)
                and same(self.residual, other.residual) and same(self.momentum, other.momentum))


def collect_updates(
    replies: Sequence[tuple[bytes, float]], spec: AdapterSpec, options: CodecOptions | None = None, *, version: int,
    round: int | None = None,
) -> tuple[list[tuple[Update, float]], list[tuple[int, str]]]:
    """Decode every reply ``(frame, num_examples)``; return (accepted, rejected ``(index, reason)``).

    A reply is rejected when its frame fails to decode, it trained from another version than
    ``version``, its frame is of another round than ``round`` (when given: a replayed frame), or its
    weight is not a positive finite number. Nothing is applied here.
    """
    accepted, rejected = [], []
    for i, (frame, weight) in enumerate(replies):
        try:
            update = decode_update(frame, spec, options)
        except CodecError as e:
            rejected.append((i, f"{type(e).__name__}: {e}"))
            continue
        if update.version != version:
            rejected.append((i, f"trained from version {update.version}, the round broadcast version {version}"))
        elif round is not None and update.round != round:
            rejected.append((i, f"frame of round {update.round} replayed in round {round}"))
        elif not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
            rejected.append((i, f"num_examples must be a positive finite number; got {weight!r}"))
        else:
            accepted.append((update, float(weight)))
    return accepted, rejected


@dataclass(frozen=True)
class RobustOptions:
    """Defences applied to decoded updates before any aggregator sees them.

    Parameters
    ----------
    max_flip_rate : float
        Reject an update that flips more than this fraction of the signs (honest clients keep to
        ``flip.budget``); 1.0 turns the check off.
    weight_cap : float
        A client's weight (its ``num_examples``) is capped at ``weight_cap`` times the round's
        median weight, so one client cannot claim the vote; 0 turns it off.
    norm_bound : float
        A client's scale delta is scaled down to at most ``norm_bound`` times the round's median
        L2 norm; 0 turns it off.

    How the kept updates are then combined (mean, trimmed mean, median) is the aggregator's
    ``scale_rule``.
    """

    max_flip_rate: float = 1.0
    weight_cap: float = 0.0
    norm_bound: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.max_flip_rate <= 1.0:
            raise ValueError(f"max flip rate must be in [0, 1]; got {self.max_flip_rate}")
        if self.weight_cap < 0 or self.norm_bound < 0:
            raise ValueError("server.weight-cap and server.norm-bound must be >= 0 (0 turns them off)")

    def apply(self, updates: Sequence[tuple[Update, float]]) -> tuple[list[tuple[Update, float]], list[tuple[int, str]]]:
        """(kept updates with capped weights and bounded deltas, rejected ``(index, reason)``)."""
        kept, rejected = [], []
        for i, (u, w) in enumerate(updates):
            count, allowed = int(u.flips.sum()), flip_allowance(u.flips.numel(), self.max_flip_rate)
            if count > allowed:
                rejected.append((i, f"flips {count} of {u.flips.numel()} signs, more than the budget's "
                                    f"floor({self.max_flip_rate} * {u.flips.numel()}) = {allowed}"))
            elif not bool(torch.isfinite(u.scale_delta).all()):
                rejected.append((i, "scale delta holds NaN or inf"))
            else:
                kept.append((u, w))
        if self.weight_cap > 0 and kept:
            cap = self.weight_cap * statistics.median(w for _, w in kept)
            kept = [(u, min(w, cap)) for u, w in kept]
        if self.norm_bound > 0 and kept:
            norms = [float(u.scale_delta.float().norm()) for u, _ in kept]
            bound = self.norm_bound * statistics.median(norms)
            kept = [(_bounded(u, n, bound), w) for (u, w), n in zip(kept, norms)]
        return kept, rejected


SCALE_RULES = ("mean", "trimmed-mean", "median")


def _bounded(u: Update, norm: float, bound: float) -> Update:
    if norm <= bound or norm == 0:
        return u
    return Update(u.round, u.version, u.flips, u.scale_delta * (bound / norm))


def combine(stack: torch.Tensor, weights: torch.Tensor, rule: str = "mean", trim: float = 0.2) -> torch.Tensor:
    """Combine K client rows ``stack`` (K, ...) coordinate-wise: weighted mean, trimmed mean or median."""
    if rule == "mean":
        w = (weights / weights.sum()).to(stack.dtype)
        return torch.tensordot(w, stack, dims=1)
    k = stack.shape[0]
    if rule == "median":  # the middle row, or the mean of the middle two
        return stack.sort(dim=0).values[(k - 1) // 2 : k // 2 + 1].mean(0)
    if rule == "trimmed-mean":
        cut = int(trim * k)
        return stack.sort(dim=0).values[cut : k - cut].mean(0)
    raise ValueError(f"unknown combine rule {rule!r}; known: {SCALE_RULES}")


@dataclass(frozen=True)
class LatentVote:
    """Weighted sign vote with latent momentum and hysteresis, and FedAvg-style scale steps.

    With client signs ``S_k = S^t ⊙ (1 - 2 F_k)`` and weights ``n_k``:
    ``V = Σ n_k S_k / Σ n_k``; ``Λ' = β Λ + (1 - β) V``; a sign flips to ``sign(Λ')`` only where
    ``|Λ'| > τ`` (ties keep the current sign); ``s' = s + η Σ n_k (s_k - s) / Σ n_k``.
    ``β = 0, τ = 0`` is a weighted majority vote (signSGD-MV); ``η = 1`` is FedAvg on the scales.

    Parameters
    ----------
    beta : float
        Latent momentum in ``[0, 1)``.
    tau : float
        Hysteresis threshold in ``[0, 1)``.
    eta : float
        Server learning rate on the scales, ``> 0``.
    flip_noise : float
        ``p`` of the clients' randomized response on their flip bits (``dp.flip-epsilon``): each
        received bit is debiased, ``(F~ - p) / (1 - 2p)``, and the vote clamped to ``[-1, 1]``.
    """

    beta: float = 0.0
    tau: float = 0.0
    eta: float = 1.0
    scale_rule: str = "mean"
    trim: float = 0.2
    flip_noise: float = 0.0

    def __post_init__(self):
        if self.scale_rule not in SCALE_RULES:
            raise ValueError(f"scale_rule must be one of {SCALE_RULES}; got {self.scale_rule!r}")
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"beta (latent momentum) must be in [0, 1); got {self.beta}")
        if not 0.0 <= self.tau < 1.0:
            raise ValueError(f"tau (hysteresis) must be in [0, 1): |Λ| never exceeds 1; got {self.tau}")
        if not self.eta > 0.0:
            raise ValueError(f"eta (server scale learning rate) must be positive; got {self.eta}")
        if not 0.0 <= self.flip_noise < 0.5:
            raise ValueError(f"flip_noise (randomized response flip probability) must be in [0, 0.5); got {self.flip_noise}")

    def __call__(self, server: ServerState, updates: Sequence[tuple[Update, float]], budget: float = 1.0) -> ServerState:
        """One aggregation step; returns a new state at version ``t + 1``. ``budget`` (the round's
        ``server.flip-budget``) is not used: the vote flips where the weighted latent crosses the
        hysteresis ``tau``, bounded by the clients' own budgets."""
        if not updates:
            raise ValueError("no updates to aggregate; keep the current state when every reply failed")
        old = server.state
        for update, _ in updates:
            if update.version != old.version:
                raise ValueError(f"update trained from version {update.version}, the server is at {old.version}")
        total = math.fsum(w for _, w in updates)
        # float64: weights up to 2^40 (the reply check's bound) times any count of flips stay exact and finite
        flip_mass = torch.zeros_like(server.latent, dtype=torch.float64)  # (n_bits,) Σ n_k F_k
        p = self.flip_noise
        for update, w in updates:
            flip_mass += w * update.flips.to(flip_mass.dtype)
        if p > 0:  # unbiased: E[F~] = p + (1 - 2p) F
            flip_mass = (flip_mass - p * total) / (1.0 - 2.0 * p)
        deltas = torch.stack([u.scale_delta.to(old.scales.dtype) for u, _ in updates])  # (K, n_scales)
        weights = torch.tensor([w for _, w in updates], dtype=torch.float64)
        scale_step = combine(deltas, weights, self.scale_rule, self.trim)  # (n_scales,)
        vote = old.signs(torch.float64) * (1.0 - 2.0 * flip_mass / total).clamp(-1.0, 1.0)  # (n_bits,)
        latent = (self.beta * server.latent.double() + (1.0 - self.beta) * vote).to(server.latent.dtype)
        if not (bool(torch.isfinite(latent).all()) and bool(torch.isfinite(scale_step).all())):
            raise FloatingPointError("the aggregate latent or scale step is not finite; the round's state is kept")
        wants = latent < 0
        negative = torch.where((wants != old.negative) & (latent.abs() > self.tau), wants, old.negative)
        scales = old.scales + self.eta * scale_step
        return ServerState(AdapterState(old.version + 1, negative, scales), latent, server.residual,
                           momentum=server.momentum)


REFIT_MODES = ("faithful", "svd")


def layer_product(s1: torch.Tensor, s2: torch.Tensor, sc: dict[str, torch.Tensor], layer) -> torch.Tensor:
    """``diag(s_out) S2 diag(s_mid) S1 diag(s_in)`` (out, in) in float64; absent scales are ones."""
    one = lambda n: torch.ones(n, dtype=torch.float64)  # noqa: E731
    b = s2.double() * sc["mid"].double()[None, :] if "mid" in sc else s2.double()
    b = b * sc["out"].double()[:, None] if "out" in sc else b  # (out, r)
    a = s1.double() * (sc["in"].double() if "in" in sc else one(layer.in_features))[None, :]  # (r, in)
    return b @ a  # (out, in)


@dataclass(frozen=True)
class Refit:
    """Average the clients' exact adapter products and re-fit a LoRDBA factorization per layer.

    Client ``k``'s layer product is ``ΔW_k = diag(s_out) S2 diag(s_mid) S1 diag(s_in)`` with its
    signs ``S^t XOR F_k`` and scales ``s^t + d_k``; the server forms the target
    ``Σ n_k ΔW_k / Σ n_k`` (plus, with ``error_feedback``, the part of earlier targets the broadcast
    could not represent) and fits signs and scales to it.

    ``mode="faithful"`` (default) starts from the current carriers and the clients' averaged scales
    and only takes steps that lower the fit error (:func:`lordba_fl.adapter.fit.refine_lordba`): a round in
    which no client changes anything leaves the adapter exactly as it was; the round's ``budget``
    (``server.flip-budget`` as the LoRDBA method schedules it) caps the signs a round changes per layer (the largest error reductions win), which bounds the downlink's
    sign churn. With ``restart``, a fresh
    SVD fit of the target, its components aligned to the current carriers, is refined too and kept
    when its error is lower. ``mode="svd"`` is the first design: signs of a fresh SVD, the current
    carriers discarded (not idempotent; kept for comparison).

    With ``quorum`` k > 1, a client's sign flip enters the target only where at least k of the
    round's clients flipped that sign (``server.flip-quorum``): flips no other client confirms are
    treated as local noise and the client's product is formed on the current sign there (its scale
    delta stands). ``info["quorum_kept"]`` is the fraction of the clients' flips kept.

    With a server learning rate ``eta`` != 1 (``server.eta``) the target is the current product plus
    ``eta`` times the round's averaged change, ``ΔW^t + η (Σ n_k ΔW_k / Σ n_k - ΔW^t)``, and the
    warm-start scales move by ``η`` times the averaged scale delta (FedOpt's server step applied to the
    exact products; ``eta = 1`` is the plain average). A round in which no client changes anything
    still leaves the adapter exactly as it was. With ``momentum`` β > 0 (``server.momentum``) the
    change is FedAvgM's: ``M^t = β M^{t-1} + (Σ n_k ΔW_k / Σ n_k - ΔW^t)`` per layer, kept by the server
    (``ServerState.momentum``, one fp32 ``(out, in)`` matrix a layer), and the target is
    ``ΔW^t + η M^t``; a quiet round then still moves by the momentum.

    The round's relative fit error per layer (broadcast against target, the paper's
    residual-to-magnitude ratio) is returned in ``ServerState.info["fit_error"]``.
    """

    spec: AdapterSpec
    sweeps: int = 3
    scale_rule: str = "mean"
    trim: float = 0.2
    mode: str = "faithful"
    passes: int = 3
    restart: bool = False
    error_feedback: bool = False
    quorum: int = 1
    eta: float = 1.0
    momentum: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"server.momentum must be in [0, 1) (0: off); got {self.momentum!r}")
        if not (self.eta > 0.0 and math.isfinite(self.eta)):
            raise ValueError(f"server.eta (the server's learning rate on the averaged change) must be a finite number > 0 "
                             f"(1: the plain average); got {self.eta!r}")
        if self.mode not in REFIT_MODES:
            raise ValueError(f"server.refit must be one of {REFIT_MODES}; got {self.mode!r}")
        if self.error_feedback and self.mode != "faithful":
            raise ValueError("server.error-feedback needs server.refit='faithful'")
        if not (isinstance(self.quorum, int) and self.quorum >= 1):
            raise ValueError(f"server.flip-quorum must be an integer >= 1 (1: every client flip counts); got {self.quorum!r}")

    def __call__(self, server: ServerState, updates: Sequence[tuple[Update, float]], budget: float = 1.0) -> ServerState:
        """One aggregation step; ``budget``: the most of each layer's signs this round may change (1: no limit)."""
        if not 0.0 <= budget <= 1.0:
            raise ValueError(f"server.flip-budget must be a fraction in [0, 1] (1: no limit); got {budget}")
        if not updates:
            raise ValueError("no updates to aggregate; keep the current state when every reply failed")
        old = server.state
        total = sum(w for _, w in updates)
        weights = torch.tensor([w for _, w in updates], dtype=torch.float64)
        negative = old.negative.clone()
        deltas = torch.stack([u.scale_delta.float() for u, _ in updates])  # (K, n_scales)
        scales = old.scales + self.eta * combine(deltas, weights, self.scale_rule, self.trim).float()  # warm start: averaged scales
        new_neg = split_carriers(self.spec, negative)
        new_scales = split_scales(self.spec, scales)
        old_signs = split_carriers(self.spec, old.signs())
        old_scales = split_scales(self.spec, old.scales)
        flips = [u.flips for u, _ in updates]
        info = {}
        if self.quorum > 1:
            count = torch.stack(flips).sum(0, dtype=torch.int32)  # clients flipping each sign (updates: not empty)
            confirmed = count >= self.quorum
            sent = sum(int(f.sum()) for f in flips)
            flips = [f & confirmed for f in flips]
            info["quorum_kept"] = sum(int(f.sum()) for f in flips) / sent if sent else 1.0
        clients = [
            (split_carriers(self.spec, old.signs() * (1.0 - 2.0 * f.float())),
             split_scales(self.spec, old.scales + u.scale_delta.float()), w)
            for f, (u, w) in zip(flips, updates)
        ]
        residual = dict(server.residual or {})
        momentum = dict(server.momentum or {})
        errors = {}
        for layer in self.spec.layers:
            name = layer.name
            products = [layer_product(*carriers[name], sc[name], layer) for carriers, sc, _ in clients]
            if self.scale_rule == "mean":
                target = sum((w / total) * prod for prod, (_, _, w) in zip(products, clients))
            else:
                target = combine(torch.stack(products), weights, self.scale_rule, self.trim)  # (out, in)
            del products
            if self.eta != 1.0 or self.momentum > 0:  # the server's step: current product + eta x the (momentum) change
                current = layer_product(*old_signs[name], old_scales[name], layer)
                change = target - current
                if self.momentum > 0:
                    if name in momentum:
                        change = change + self.momentum * momentum[name].double()
                    momentum[name] = change.float()
                target = current + self.eta * change
                del current, change
            if self.error_feedback and name in residual:
                target = target + residual[name].double()
            if not bool(target.abs().max() > 0):
                continue  # every product is zero (e.g. s_out still 0): keep the signs, averaged scales stand
            a_neg, b_neg = new_neg[name]
            if self.mode == "svd":
                l1, l2, fitted, err = fit_lordba(target, layer.rank, self.spec.scales, self.sweeps)
                s1, s2 = (l1 < 0), (l2 < 0)
            else:
                s1_old, s2_old = old_signs[name]
                warm = {k: v for k, v in new_scales[name].items()}
                limit = None if budget >= 1.0 else flip_allowance(layer.n_bits, budget)
                f1, f2, fitted, err = fit_from(target, s1_old, s2_old, warm, self.spec.scales, restart=self.restart,
                                               max_flips=limit,
                                               sweeps=self.sweeps, passes=self.passes)
                s1, s2 = (f1 < 0), (f2 < 0)
                if self.error_feedback:
                    fit = layer_product(f1, f2, fitted, layer)
                    residual[name] = (target - fit).float()
            errors[name] = err
            a_neg.copy_(s1)
            b_neg.copy_(s2)
            for kind, view in new_scales[name].items():
                view.copy_(fitted[kind].float())
        state = AdapterState(old.version + 1, negative, scales)
        info["fit_error"] = errors
        return ServerState(state, state.signs(), residual if self.error_feedback else None, info,
                           momentum if self.momentum > 0 else None)


# --------------------------------------------------------------------------------------------------
# Factories registered in :data:`lordba_fl.registry.AGGREGATORS`: ``factory(spec, cfg) -> aggregator``,
# an aggregator being ``(ServerState, [(Update, weight)], budget) -> ServerState`` (a new state at
# version ``t + 1``; ``info`` may carry per-layer diagnostics such as ``fit_error``; ``budget`` is the
# round's server flip budget, scheduled by the LoRDBA method). ``cfg`` is the method's settings; a
# user's aggregator (``server.aggregator = "pkg.module:factory"``) has the same signatures.


def make_vote(spec: AdapterSpec, cfg) -> LatentVote:
    """``server.aggregator = "vote"``: :class:`LatentVote` from ``server.beta/tau/eta/scale-rule/trim``."""
    return LatentVote(cfg.beta, cfg.tau, cfg.eta, scale_rule=cfg.scale_rule, trim=cfg.trim,
                      flip_noise=cfg.dp.flip_noise if cfg.dp.on else 0.0)


def make_refit(spec: AdapterSpec, cfg) -> Refit:
    """``server.aggregator = "refit"``: :class:`Refit` from ``server.refit/refit-restart/error-feedback``."""
    return Refit(spec, scale_rule=cfg.scale_rule, trim=cfg.trim, mode=cfg.refit_mode, restart=cfg.refit_restart,
                 error_feedback=cfg.error_feedback and cfg.refit_mode == "faithful", quorum=cfg.flip_quorum,
                 eta=cfg.eta, momentum=cfg.server_momentum)
