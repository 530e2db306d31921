"""Quality-vs-bytes frontier: LoRDBA variants against LoRA baselines at several ranks, one harness.

For each task (``shakespeare``, ``gsm``) every run sees the same data, seed, sampling and settings
(``SETTINGS`` + ``TASK_SETTINGS``); only the method, its rank (alpha = 2 x rank) and its learning rate
change. The runs: the default variant (``DEFAULT_VARIANTS``: the library's defaults) at ranks 16 and
32, ``lora-fedavg`` at ranks 1, 2, 4, 16, ``lora-q2`` at 4, 16 and ``ffa-lora`` at 16 (``BASELINES``):
9 runs per task and seed (shakespeare: ~5 min a LoRA run, ~6-7 min a LoRDBA run on 2 idle cores,
measured). The other ``LORDBA_VARIANTS`` are the ablations (``--only NAME``). Each run is
``simulations.run`` on Flower's simulation engine in a fresh process (``simulations.common.launch``).

Usage::

    python -m simulations.frontier                    # both tasks, SmolLM2-135M (shakespeare ~50 min on 2 cores)
    python -m simulations.frontier --task gsm         # one task
    python -m simulations.frontier --quick            # tiny model, 2 rounds, 3 runs per task: a smoke run
    python -m simulations.frontier --replot results/frontier/frontier.jsonl   # plots + pareto lines, no run
    python -m simulations.frontier --only lordba-vote-flips lora-fedavg-r16 --ranks 8 16 --seeds 0 1
    python -m simulations.frontier --run-config "rounds=20 train.local-steps=2"  # any setting, every run

``--only`` takes variant names (every rank) or ``<name>-r<rank>`` (one run); ``--ranks`` replaces the
LoRDBA ranks; ``--lr-file`` (default ``results/centralized.jsonl``, used when it exists) takes the
learning rates from its last ``{"kind": "chosen_lr", "task": ..., "model": ..., "lrs": {...}}`` line
for the task and model (written by ``simulations.centralized``; ``lora`` -> every LoRA baseline,
``lordba-scratch`` -> every LoRDBA variant), else ``LEARNING_RATES``.

Output (``--out-dir``, default ``results/frontier``; ``results/frontier-quick`` with ``--quick``):

- ``frontier.jsonl``: one ``kind: "run"`` line per run (see :func:`summarize`), then one
  ``kind: "pareto"`` line per task (see :func:`pareto_record`);
- ``frontier.png``: final eval loss against cumulative bytes per client (log x), one panel per task,
  one marker per method family, each point labelled with its rank, the Pareto front dashed;
- ``frontier_curves.png``: eval loss by round for every run, one panel per task;
- ``<task>/<name>-r<rank>-s<seed>/``: each run's own folder (``rounds.jsonl``, CSV, adapter).

The jsonl accumulates across invocations (``--only`` adds runs to it); the pareto lines, the ratios
of a run whose reference ran earlier, and the plots use the last record of each (task, variant,
rank, seed) in it.

Bytes (Flower wire bytes of training messages; the evaluation round trip is off and the one-off
partition query is not counted): *bytes per client-round* in a direction is the total sent in that
direction over the run divided by the number of client-rounds in it (messages metered: one per
sampled client down, one per replying client up); *cumulative bytes per client* is that times the
rounds completed, i.e. what one client taking part in every round would send (up) or receive (down)
over the run. Ratios (``*_ratio_to_ref``) are this run's value divided by the ``lora-fedavg`` r = 16
run's of the same task and seed (< 1: fewer bytes / lower loss than LoRA FedAvg).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from simulations.common import emit, launch
from simulations.run import QUICK, project_run_config

# ---- what runs ------------------------------------------------------------------------------------
# LoRDBA variants: name -> run-config overrides (each run at every rank of LORDBA_RANKS)
# (normalized scale init everywhere: the default). "flips": clients can flip (m0 = 0.002 < E * lr) and
# spend a 5% budget. "lean": what bytes allow: output-side scales only (s_mid, s_out: half the scale
# bytes), a 2% client budget, the refit changing at most 0.5% of each layer's signs a round (downlink
# sign churn), broadcast scales at 7 mantissa bits (cheaper XOR deltas). "warmup": 2 float-factor
# rounds fitted on the device first; "ef": the refit's residual fed back; "base-svd": signs from the base;
# "hot": client / server budgets start at 8% / 4% and halve each round down to 2% / 0.5%.
# Every variant states its flip settings in full, so that it keeps its meaning when the library's
# defaults change (the budget applied once, after local training: the library's way until
# flip.every-step became the default).
_FLIPS = {"flip.m0": 0.002, "flip.budget": 0.05}
# the wire's scale settings every variant starts from (8-bit stochastic uplink codes, exact fp16 XOR
# downlink deltas, every segment each round), stated so a variant keeps its meaning when the defaults change
_WIRE = {"codec.scale-encoding": "q8", "codec.scale-rounding": "stochastic", "codec.scale-error-feedback": False,
         "codec.state-scale-encoding": "fp16", "codec.scale-fraction": 1.0, "server.rebase-scales": True}
_NO_SCHEDULE = {**_WIRE, "flip.budget-start": 0.0, "server.flip-budget-start": 0.0,  # the budgets every round
                "flip.every-step": False, "server.history": 4,  # 4 kept versions: the library's until 16
                "scale-lr-ratio": 1.0}  # the scales at lr: the library's until the ratio 2
_LEAN = {**_NO_SCHEDULE, "method": "lordba", "server.aggregator": "refit", "scales": "mid,out", "flip.m0": 0.002,
         "flip.budget": 0.02,
         "server.flip-budget": 0.005, "codec.state-mantissa-bits": 7}
# the library's former defaults: the lean settings, the refit's error feedback, and budgets that start
# at 8% / 4% and halve each round down to the lean ones ("hot"); the defaults now (pyproject.toml) are
# these with the per-step budget and budgets halving all the way down (lordba-step-decay)
_DEFAULTS = {**_LEAN, "server.error-feedback": True, "flip.budget-start": 0.08, "server.flip-budget-start": 0.04}
_DECAY = {"flip.budget": 0.0, "server.flip-budget": 0.0}  # the budgets halve all the way to zero
# the defaults now (lordba-step-decay-h16-lr2): 16 kept versions, the scales at twice lr
_NOW = {**_DEFAULTS, **_DECAY, "flip.every-step": True, "server.history": 16, "scale-lr-ratio": 2.0}
_Q2_BOTH = {"codec.scale-encoding": "q2", "codec.scale-error-feedback": True, "codec.state-scale-encoding": "q2"}


def _nearest_both(enc: str) -> dict:
    """``enc`` scale codes both ways, the uplink's rounded to nearest with the client's error feedback."""
    return {"codec.scale-encoding": enc, "codec.scale-error-feedback": True, "codec.state-scale-encoding": enc,
            "codec.scale-rounding": "nearest"}



LORDBA_VARIANTS: dict[str, dict] = {
    "lordba-lean-ef": {**_LEAN, "server.error-feedback": True},
    "lordba-lean": {**_LEAN, "server.error-feedback": False},
    # early rounds flip more (the signs have most to learn there): budgets halve each round to the lean ones
    "lordba-lean-ef-hot": dict(_DEFAULTS),  # = the former defaults
    # cheaper uplink scales: 4 / 2-bit deltas (unbiased rounding), alone and with client error feedback
    "lordba-q4": {**_DEFAULTS, "codec.scale-encoding": "q4"},
    "lordba-q4-sef": {**_DEFAULTS, "codec.scale-encoding": "q4", "codec.scale-error-feedback": True},
    "lordba-q2-sef": {**_DEFAULTS, "codec.scale-encoding": "q2", "codec.scale-error-feedback": True},
    # capacity levers, each alone over the defaults. 4x the late-round flip budgets (client 8% every round,
    # server 4%, 2%, 2%, ...: do the budgets withhold capacity?)
    "lordba-wide": {**_DEFAULTS, "flip.budget": 0.08, "flip.budget-start": 0.0, "server.flip-budget": 0.02},
    # the budgets keep halving to zero (client 8%, 4%, 2%, ...; server 4%, 2%, 1%, ...): late rounds train
    # the scales on settled signs, and the flip masks (40% of the bytes) fade out
    "lordba-decay": {**_DEFAULTS, **_DECAY},
    # agreement instead of a schedule: a client's flip enters the refit's target only where another
    # client of the round made it too
    "lordba-quorum": {**_DEFAULTS, "server.flip-quorum": 2},
    # the sign vote with FedAvg scales (server.beta = 0: a sign flips where most of the round's clients
    # flipped it) instead of the refit
    "lordba-vote": {**_LEAN, "server.aggregator": "vote", "flip.budget-start": 0.08},
    # signs from the frozen base's principal directions (zero bytes); one warm-up round of float factors
    # fitted on the device (informed signs); clients keeping their own sign latents across the rounds
    # they join (evidence accumulates)
    "lordba-hot-base-svd": {**_DEFAULTS, "init.signs": "base-svd"},
    "lordba-hot-warmup": {**_DEFAULTS, "init.warmup-rounds": 1},
    "lordba-hot-state": {**_DEFAULTS, "client.state": "latent"},
    # the flip budget applied after every local step: clients train their scales on the signs they send
    "lordba-step": {**_DEFAULTS, "flip.every-step": True},
    # the levers together: the per-step budget with the decaying budgets, and with the sign vote
    "lordba-step-decay": {**_DEFAULTS, **_DECAY, "flip.every-step": True},
    # the byte levers over the defaults (lordba-step-decay): uplink scale deltas at 4 / 2 bits with
    # the client's error feedback
    "lordba-step-decay-q4-sef": {**_DEFAULTS, **_DECAY, "flip.every-step": True, "codec.scale-encoding": "q4",
                                 "codec.scale-error-feedback": True},
    "lordba-step-decay-q2-sef": {**_DEFAULTS, **_DECAY, "flip.every-step": True, "codec.scale-encoding": "q2",
                                 "codec.scale-error-feedback": True},
    # the downlink's scales as 4 / 2-bit codes toward what each node holds (the server keeps every
    # node's scales), alone and with the 2-bit uplink
    "lordba-step-decay-down-q4": {**_DEFAULTS, **_DECAY, "flip.every-step": True, "codec.state-scale-encoding": "q4"},
    "lordba-step-decay-down-q2": {**_DEFAULTS, **_DECAY, "flip.every-step": True, "codec.state-scale-encoding": "q2"},
    "lordba-step-decay-q2-both": {**_DEFAULTS, **_DECAY, "flip.every-step": True, "codec.scale-encoding": "q2",
                                  "codec.scale-error-feedback": True, "codec.state-scale-encoding": "q2"},
    # 16 kept versions instead of 4: a node back after more than 4 rounds gets a delta against the
    # version it holds, not against version 0 (bytes only in the exact downlink)
    "lordba-step-decay-h16": {**_DEFAULTS, **_DECAY, "flip.every-step": True, "server.history": 16},
    "lordba-step-decay-q2-both-h16": {**_DEFAULTS, **_DECAY, "flip.every-step": True, "codec.scale-encoding": "q2",
                                      "codec.scale-error-feedback": True, "codec.state-scale-encoding": "q2",
                                      "server.history": 16},
    # the scales at twice lr (scale-lr-ratio = 2): federated, the settled signs leave the scales as the
    # adapter's moving part (lr swept on an in-process replay of the skills run, seed 0): the defaults now
    "lordba-step-decay-h16-lr2": dict(_NOW),
    # the 2-bit scale deltas both ways (client and server error feedback) over the defaults now
    "lordba-step-decay-q2-both-h16-lr2": {**_NOW, **_Q2_BOTH},
    # the same with the uplink's codes rounded to nearest at the least-squares step (the client's error
    # feedback carries what they drop) instead of stochastically at the no-clip step
    "lordba-step-decay-q2n-both-h16-lr2": {**_NOW, **_nearest_both("q2")},
    # 4-bit scale deltas both ways (nearest rounding, the client's and the server's error feedback)
    "lordba-step-decay-q4n-both-h16-lr2": {**_NOW, **_nearest_both("q4")},
    # the 2 / 4-bit codes both ways with a node's delta a change to the global scales (what its held
    # scales lag by stays out of the average: server.rebase-scales = false)
    "lordba-step-decay-q2n-both-norebase-h16-lr2": {**_NOW, **_nearest_both("q2"), "server.rebase-scales": False},
    "lordba-step-decay-q4n-both-norebase-h16-lr2": {**_NOW, **_nearest_both("q4"), "server.rebase-scales": False},
    # 3-bit codes (in [-3, 3]) both ways, otherwise the same
    "lordba-step-decay-q3n-both-h16-lr2": {**_NOW, **_nearest_both("q3")},
    # the 4-bit codes carrying half the out-scale entries a round (the segments with the largest mean squared
    # delta; the rest waits in the client's and the server's error feedback); a node's delta is a change
    # to the global scales (what its held scales lag by stays out of the average)
    "lordba-step-decay-q4n-both-f50-h16-lr2": {**_NOW, **_nearest_both("q4"), "codec.scale-fraction": 0.5,
                                               "server.rebase-scales": False},
    # the defaults with the server's learning rate on the refit's averaged change at 1.5 (replayed on
    # skills: -0.7% / -2.5% on seeds 0 / 1)
    "lordba-step-decay-eta15-h16-lr2": {**_NOW, "server.eta": 1.5},
    "lordba-step-vote": {**_LEAN, "server.aggregator": "vote", "flip.budget-start": 0.08, "flip.every-step": True},
    # flips chosen by the summed straight-through gradient (first-order gain) instead of AdamW's |L|:
    # alone over the defaults, and with the per-step budget and the decaying budgets
    "lordba-grad": {**_DEFAULTS, "flip.select": "gradient"},
    "lordba-grad-step-decay": {**_DEFAULTS, **_DECAY, "flip.every-step": True, "flip.select": "gradient"},
    # gradient flips agree across clients: the budgets keeping their floors (2% / 0.5%)
    "lordba-grad-step": {**_DEFAULTS, "flip.every-step": True, "flip.select": "gradient"},
    "lordba-lean-3s": {**_LEAN, "scales": "in,mid,out", "server.error-feedback": False},
    "lordba-lean-warmup": {**_LEAN, "init.warmup-rounds": 2, "server.error-feedback": False},
    "lordba-lean-ef-warmup": {**_LEAN, "init.warmup-rounds": 1, "server.error-feedback": True},
    "lordba-lean-base-svd": {**_LEAN, "init.signs": "base-svd", "server.error-feedback": False},
    "lordba-refit-flips": {**_NO_SCHEDULE, "method": "lordba", "server.aggregator": "refit", "scales": "in,mid,out",
                           "server.flip-budget": 1.0, "codec.state-mantissa-bits": 10, "server.error-feedback": False,
                           **_FLIPS},
    "lordba-vote-flips": {**_NO_SCHEDULE, "method": "lordba", "server.aggregator": "vote", "scales": "in,mid,out",
                          "codec.state-mantissa-bits": 10, **_FLIPS},
    "lordba-refit": {**_NO_SCHEDULE, "method": "lordba", "server.aggregator": "refit", "scales": "in,mid,out", "flip.m0": 0.01,
                     "flip.budget": 0.01, "server.flip-budget": 1.0, "codec.state-mantissa-bits": 10,
                     "server.error-feedback": False},
}
# run when --only is not given (each at every rank of LORDBA_RANKS): the library's defaults; the
# other variants are the ablations measured beside it (README), run with --only
DEFAULT_VARIANTS = ("lordba-step-decay-h16-lr2",)
LORDBA_RANKS = (16, 32)
# baselines: name -> (run-config overrides, ranks); ranks chosen to span LoRDBA's bytes (r 1-4) and quality (r 16)
BASELINES: dict[str, tuple[dict, tuple[int, ...]]] = {
    "lora-fedavg": ({"method": "lora-fedavg"}, (1, 2, 4, 16)),
    "lora-q2": ({"method": "lora-q2"}, (4, 16)),
    "lora-q2-both": ({"method": "lora-q2-both"}, (4, 16)),  # the downlink in 2-bit deltas too
    "ffa-lora": ({"method": "ffa-lora"}, (16,)),
    # Fed-SB: its core costs 2 r^2 bytes a layer each way (r = 12 / 16 / 24: 60 / 107 / 242 KB per
    # client-round on SmolLM2-135M), plus the basis (fp16 LoRA size) on each node's first downlink
    "fed-sb": ({"method": "fed-sb"}, (12, 16, 24)),
    # its core between orthonormal factors moves |dW| ~ lr * r a step, about a tenth of what LoRA's factors
    # move at the same lr (alpha = 2 r): Fed-SB at ten times LoRA's lr, its initial core cut from a step
    # of LoRA's lr as before (at the training lr, 10x wrecked the start: 15.7 after round 0, skills)
    "fed-sb-lr10x": ({"method": "fed-sb", "lr": 1e-2, "fed-sb.init-step": 1e-3}, (16,)),
    # FedKSeed: zeroth-order steps on 4,096 shared seeds over the LoRA values; tens of bytes up a round
    "fedkseed": ({"method": "fedkseed"}, (16,)),
}
REFERENCE = ("lora-fedavg", 16)  # ratios are to this run (same task and seed); it runs first
TASKS = ("shakespeare", "gsm", "skills")

# ---- shared settings ------------------------------------------------------------------------------
# Every run of a task uses these, so only the method, rank and lr differ. Why these values: the
# frontier must separate methods by more than the seed spread (on 32 held-out examples LoRA r16's
# own spread was 1.6%, more than the 1% target), so 128 held-out examples, 15 rounds (LoRDBA starts
# slower and catches up over rounds) and 3 clients a round (on 2 cores a second wave of Ray: measured
# ~17 min a LoRA run, ~35 min a LoRDBA run with other jobs on the cores; idle, about half). 4 local
# steps of 4 x 64 tokens is the budget per client-round. Only server-side evaluation: the clients'
# evaluation round trip would cost time and bytes and measure nothing the frontier uses; no
# generation on shakespeare (sampled text is not a metric there).
SETTINGS: dict = {
    "rounds": 15,
    "clients-per-round": 3,
    "train.local-steps": 4,
    "train.batch-size": 4,
    "train.seq-len": 64,
    "eval.examples": 128,
    "eval.generate": 0,
    "eval.client-side": False,
}
# Per task, over SETTINGS. shakespeare: 8 roles (its 8 largest), enough for 2 of them a round to vary
# over 10 rounds. gsm: 8 clients owning ~9 templates each, 8 problems per template (~65 train
# problems a client, so 10 rounds revisit them: small but non-trivial); a problem is ~165 tokens
# (prompt ~60 + worked solution ~85, 90th percentile 255), so 64 tokens would cut off most targets:
# 192 tokens at batch 2 (~350 tokens a step after padding to the batch's longest, about twice a
# shakespeare step of 4 short speeches; two eval sets, unseen and seen templates: the gsm frontier
# is estimated at ~1.5x shakespeare's time; --run-config "train.local-steps=2" halves its training).
# Exact match (accuracy_unseen) needs generation: off (at this scale it reads ~2/64, DESIGN.md §3, for ~1 min a run);
# ``--run-config "eval.generate=30"`` measures it on all 30 unseen-template problems.
TASK_SETTINGS: dict[str, dict] = {
    "shakespeare": {"data.shakespeare.max-clients": 8},
    "gsm": {"data.gsm.num-clients": 8, "data.gsm.per-template": 8, "train.seq-len": 192, "train.batch-size": 2},
    # skills: 4 families x 2 clients (the task's defaults); every problem fits 96 tokens (longest: 79);
    # exact match on all 200 held-out problems (50 per family) after the last round only (generating them
    # costs more than a round's training here)
    "skills": {"train.seq-len": 96, "eval.examples": 200, "eval.generate": 200, "eval.metric-every": 0},
}
SUPERNODES = 8  # one virtual SuperNode per client partition above (8 of each task)

# Learning rate per method (a run-config ``lr``); --lr-file replaces them with centrally tuned ones.
LEARNING_RATES: dict[str, float] = {"lordba": 1e-3, "lora-fedavg": 1e-3, "lora-q2": 1e-3, "lora-q2-both": 1e-3,
                                    "ffa-lora": 1e-3,
                                    "lora-hetlora": 1e-3, "lora-flexlora": 1e-3,
                                    "lora-flora": 1e-3, "fed-sb": 1e-3,
                                    "fedkseed": 1e-4}  # a zeroth-order step: MeZO's LoRA setting  # the last three: simulations.hetero
# names in a chosen_lr line -> the methods they set
LR_FILE_NAMES: dict[str, tuple[str, ...]] = {
    # Fed-SB trains an r x r core between orthonormal factors: LoRA's tuned lr does not carry over
    "lora": (*(over["method"] for over, _ in BASELINES.values() if over["method"] not in ("fed-sb", "fedkseed")),
             "lora-hetlora",
             "lora-flexlora", "lora-flora"),
    "lordba-scratch": ("lordba",),
}

# --quick: the tiny random model (simulations.run.QUICK: 2 rounds of 2 short steps) and three runs
QUICK_RUNS = ((DEFAULT_VARIANTS[0], 16), ("lora-fedavg", 16), ("lora-fedavg", 2))
QUICK_SETTINGS = {**QUICK, "eval.generate": 0}

MARKERS = {"lordba": "o", "lora-fedavg": "s", "lora-q2": "^", "lora-q2-both": "<", "ffa-lora": "D", "fed-sb": "v", "fedkseed": "x"}


# ---- planning -------------------------------------------------------------------------------------
def run_name(variant: str, rank: int, seed: int) -> str:
    return f"{variant}-r{rank}-s{seed}"


def plan_runs(task: str, seeds=(0,), lordba_ranks=LORDBA_RANKS, only=None, quick: bool = False) -> list[dict]:
    """The runs of one task: ``{task, variant, family, rank, seed, overrides}``, the reference first.

    ``only``: variant names (all their ranks) or ``<variant>-r<rank>``; default every run (``QUICK_RUNS``
    with ``quick``). Unknown names raise ``ValueError`` listing the known ones.
    """
    menu = [(v, "lordba", over, r) for v, over in LORDBA_VARIANTS.items() for r in lordba_ranks]
    menu += [(v, over["method"], over, r) for v, (over, ranks) in BASELINES.items() for r in ranks]
    if only:
        known = {v for v, *_ in menu} | {f"{v}-r{r}" for v, _, _, r in menu}
        bad = [n for n in only if n not in known]
        if bad:
            raise ValueError(f"--only {bad}: unknown; known: {sorted(known)}")
        menu = [m for m in menu if m[0] in only or f"{m[0]}-r{m[3]}" in only]
    elif quick:
        menu = [m for m in menu if (m[0], m[3]) in QUICK_RUNS]
    else:  # the default frontier: the default variant(s) and every baseline; ablations by --only
        menu = [m for m in menu if m[1] != "lordba" or m[0] in DEFAULT_VARIANTS]
    menu.sort(key=lambda m: (m[0], m[3]) != REFERENCE)  # stable: the reference first, then as declared
    return [{"task": task, "variant": v, "family": fam, "rank": r, "seed": s, "overrides": dict(over)}
            for s in seeds for v, fam, over, r in menu]


def run_config_for(spec: dict, lrs: dict, quick: bool = False, user: dict | None = None,
                   out_dir: str = "results/frontier") -> dict:
    """The run-config overrides of one run: shared settings < task settings < quick < the run's own
    (method, rank, alpha = 2 rank, lr, seed) < ``user`` (``--run-config``, last, so any setting can change)."""
    cfg = {**SETTINGS, **TASK_SETTINGS.get(spec["task"], {})}
    if quick:  # the tiny model's shrinkage, except what a task needs (gsm's sequence length)
        cfg.update({k: v for k, v in QUICK_SETTINGS.items() if k not in TASK_SETTINGS.get(spec["task"], {})})
    cfg.update(spec["overrides"])
    method = cfg["method"]
    cfg.update({"task": spec["task"], "rank": spec["rank"], "alpha": float(2 * spec["rank"]),
                "lr": spec["overrides"].get("lr", lrs[method]), "seed": spec["seed"]})  # a run's own lr stands
    cfg.update(user or {})
    cfg["out-dir"] = str(Path(out_dir) / spec["task"])
    cfg["name"] = run_name(spec["variant"], spec["rank"], spec["seed"])
    return cfg


# ---- learning rates -------------------------------------------------------------------------------
def read_chosen_lrs(path: Path, task: str, model: str | None = None) -> dict | None:
    """``lrs`` of the last ``kind: "chosen_lr"`` line of ``path`` for ``task`` and ``model`` (a line
    without a task or a model counts for every one); None when the file or such a line is missing."""
    path = Path(path)
    if not path.is_file():
        return None
    found = None
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec.get("kind") == "chosen_lr" and rec.get("task", task) == task and (
                model is None or rec.get("model", model) == model):
            found = rec.get("lrs")
    return found


def map_lrs(chosen: dict | None, defaults: dict | None = None) -> dict[str, float]:
    """Learning rate per method: ``defaults`` (``LEARNING_RATES``) updated from a chosen_lr line's
    ``lrs``, whose group names (``LR_FILE_NAMES``) set every method of the group and whose method
    names set that method (winning over its group). Other names (methods the frontier does not run,
    e.g. ``frozen-signs``) and ``None`` (every lr of the sweep diverged) are ignored."""
    out = dict(LEARNING_RATES if defaults is None else defaults)
    chosen = {k: v for k, v in (chosen or {}).items() if v is not None}
    for name, lr in chosen.items():
        for method in LR_FILE_NAMES.get(name, ()):
            out[method] = float(lr)
    for name, lr in chosen.items():
        if name in out and name not in LR_FILE_NAMES:
            out[name] = float(lr)
    return out


# ---- one run's record -----------------------------------------------------------------------------
def _messages(rows: list[dict], direction: str, fallback: str) -> int:
    """Client-rounds in a direction: messages metered (wire sum / wire mean per round; the row's
    ``fallback`` count where the mean is missing)."""
    n = 0
    for r in rows:
        total, mean = r.get(f"{direction}_wire_sum", 0), r.get(f"{direction}_wire_mean")
        n += round(total / mean) if mean else int(r.get(fallback, 0)) if total else 0
    return n


def bytes_per_client(rows: list[dict]) -> dict:
    """Bytes per client-round and cumulative bytes per client, each way, from a run's round rows
    (round 0, the evaluation before training, carries no training message and is skipped)."""
    trained = [r for r in rows if r.get("round", 0) > 0]
    out = {"rounds_completed": len(trained)}
    for d, fallback in (("up", "clients_succeeded"), ("down", "clients_sampled")):
        n = _messages(trained, d, fallback)
        total = sum(r.get(f"{d}_wire_sum", 0) for r in trained)
        payload = sum(r.get(f"{d}_payload_sum", 0) for r in trained)
        per = total / n if n else None
        out[f"{d}_client_rounds"] = n
        out[f"{d}_bytes_per_client_round"] = per
        out[f"{d}_payload_per_client_round"] = payload / n if n else None
        out[f"{d}_bytes_per_client"] = per * len(trained) if per is not None else None
    up, down = out["up_bytes_per_client"], out["down_bytes_per_client"]
    out["total_bytes_per_client"] = up + down if up is not None and down is not None else None
    return out


def _finite(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def summarize(spec: dict, rows: list[dict], exit_code: int = 0, wall_s: float = 0.0, run_config: dict | None = None) -> dict:
    """One ``kind: "run"`` record from a run's ``rounds.jsonl`` rows.

    Fields: the run (task, variant, family, method, rank, alpha, lr, seed, rounds), its losses
    (``eval_losses`` indexed by round, 0 = before training; ``final_eval_loss``; ``best_eval_loss``
    and ``best_round`` over rounds >= 1), the task metric (``metric_name``: ``accuracy_unseen`` for
    gsm, ``perplexity`` otherwise; ``final_metric``, None when not measured), ``train_losses`` by
    round, bytes (:func:`bytes_per_client`), flip rates and flip agreement (observed and expected by
    chance) per round (LoRDBA; None otherwise), wall seconds, exit code.
    Ratios to the reference come later (:func:`add_ratios`).
    """
    rc = run_config or {}
    by_round = {r["round"]: r for r in rows if "round" in r}  # a resumed round overwrites its first try
    ordered = [by_round[k] for k in sorted(by_round)]
    trained = [r for r in ordered if r["round"] > 0]
    final = ordered[-1] if ordered else {}
    losses = [_finite(r.get("eval_loss")) for r in ordered]
    scored = [(r["round"], _finite(r.get("eval_loss"))) for r in trained if _finite(r.get("eval_loss")) is not None]
    best = min(scored, key=lambda p: p[1]) if scored else (None, None)
    # the task's metric on its first eval set (accuracy_unseen for gsm, accuracy_heldout for skills)
    metric = next((k for k in final if k.startswith("accuracy_")), "perplexity")
    lordba = spec.get("family") == "lordba"
    rec = {
        "kind": "run", "task": spec["task"], "variant": spec["variant"], "family": spec.get("family"),
        "method": rc.get("method", spec.get("overrides", {}).get("method")), "rank": rc.get("rank", spec["rank"]),
        "alpha": rc.get("alpha"), "lr": rc.get("lr"), "seed": rc.get("seed", spec["seed"]),
        "run": run_name(spec["variant"], spec["rank"], spec["seed"]), "model": rc.get("model", "smollm2-135m"),
        "rounds": rc.get("rounds"), "clients_per_round": rc.get("clients-per-round"),
        "initial_eval_loss": losses[0] if ordered and ordered[0]["round"] == 0 else None,
        "final_eval_loss": _finite(final.get("eval_loss")) if trained else None,
        "best_eval_loss": best[1], "best_round": best[0],
        "metric_name": metric, "final_metric": _finite(final.get(metric)) if trained else None,
        "final_perplexity": _finite(final.get("perplexity")) if trained else None,
        "eval_losses": losses,
        **bytes_per_client(ordered),
        "fp16_lora_bytes": final.get("fp16_lora_bytes"),
        "train_losses": [_finite(r.get("train_loss")) for r in trained],
        "client_flip_rate": [r.get("client_flip_rate") for r in trained] if lordba else None,
        "global_flip_rate": [r.get("global_flip_rate") for r in trained] if lordba else None,
        "flip_agreement": [r.get("flip_agreement") for r in trained] if lordba else None,
        "flip_agreement_chance": [r.get("flip_agreement_chance") for r in trained] if lordba else None,
        "fit_error_median": [r.get("fit_error_median") for r in trained] if lordba else None,
        "wall_s": round(wall_s, 1), "exit_code": exit_code,
    }
    if spec["task"] == "gsm":
        rec["accuracy_seen"] = _finite(final.get("accuracy_seen"))
        rec["seen_eval_loss"] = _finite(final.get("seen_eval_loss"))
    return rec


RATIO_FIELDS = ("up_bytes_per_client_round", "down_bytes_per_client_round", "total_bytes_per_client",
                "final_eval_loss")


def is_reference(rec: dict) -> bool:
    return (rec.get("variant"), rec.get("rank")) == REFERENCE


def add_ratios(rec: dict, ref: dict | None) -> dict:
    """``<field>_ratio_to_ref`` = rec[field] / ref[field] for :data:`RATIO_FIELDS` (None where either
    is missing or the reference is 0); ``ref_run`` names the reference. Returns ``rec``."""
    rec["ref_run"] = ref["run"] if ref else None
    for f in RATIO_FIELDS:
        a, b = rec.get(f), (ref or {}).get(f)
        rec[f"{f}_ratio_to_ref"] = a / b if a is not None and b else None
    return rec


# ---- the front ------------------------------------------------------------------------------------
def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names of the points no other point dominates, by increasing bytes; ``points``: name ->
    (eval loss, bytes), both lower-is-better. q dominates p when it is <= on both and < on one, so
    identical points are all on the front."""
    front = [n for n, (loss, b) in points.items()
             if not any(l2 <= loss and b2 <= b and (l2 < loss or b2 < b) for m, (l2, b2) in points.items() if m != n)]
    return sorted(front, key=lambda n: (points[n][1], points[n][0], n))


def frontier_points(records: list[dict]) -> tuple[dict[str, dict], list[str]]:
    """``<variant>-r<rank>`` -> {family, rank, final_eval_loss, total_bytes_per_client, seeds} (means
    over seeds; ``loss_min`` / ``loss_max``: the spread over seeds) for the runs that finished with a
    loss, and the names left out (failed runs). ``loss_vs_ref``: the mean over the seeds the
    reference (:data:`REFERENCE`) also ran of loss / reference loss - 1, seed by seed (``paired_seeds``;
    None without such a seed): runs with different seeds compared like for like."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(f"{r['variant']}-r{r['rank']}", []).append(r)
    points, excluded = {}, []
    for name, recs in groups.items():
        ok = [r for r in recs if r.get("exit_code") == 0 and r.get("final_eval_loss") is not None
              and r.get("total_bytes_per_client") is not None]
        if len(ok) < len(recs):
            excluded += [r["run"] for r in recs if r not in ok]
        if ok:
            points[name] = {
                "variant": ok[0]["variant"], "family": ok[0]["family"], "rank": ok[0]["rank"],
                "final_eval_loss": sum(r["final_eval_loss"] for r in ok) / len(ok),
                "loss_min": min(r["final_eval_loss"] for r in ok), "loss_max": max(r["final_eval_loss"] for r in ok),
                "total_bytes_per_client": sum(r["total_bytes_per_client"] for r in ok) / len(ok),
                "seeds": sorted(r["seed"] for r in ok),
            }
    ref = points.get(f"{REFERENCE[0]}-r{REFERENCE[1]}")
    ref_loss = {} if ref is None else {r["seed"]: r["final_eval_loss"] for r in groups[f"{REFERENCE[0]}-r{REFERENCE[1]}"]
                                       if r.get("exit_code") == 0 and r.get("final_eval_loss") is not None}
    for name, p in points.items():
        ratios = {r["seed"]: r["final_eval_loss"] / ref_loss[r["seed"]] - 1 for r in groups[name]
                  if r["seed"] in ref_loss and r.get("exit_code") == 0 and r.get("final_eval_loss") is not None}
        p["paired_seeds"] = sorted(ratios)
        p["loss_vs_ref"] = sum(ratios.values()) / len(ratios) if ratios else None
    return points, excluded


def pareto_record(task: str, records: list[dict]) -> dict:
    """The ``kind: "pareto"`` line of one task.

    ``front``: runs on the Pareto front of (final eval loss, cumulative up + down bytes per client),
    means over seeds; the loss is ``loss_vs_ref`` (seed-paired, ``compared_on``) when every run has
    a seed in common with the reference, else the mean final eval loss. ``best_lordba``: the LoRDBA run with the lowest final eval loss;
    ``best_lordba_on_front``: no baseline run has both lower-or-equal bytes and a lower eval loss
    (``best_lordba_beaten_by`` lists those that do); ``lordba_on_front``: LoRDBA runs on the front.
    """
    points, excluded = frontier_points(records)
    key = "loss_vs_ref" if points and all(p["loss_vs_ref"] is not None for p in points.values()) else "final_eval_loss"
    xy = {n: (p[key], p["total_bytes_per_client"]) for n, p in points.items()}
    front = pareto_front(xy)
    lordba = {n: p for n, p in points.items() if p["family"] == "lordba"}
    best = min(lordba, key=lambda n: (xy[n][0], xy[n][1])) if lordba else None
    beaten = []
    if best is not None:
        loss, b = xy[best]
        beaten = sorted(n for n, p in points.items()
                        if p["family"] != "lordba" and xy[n][1] <= b and xy[n][0] < loss)
    return {
        "kind": "pareto", "task": task, "compared_on": key,
        "seeds": sorted({s for p in points.values() for s in p["seeds"]}),
        "points": {n: {**points[n], "on_front": n in front}
                   for n in sorted(points, key=lambda n: points[n]["total_bytes_per_client"])},
        "front": front,
        "best_lordba": best,
        "best_lordba_on_front": (not beaten) if best is not None else None,
        "best_lordba_beaten_by": beaten,
        "lordba_on_front": [n for n in front if n in lordba],
        "excluded": excluded,
    }


# ---- records in files -----------------------------------------------------------------------------
def _key(rec: dict) -> tuple:
    return rec.get("task"), rec.get("variant"), rec.get("rank"), rec.get("seed")


def load_records(path: Path) -> list[dict]:
    """The ``kind: "run"`` records of a frontier jsonl, the last one of each (task, variant, rank, seed)."""
    last: dict[tuple, dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if rec.get("kind") == "run":
                last[_key(rec)] = rec
    return list(last.values())


# ---- plots ----------------------------------------------------------------------------------------
def variant_colors(records: list[dict]) -> dict[str, tuple]:
    """A colour per variant present in ``records`` (declared order; tab10, tab20 beyond 10 variants):
    distinct for up to 20 variants on one chart."""
    from matplotlib import colormaps

    present = {r["variant"] for r in records}
    variants = [v for v in dict.fromkeys([*LORDBA_VARIANTS, *BASELINES, *sorted(present)]) if v in present]
    cmap = colormaps["tab10" if len(variants) <= 10 else "tab20"]
    return {v: cmap(i % cmap.N) for i, v in enumerate(variants)}


def plot_frontier(records: list[dict], out_dir: Path) -> list[Path]:
    """``frontier.png`` (final eval loss vs cumulative bytes per client, a panel per task) and
    ``frontier_curves.png`` (eval loss by round per run, a panel per task)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if any(r["task"] == t for r in records)]
    tasks += sorted({r["task"] for r in records} - set(tasks))
    if not tasks:
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    color = variant_colors(records)
    paths = []

    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        points, _ = frontier_points([r for r in records if r["task"] == task])
        for variant in dict.fromkeys(p["variant"] for p in points.values()):
            pts = sorted((p for p in points.values() if p["variant"] == variant), key=lambda p: p["total_bytes_per_client"])
            fam = pts[0]["family"]
            ax.plot([p["total_bytes_per_client"] for p in pts], [p["final_eval_loss"] for p in pts],
                    marker=MARKERS.get(fam, "x"), color=color[variant], linewidth=0.8, label=variant)
            for p in pts:
                ax.annotate(f"r{p['rank']}" + (f" ({len(p['seeds'])} seeds)" if len(p["seeds"]) > 1 else ""),
                            (p["total_bytes_per_client"], p["final_eval_loss"]),
                            textcoords="offset points", xytext=(4, 4), fontsize=7)
                if len(p["seeds"]) > 1:  # the spread over seeds: min to max
                    ax.errorbar([p["total_bytes_per_client"]], [p["final_eval_loss"]], color=color[variant],
                                yerr=[[p["final_eval_loss"] - p["loss_min"]], [p["loss_max"] - p["final_eval_loss"]]],
                                capsize=3, linewidth=0.8)
        front = pareto_front({n: (p["final_eval_loss"], p["total_bytes_per_client"]) for n, p in points.items()})
        if len(front) > 1:
            ax.step([points[n]["total_bytes_per_client"] for n in front], [points[n]["final_eval_loss"] for n in front],
                    where="post", color="grey", linestyle="--", linewidth=0.8, label="Pareto front")
        ax.set(title=task, xscale="log", xlabel="cumulative wire bytes per client (up + down)",
               ylabel="final eval loss")
        ax.ticklabel_format(axis="y", useOffset=False)
        # a run that ends above the lowest loss any run started from (diverged, or one that barely
        # learns) would flatten every other point: it is listed in the title with its loss and left off the y range
        initial = min((r["initial_eval_loss"] for r in records if r["task"] == task and r.get("initial_eval_loss")),
                      default=None)
        losses = [p["final_eval_loss"] for p in points.values()]
        kept = [v for v in losses if initial is None or v <= initial]
        off = [n for n, p in points.items() if initial is not None and p["final_eval_loss"] > initial]
        if kept and off:
            span = max(kept) - min(kept) or 0.01
            ax.set_ylim(min(kept) - 0.1 * span, max(kept) + 0.1 * span)
            listed = ", ".join(f"{n} at {points[n]['final_eval_loss']:.3f}" for n in off)
            ax.set_title(f"{task} (off the chart: {listed})", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / "frontier.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        runs = sorted((r for r in records if r["task"] == task), key=lambda r: (r["variant"], r["rank"], r["seed"]))
        for i, r in enumerate(runs):
            pts = [(k, x) for k, x in enumerate(r.get("eval_losses") or []) if x is not None]
            if pts:  # a colour per run: ranks of one variant must be told apart here
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=plt.get_cmap("tab20")(i % 20),
                        linestyle="-" if r["family"] == "lordba" else "--", marker=MARKERS.get(r["family"], "x"),
                        markersize=3, linewidth=0.9, label=r["run"])
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(title=task, xlabel="round", ylabel="eval loss (server, held-out)")
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    paths.append(out_dir / "frontier_curves.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def replot(path: Path, out_dir: Path | None = None) -> list[dict]:
    """Plots and pareto lines (printed, not appended) from an existing frontier jsonl; runs nothing."""
    records = load_records(path)
    for task in dict.fromkeys(r["task"] for r in records):
        emit(pareto_record(task, [r for r in records if r["task"] == task]), None)
    for p in plot_frontier(records, Path(out_dir) if out_dir else Path(path).parent):
        print(f"wrote {p}", file=sys.stderr)
    return records


# ---- main -----------------------------------------------------------------------------------------
def _find_reference(done: list[dict], out: Path, task: str, seed: int) -> dict | None:
    for rec in reversed(done):
        if rec["task"] == task and rec["seed"] == seed and is_reference(rec):
            return rec
    if out.is_file():  # from an earlier invocation writing the same file (e.g. --only lordba-vote)
        for rec in load_records(out):
            if rec["task"] == task and rec["seed"] == seed and is_reference(rec) and rec.get("exit_code") == 0:
                return rec
    return None


def main(argv: list[str] | None = None) -> None:
    from flwr.common.config import parse_config_args

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=TASKS, help="one task (default: both)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="variants (every rank) or <variant>-r<rank>")
    p.add_argument("--ranks", nargs="+", type=int, default=list(LORDBA_RANKS), help="LoRDBA ranks")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--run-config", default="",
                   help="overrides of every run, Flower syntax: \"rounds=20 train.local-steps=2\"")
    p.add_argument("--lr-file", default="results/centralized.jsonl", help="chosen_lr lines (used when the file exists)")
    p.add_argument("--quick", action="store_true", help="tiny model, 2 rounds, 3 runs per task: a smoke run")
    p.add_argument("--supernodes", type=int, default=SUPERNODES)
    p.add_argument("--out-dir", type=Path, help="default results/frontier (results/frontier-quick with --quick)")
    p.add_argument("--out", type=Path, help="default <out-dir>/frontier.jsonl")
    p.add_argument("--replot", type=Path, metavar="FILE", help="only rebuild plots and pareto lines from FILE")
    args = p.parse_args(argv)
    if args.replot:
        replot(args.replot, args.out_dir)
        return
    out_dir = (args.out_dir or Path("results/frontier-quick" if args.quick else "results/frontier")).resolve()
    out = args.out or out_dir / "frontier.jsonl"
    user = parse_config_args([args.run_config]) if args.run_config.strip() else {}
    tasks = [args.task] if args.task else list(TASKS)
    # lrs tuned on another model do not carry over: only chosen_lr lines of this model count
    model = user.get("model") or (QUICK["model"] if args.quick else project_run_config()["model"])
    records = []
    for task in tasks:
        chosen = read_chosen_lrs(Path(args.lr_file), task, model) if args.lr_file else None
        lrs = map_lrs(chosen)
        print(f"[frontier] {task}: learning rates {lrs} ({'from ' + args.lr_file if chosen else 'LEARNING_RATES'})",
              file=sys.stderr)
        task_records = []
        for spec in plan_runs(task, args.seeds, tuple(args.ranks), args.only, args.quick):
            rc = run_config_for(spec, lrs, args.quick, user, str(out_dir))
            print(f"[frontier] {task} {rc['name']} ...", file=sys.stderr, flush=True)
            rows, code, wall = launch(rc, args.supernodes)
            rec = summarize(spec, rows, code, wall, rc)
            rec["lr_source"] = args.lr_file if chosen else "LEARNING_RATES"
            rec["quick"] = args.quick
            add_ratios(rec, rec if is_reference(rec) else _find_reference(records + task_records, out, task, spec["seed"]))
            emit(rec, out)
            task_records.append(rec)
        records += task_records
        emit(pareto_record(task, [r for r in load_records(out) if r["task"] == task]), out)
    plot_frontier(load_records(out), out_dir)
    print(f"[frontier] {out}, {out_dir / 'frontier.png'}, {out_dir / 'frontier_curves.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()
