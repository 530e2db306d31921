"""LoRDBA's settings: the run's shared values it reads and its own run-config keys (flips, codec,
init, aggregator, client state, DP), declared, typed and checked here."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lordba_fl.adapter.config import SCALE_INITS, SCALE_LRS, SCALE_NAMES, SIGN_INITS
from lordba_fl.methods.base import MethodSettings
from lordba_fl.methods.lordba.aggregation import REFIT_MODES, SCALE_RULES
from lordba_fl.methods.lordba.budgets import FlipControl
from lordba_fl.methods.lordba.codec import SCALE_ROUNDINGS
from lordba_fl.methods.lordba.clientstate import STATE_DTYPES, STATE_KINDS
from lordba_fl.methods.lordba.privacy import DPConfig
from lordba_fl.options import option
from lordba_fl.registry import AGGREGATORS


@dataclass(frozen=True)
class LoRDBASettings(MethodSettings):
    """A LoRDBA federation's settings: the run's shared values it reads (scales, rounds, tiers, ...)
    and its own run-config keys (flips, codec, init, aggregator, client state and DP), declared here
    and documented in docs/configuration.md."""

    weight_cap: float
    rounds: int  # dp: the noise is calibrated over the run
    tiers: str  # hetero.tiers: nested ranks per partition
    top_rank: int  # a lower tier's node: the run's rank (its version 0 is nested in that rank's)
    # ---- its own keys ----
    scales: tuple[str, ...] = option(("mid", "out"), "scales",
        "channel-wise scales trained and sent: a comma list of in, mid, out")
    flip: FlipControl = FlipControl()
    aggregator: str = option("refit", "server.aggregator", "refit | vote, or an aggregator factory by import path 'pkg.module:make'")
    refit_mode: str = option("faithful", "server.refit",
        "faithful (warm-started, flips only where the fit error falls) | svd (first design: fresh SVD signs)")
    refit_restart: bool = option(False, "server.refit-restart",
        "also try a fresh SVD fit aligned to the current carriers; keep the better")
    error_feedback: bool = option(True, "server.error-feedback",
        "faithful refit: add the part of the last target the broadcast could not represent to the next (server RAM: one fp32 dW per layer)")
    server_flip_budget_start: float = option(0.04, "server.flip-budget-start",
        "refit: round 1's server.flip-budget, halving each round down to it (0: no schedule; off under dp.mode=local)")
    server_flip_budget: float = option(0.0, "server.flip-budget",
        "refit: the floor of the most of each layer's signs a round may change, once server.flip-budget-start has halved down to it (largest error reductions first; 1: no limit)")
    flip_quorum: int = option(1, "server.flip-quorum",
        "refit: a client's sign flip counts only where at least this many of the round's clients flipped it (1: all count)")
    seeded_base: bool = option(True, "server.seeded-base",
        "a node's first downlink is a delta against the seeded version 0 every party builds (not with init.from / base-svd)")
    state_mantissa_bits: int = option(7, "codec.state-mantissa-bits",
        "mantissa bits of broadcast scales (10: fp16; 7: bfloat16 precision, cheaper downlink deltas)")
    state_scale_encoding: str = option("fp16", "codec.state-scale-encoding",
        "downlink scale deltas: fp16 (exact XOR of fp16 bits) | q8 | q4 | q3 | q2 (codes of the difference to what the node holds; the server keeps each node's scales: 4 bytes a scale per node)")
    scale_init: str = option("normalized", "init.scales",
        "normalized (s_in = 1/sqrt(in), s_mid = 1/sqrt(r): LoRA-sized steps) | ones")
    scale_lr: str = option("uniform", "scale-lr",
        "uniform (every scale at lr) | relative (lr times the scale's normalized init over the full set's: s_mid at lr/sqrt(in) without s_in)")
    scale_lr_ratio: float = option(2.0, "scale-lr-ratio",
        "the scales train at this x lr, the latents at flip.latent-lr (as LoRA+ gives B its own ratio): once the "
        "federation's signs settle, the scales are the adapter's only moving part (1: the scales at lr)")
    sign_init: str = option("random", "init.signs",
        "random (seeded) | base-svd (top singular vectors of each frozen base weight, zero bytes)")
    init_from: str = option("", "init.from",
        "start from an adapter: a PEFT LoRA directory (svd import) or a packed LoRDBA .safetensors")
    warmup_rounds: int = option(0, "init.warmup-rounds",
        "first rounds train float factors on the device and fit them to signs there (QAT-full, federated)")
    warmup_budget: float = option(1.0, "init.warmup-budget",
        "flip budget of a warm-up round (1: no limit, the device fit may also restart from its own SVD)")
    beta: float = option(0.0, "server.beta", "latent momentum")
    tau: float = option(0.0, "server.tau", "hysteresis")
    eta: float = option(1.0, "server.eta",
        "server learning rate: vote: x the averaged scale step; refit: x the round's averaged change of each layer's product (1 = FedAvg)")
    server_momentum: float = option(0.0, "server.momentum",
        "refit: FedAvgM momentum of each layer's product change, kept by the server (one fp32 (out, in) matrix a layer; 0: off)")
    scale_encoding: str = option("q8", "codec.scale-encoding",
        "uplink scale deltas: q8 | q4 | q3 | q2 (codes in [-127,127] / [-7,7] / [-3,3] / [-1,1], one fp16 step per layer, rounded as "
        "codec.scale-rounding says) | fp16")
    scale_rounding: str = option("stochastic", "codec.scale-rounding",
        "q8/q4/q3/q2 uplink codes: stochastic (no-clip step, unbiased) | nearest (the least-squares step per layer, "
        "codes clip; biased toward zero: pair it with codec.scale-error-feedback)")
    scale_error_feedback: bool = option(False, "codec.scale-error-feedback",
        "each client keeps what quantizing its scale delta lost and adds it to its next one (state: 4 bytes a scale)")
    scale_fraction: float = option(1.0, "codec.scale-fraction",
        "share of the s_in/s_out scale entries a frame's deltas carry, whole layers by mean squared delta first, s_mid always "
        "(up, and down with codec.state-scale-encoding q8|q4|q3|q2); the rest waits in the sender's error feedback (1: all)")
    rebase_scales: bool = option(True, "server.rebase-scales",
        "with codec.state-scale-encoding q8|q4|q3|q2: a node's scales count as the ones it holds plus its delta (true), "
        "or its delta as a change to the global scales (false: what the node's held scales lag by does not enter the average)")
    history: int = option(16, "server.history",
        "versions kept for downlink deltas (a node back after more rounds gets a delta against version 0; server RAM: ~1 byte a sign per version)")
    enforce_budget: bool = option(True, "server.enforce-budget", "reject updates flipping more than flip.budget of the signs")
    norm_bound: float = option(2.0, "server.norm-bound",
        "bound a scale delta's L2 norm at this x the round's median (0: off; never fires on honest clients: simulations/bench_faults.py)")
    scale_rule: str = option("mean", "server.scale-rule",
        "mean | trimmed-mean | median: scale deltas (vote) / client products (refit)")
    trim: float = option(0.2, "server.trim", "fraction trimmed at each end by trimmed-mean")
    dp: DPConfig = DPConfig()
    client_state: str = option("none", "client.state", "none | latent | latent+optimizer: kept per client in context.state")
    client_state_dtype: str = option("q8", "client.state-dtype", "fp32 | fp16 | q8 (log-coded bytes) for stored latents / moments")

    def __post_init__(self):
        for key, value, known in (("server.refit", self.refit_mode, REFIT_MODES), ("init.scales", self.scale_init, SCALE_INITS),
                                  ("scale-lr", self.scale_lr, SCALE_LRS), ("init.signs", self.sign_init, SIGN_INITS),
                                  ("server.scale-rule", self.scale_rule, SCALE_RULES),
                                  ("codec.scale-encoding", self.scale_encoding, ("q8", "q4", "q3", "q2", "fp16")),
                                  ("codec.state-scale-encoding", self.state_scale_encoding, ("fp16", "q8", "q4", "q3", "q2")),
                                  ("codec.scale-rounding", self.scale_rounding, SCALE_ROUNDINGS),
                                  ("client.state", self.client_state, STATE_KINDS),
                                  ("client.state-dtype", self.client_state_dtype, STATE_DTYPES)):
            if value not in known:
                raise ValueError(f"run config {key!r} must be one of {list(known)}; got {value!r}")
        if not self.scales or not set(self.scales) <= set(SCALE_NAMES):
            raise ValueError(f"run config 'scales' must be a non-empty comma list of in, mid, out; got {self.scales!r}")
        object.__setattr__(self, "scales", tuple(s for s in SCALE_NAMES if s in self.scales))  # canonical order
        AGGREGATORS.get(self.aggregator)  # an import path is imported now: a typo fails at start
        for key, value, ok, accepted in (
            ("server.history", self.history, self.history >= 1, ">= 1 (sign versions kept)"),
            ("scale-lr-ratio", self.scale_lr_ratio, 0 < self.scale_lr_ratio < float("inf"), "a number > 0 (1: the scales at lr)"),
            ("server.trim", self.trim, 0.0 <= self.trim < 0.5, "in [0, 0.5)"),
            ("server.momentum", self.server_momentum, 0.0 <= self.server_momentum < 1.0, "in [0, 1) (0: off)"),
            ("server.eta", self.eta, 0.0 < self.eta < float("inf"), "a finite number > 0 (1: the plain average)"),
            ("server.flip-quorum", self.flip_quorum, self.flip_quorum >= 1, "an integer >= 1 (1: every client flip counts)"),
            ("server.norm-bound", self.norm_bound, self.norm_bound >= 0, ">= 0 (0: off)"),
            ("server.flip-budget", self.server_flip_budget, 0.0 <= self.server_flip_budget <= 1.0, "a fraction in [0, 1] (1: no limit)"),
            ("server.flip-budget-start", self.server_flip_budget_start, 0.0 <= self.server_flip_budget_start <= 1.0,
             "a fraction in [0, 1] (0: no schedule)"),
            ("codec.state-mantissa-bits", self.state_mantissa_bits, 1 <= self.state_mantissa_bits <= 10,
             "in 1..10 (10: fp16, 7: bfloat16's precision)"),
            ("init.warmup-rounds", self.warmup_rounds, self.warmup_rounds >= 0, ">= 0"),
            ("codec.scale-fraction", self.scale_fraction, 0.0 < self.scale_fraction <= 1.0, "a fraction in (0, 1] (1: every segment)"),
            ("init.warmup-budget", self.warmup_budget, 0.0 <= self.warmup_budget <= 1.0, "a fraction in [0, 1] (1: no limit)"),
        ):
            if not ok:
                raise ValueError(f"run config {key!r} must be {accepted}; got {value!r}")
        if self.server_momentum > 0 and self.aggregator != "refit":
            raise ValueError(f"server.momentum steps the refit's product change; server.aggregator is {self.aggregator!r}: "
                             "set server.aggregator=refit, or server.momentum=0 (the vote's own momentum is server.beta)")
        if self.scale_fraction < 1.0 and not self.scale_error_feedback:
            raise ValueError("codec.scale-fraction < 1 leaves part of each client's scale delta for a later round, which "
                             "only codec.scale-error-feedback keeps: set codec.scale-error-feedback=true, or codec.scale-fraction=1")
        if self.scale_fraction < 1.0 and self.state_scale_encoding != "fp16" and self.rebase_scales:
            raise ValueError("codec.scale-fraction < 1 leaves part of a node's scales behind the global ones until a later "
                             "downlink, and server.rebase-scales=true would count what they lag by in the average: "
                             "set server.rebase-scales=false (or codec.scale-fraction=1)")
        if self.stateful and self.flip.select == "gradient":
            raise ValueError("client.state keeps each node's latent magnitudes, which flip.select=gradient does not "
                             "train (its latents stay at +-flip.m0): set client.state=none or flip.select=latent")
        if self.client_state == "latent+optimizer" and self.train.optimizer != "adamw":
            raise ValueError("client.state=latent+optimizer keeps AdamW moments; set train.optimizer=adamw "
                             "or client.state=latent")
        if self.dp.on:
            if self.aggregator != "vote":
                raise ValueError("dp.mode=local privatizes flip masks and scale deltas aggregated by the vote; "
                                 f"set server.aggregator=vote (got {self.aggregator!r})")
            if self.scale_error_feedback:
                raise ValueError("codec.scale-error-feedback carries a client's past deltas into the next, which "
                                 "dp.mode's per-round noise does not account for: turn one of them off")
            if self.warmup_rounds:
                raise ValueError("init.warmup-rounds sends device-fitted updates that dp.mode=local does not privatize; "
                                 "set init.warmup-rounds=0 under DP")
            if self.flip.flip_budget == 0:
                raise ValueError("dp.mode=local calibrates its noise to one flip budget for every round, and "
                                 "flip.budget = 0 (the default: the budget halves down to none) would flip nothing: "
                                 "set flip.budget > 0, e.g. 0.02")
            # dp.mode=local calibrates its noise to one flip budget for the whole run: no schedule
            object.__setattr__(self, "flip", dataclasses.replace(self.flip, budget_start=0.0))
            object.__setattr__(self, "server_flip_budget_start", 0.0)

    @property
    def stateful(self) -> bool:
        return self.client_state != "none"
