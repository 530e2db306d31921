"""Centralized diagnostic: what each adapter learns on the federation's pooled data, without the federation.

Every method trains on the union of the training examples of the clients the main federated job uses
(partitions ``0..N-1``: ``simulations/run.py`` starts one virtual SuperNode per partition, N = its
``--supernodes`` or ``clients-per-round``), at the same rank, steps, batch and sequence length, from a
freshly loaded frozen ``q4_1`` base, on one batch stream drawn once per seed (every method and every
phase sees the same batches; no batch is replayed across evaluation chunks). The held-out loss is
measured every ``--eval-every`` steps. A method's gap to ``lora`` here is what the adapter cannot
learn; its gap to its own federated run (same eval set: ``--eval-set server``) is what the federation loses.

Methods (DESIGN.md §1 and §3):

- ``lora``: PEFT LoRA (fp32), built exactly as the ``lora-fedavg`` clients build it.
- ``lordba-scratch``: random signs (``LoRDBAConfig(seed=seed)``), latents (magnitude ``init_std``) and
  scales trained with the STE, latent lr = lr; ``--scale-init ones`` gives the first design's init.
- ``lordba-qat-full``: the paper's main method: ``--warmup-frac`` of the steps as PEFT LoRA, then each
  layer's dense update ``B @ A * g`` imported with ``init='svd'`` on a fresh base, then STE training.
- ``frozen-signs``: random signs frozen, only the scales train.

Learning rates: each method sweeps ``--lrs``; a run is scored by its loss on a validation split carved
out of the pooled *training* examples (seeded, ``max(16, 10%)`` of them, removed from the training
pool; the eval set never takes part), averaged over ``--seeds``; a diverged run scores +inf. The chosen
lr's runs are the reported curves.

Records (JSON lines, printed and appended to ``--out``), per task:

- ``setup``: partitions, pool sizes, eval set, initial eval loss;
- ``sweep``: one per (method, lr, seed): validation loss at the end (None if diverged);
- ``curve``: one per (method, seed) at the chosen lr: steps, eval loss, train loss, sign flips vs the
  start of STE training (LoRDBA methods), qat-full's svd fit error, wall seconds;
- ``chosen_lr``: ``{method: lr}`` (the frontier benchmark reads these).

Usage::

    python -m simulations.centralized                                 # shakespeare and gsm, SmolLM2-135M
    python -m simulations.centralized --task shakespeare --methods lora,lordba-scratch --lrs 1e-3
    python -m simulations.centralized --scale-init ones --lrs 1e-4,1e-3   # the first design's init
    python -m simulations.centralized --eval-set clients             # the training clients' held-out data instead
    python -m simulations.centralized --quick                         # tiny-llama, 4 steps, 1 lr: seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

from lordba_fl.adapter.config import SCALE_INITS, SCALE_LRS, LoRDBAConfig
from lordba_fl.adapter.layer import attach_lordba_
from lordba_fl.adapter.storage import PEFT_PREFIX
from lordba_fl.base.models import load_model
from lordba_fl.data import Example, load_client_data, load_task
from lordba_fl.methods import settings_for
from lordba_fl.methods.lora import LoRAFedAvg, lora_layers
from lordba_fl.methods.lordba import train_groups
from lordba_fl.runconfig import RunConfig, parse_run_config
from lordba_fl.train import (
    TrainConfig,
    encode_examples,
    evaluate_loss,
    make_optimizer,
    micro_batches,
    train_local,
)
from lordba_fl.methods.lordba.layout import AdapterSpec, read_latents
from simulations.common import emit

VAL_SEED = 0  # the validation split does not depend on --seeds: every seed's sweep is scored on the same set
DEFAULTS = {
    "task": "shakespeare,gsm", "model": "smollm2-135m", "steps": 48, "eval_every": 12, "batch_size": 4,
    "seq_len": 128, "rank": 16, "alpha": 32.0, "lrs": "3e-4,1e-3,3e-3", "methods": "", "seeds": "0",
    "eval_examples": 64, "eval_set": "server", "warmup_frac": 0.1, "scale_init": "normalized",
    "scales": "in,mid,out", "scale_lr": "uniform",
    "val_fraction": 0.1, "min_val": 16, "supernodes": None, "device": "auto", "out": "results/centralized.jsonl",
}
QUICK = {"model": "tiny-llama", "steps": 4, "eval_every": 2, "batch_size": 2, "seq_len": 128, "rank": 4, "alpha": 8.0,
         "lrs": "1e-3", "eval_examples": 8, "out": "results/centralized-quick.jsonl"}  # smoke lines stay apart


# ---- data -----------------------------------------------------------------------------------------


@dataclass
class Split:
    """The pooled data of one task: training pool, validation split (carved from the pool), eval sets."""

    train: list[Example]
    val: list[Example]
    eval_sets: dict[str, list[Example]]  # name -> held-out examples; the first is the reported one
    dropped: int = 0  # pooled training examples with no target token within seq_len (train_local drops them too)

    @property
    def primary(self) -> str:
        return next(iter(self.eval_sets))


def federation_partitions(run_config: dict, supernodes: int | None = None) -> list[int]:
    """Partition ids the main job trains on: one SuperNode per id, as ``simulations/run.py`` starts them.

    Parameters
    ----------
    run_config : dict
        Flat run config (pyproject defaults plus overrides).
    supernodes : int, optional
        ``simulations.run --supernodes``; by default ``clients-per-round``.
    """
    from simulations.run import _check_nodes

    return list(range(_check_nodes(run_config, supernodes)))


def interleave(parts: Sequence[Sequence[Example]], n: int) -> list[Example]:
    """The first ``n`` examples taking one from each part in turn (the federation's pooling of held-out sets)."""
    out: list[Example] = []
    for i in range(max((len(p) for p in parts), default=0)):
        out += [p[i] for p in parts if i < len(p)]
    return out[:n]


def trainable(tok, examples: Sequence[Example], seq_len: int) -> list[Example]:
    """The examples :func:`lordba_fl.train.encode_examples` keeps (a target token within ``seq_len``)."""
    kept = []
    for ex in examples:
        try:
            encode_examples(tok, [ex], seq_len)
        except ValueError:
            continue
        kept.append(ex)
    return kept


def carve_validation(pool: Sequence[Example], fraction: float, minimum: int, seed: int = VAL_SEED
                     ) -> tuple[list[Example], list[Example]]:
    """(train, val): a seeded ``max(minimum, round(fraction * n))`` of ``pool`` moved out as validation."""
    n = len(pool)
    n_val = max(minimum, round(fraction * n))
    if n_val >= n:
        raise ValueError(f"the pooled training set has {n} examples, too few to hold out {n_val} for validation; "
                         "lower --min-val / --val-fraction or use more clients (--supernodes)")
    chosen = set(random.Random(seed).sample(range(n), n_val))
    train = [ex for i, ex in enumerate(pool) if i not in chosen]
    val = [ex for i, ex in enumerate(pool) if i in chosen]
    return train, val


def pooled_split(train_parts: Sequence[Sequence[Example]], test_parts: Sequence[Sequence[Example]], tok, *,
                 seq_len: int, eval_examples: int, val_fraction: float = 0.1, min_val: int = 16,
                 eval_sets: dict[str, list[Example]] | None = None) -> Split:
    """Pool the clients' data: training pool minus a validation split, and the held-out eval set.

    Parameters
    ----------
    train_parts, test_parts : sequences of Example lists
        The clients' training and held-out examples (partition order).
    tok : tokenizer
        Drops training examples no batch could learn from (as ``train_local`` would).
    eval_examples : int
        Size of the default eval set: the clients' held-out examples, interleaved.
    eval_sets : dict, optional
        Eval sets to use instead (e.g. the federation's server-side ones).
    """
    everything = [ex for part in train_parts for ex in part]
    pool = trainable(tok, everything, seq_len)
    train, val = carve_validation(pool, val_fraction, min_val)
    return Split(train, val, eval_sets or {"clients": interleave(test_parts, eval_examples)}, len(everything) - len(pool))


def load_split(run_config: dict, tok, args: argparse.Namespace) -> tuple[Split, list[int]]:
    """The pooled :class:`Split` of ``run_config``'s task for the main job's clients (and their ids)."""
    from lordba_fl.federation.apps import (
        _server_eval_sets,  # the federation's own eval sets, not a copy
    )

    cfg = parse_run_config(run_config)
    partitions = federation_partitions(run_config, args.supernodes)
    clients = [load_client_data(cfg.task, pid, **cfg.task_kwargs()) for pid in partitions]
    server = None
    if args.eval_set == "server":
        task = load_task(cfg.task, **cfg.task_kwargs())
        server = _server_eval_sets(task, dataclasses.replace(cfg, eval_examples=args.eval_examples))
    split = pooled_split([c.train for c in clients], [c.test for c in clients], tok, seq_len=args.seq_len,
                         eval_examples=args.eval_examples, val_fraction=args.val_fraction, min_val=args.min_val,
                         eval_sets=server)
    empty = [name for name, ex in split.eval_sets.items() if not trainable(tok, ex, args.seq_len)]
    if empty:
        raise ValueError(f"eval set(s) {empty} of task {cfg.task!r} have no target token within --seq-len "
                         f"{args.seq_len}; raise --seq-len")
    return split, partitions


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no inf / NaN


# ---- the benchmark's fixed settings, batch stream and curves -------------------------------------


@dataclass
class Bench:
    """What every run of one task shares: settings, tokenizer, data and the parsed run config."""

    model: str
    tok: object
    data: Split
    run_cfg: RunConfig
    steps: int = 48
    eval_every: int = 12
    batch_size: int = 4
    seq_len: int = 128
    rank: int = 16
    alpha: float = 32.0
    warmup_frac: float = 0.1
    scale_init: str = "normalized"
    scales: tuple[str, ...] = ("in", "mid", "out")
    scale_lr: str = "uniform"

    def fresh_base(self) -> nn.Module:
        """A freshly loaded frozen base (``run_cfg.quant``, compute dtype), so runs share nothing."""
        model, _ = load_model(self.model, self.run_cfg.quant, compute_dtype=self.run_cfg.torch_compute_dtype())
        return model

    def train_config(self, steps: int) -> TrainConfig:
        """``steps`` optimizer steps at this benchmark's batch and length, the run config's optimizer (AdamW)."""
        return TrainConfig(steps=steps, batch_size=self.batch_size, seq_len=self.seq_len,
                           optimizer=self.run_cfg.train.optimizer)

    def eval_points(self) -> list[int]:
        """Steps after which the eval set is measured: every ``eval_every``, and the last step."""
        return sorted(set(range(self.eval_every, self.steps + 1, self.eval_every)) | {self.steps})

    def evaluate(self, model: nn.Module, examples: Sequence[Example]) -> float:
        """Token-weighted target loss of ``model`` on ``examples`` (``lordba_fl.train.evaluate_loss``)."""
        return evaluate_loss(model, self.tok, examples, self.seq_len)["eval_loss"]

    def evaluate_sets(self, model: nn.Module) -> dict[str, float]:
        """``{eval set name: loss}``."""
        return {name: self.evaluate(model, ex) for name, ex in self.data.eval_sets.items()}


class BatchPlan:
    """Every optimizer step's examples, drawn once from one seeded shuffle of the training pool.

    Training a span of steps hands exactly that span's examples to ``train_local``, so successive
    chunks never replay a batch and every method (and each phase of qat-full) sees the same stream.
    """

    def __init__(self, examples: Sequence[Example], steps: int, batch_size: int, seed: int):
        if len(examples) < batch_size:
            raise ValueError(f"{len(examples)} training examples cannot fill a batch of {batch_size}; lower --batch-size")
        cfg = TrainConfig(steps=steps, batch_size=batch_size)
        self.batches = list(micro_batches(list(examples), cfg, seed))  # steps x [batch_size examples]

    def span(self, lo: int, hi: int) -> list[Example]:
        """The examples of steps ``lo .. hi - 1``, in stream order."""
        return [ex for batch in self.batches[lo:hi] for ex in batch]


@dataclass
class Curve:
    """Eval losses (per set), train losses and sign flips at each eval point of one run."""

    steps: list[int] = field(default_factory=list)
    eval: dict[str, list[float]] = field(default_factory=dict)
    train_loss: list[float] = field(default_factory=list)
    flipped: list[float | None] = field(default_factory=list)


class SignTracker:
    """Fraction of sign carriers flipped since the tracker was made (the start of STE training)."""

    def __init__(self, model: nn.Module):
        self.spec = AdapterSpec.from_model(model)
        self.start = read_latents(model, self.spec) < 0  # (n_bits,)

    def flipped(self, model: nn.Module) -> float:
        return float(((read_latents(model, self.spec) < 0) ^ self.start).float().mean())


def train_span(model: nn.Module, groups: list[dict], opt: torch.optim.Optimizer, bench: Bench, plan: BatchPlan,
               lo: int, hi: int, seed: int, curve: Curve, signs: SignTracker | None = None) -> None:
    """Train steps ``lo .. hi - 1`` of ``plan``, stopping to evaluate at each eval point in ``(lo, hi]``."""
    points = bench.eval_points()
    bounds = [lo] + [p for p in points if lo < p < hi] + [hi]
    for a, b in zip(bounds, bounds[1:]):
        res = train_local(model, groups, bench.tok, plan.span(a, b), bench.train_config(b - a), seed + a, optimizer=opt)
        if b in points:
            curve.steps.append(b)
            for name, loss in bench.evaluate_sets(model).items():
                curve.eval.setdefault(name, []).append(_finite(loss))
            curve.train_loss.append(res["train_loss"])
            curve.flipped.append(signs.flipped(model) if signs is not None else None)


# ---- methods --------------------------------------------------------------------------------------


def lora_model(bench: Bench, lr: float, seed: int) -> tuple[nn.Module, list[dict]]:
    """PEFT LoRA on a fresh base, built as the ``lora-fedavg`` clients build it; (model, optimizer groups)."""
    cfg = dataclasses.replace(bench.run_cfg, method="lora-fedavg", rank=bench.rank, alpha=bench.alpha, seed=seed)
    model = LoRAFedAvg(settings_for(LoRAFedAvg.settings_type, cfg)).adapt(bench.fresh_base()).to(bench.run_cfg.torch_device())
    params = [p for _, a, b in lora_layers(model) for p in (a, b)]
    for p in params:
        p.requires_grad_(True)
    return model, [{"params": params, "lr": lr}]


def lordba_model(bench: Bench, seed: int) -> nn.Module:
    """Random-sign LoRDBA (``scale_init`` scales, latents ``N(0, init_std^2)``) on a fresh base."""
    model = bench.fresh_base()
    attach_lordba_(model, LoRDBAConfig(rank=bench.rank, alpha=bench.alpha, scale_init=bench.scale_init, scales=bench.scales, seed=seed))
    return model.to(bench.run_cfg.torch_device())


@torch.no_grad()
def lora_dense_updates(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{base module name: dW (out, in)}`` of every PEFT LoRA layer (PEFT's ``B @ A * scaling``)."""
    return {name.removeprefix(PEFT_PREFIX): model.get_submodule(name).get_delta_weight("default").float().cpu()
            for name, _, _ in lora_layers(model)}


def import_warmup(bench: Bench, lora: nn.Module, seed: int) -> tuple[nn.Module, dict[str, float]]:
    """A fresh base with LoRDBA fitted (``init='svd'``) to the LoRA model's dense updates; (model, fit errors)."""
    deltas = lora_dense_updates(lora)
    model = bench.fresh_base()
    cfg = LoRDBAConfig(rank=bench.rank, alpha=bench.alpha, init="svd", scale_init=bench.scale_init, scales=bench.scales,
                       seed=seed)
    errors = attach_lordba_(model, cfg, delta_weights=deltas)
    return model.to(bench.run_cfg.torch_device()), errors


def warmup_steps(steps: int, frac: float) -> int:
    """LoRA warm-up steps of qat-full: ``round(frac * steps)``, at least one, leaving one STE step."""
    if steps < 2:
        raise ValueError(f"lordba-qat-full needs --steps >= 2 (a warm-up step and an STE step); got {steps}")
    return min(max(1, round(frac * steps)), steps - 1)


def run_lora(bench: Bench, plan: BatchPlan, lr: float, seed: int, curve: Curve) -> tuple[nn.Module, dict]:
    """``lora``: PEFT LoRA for every step. Every ``run_*`` fills ``curve`` and returns (model, extra fields)."""
    model, groups = lora_model(bench, lr, seed)
    train_span(model, groups, make_optimizer(groups, bench.train_config(1)), bench, plan, 0, bench.steps, seed, curve)
    return model, {}


def _run_lordba(bench: Bench, plan: BatchPlan, lr: float, seed: int, curve: Curve, frozen: bool) -> tuple[nn.Module, dict]:
    model = lordba_model(bench, seed)
    signs = SignTracker(model)
    groups = train_groups(model, signs.spec, lr, 0.0 if frozen else lr, bench.scale_lr)
    opt = make_optimizer(groups, bench.train_config(1))
    train_span(model, groups, opt, bench, plan, 0, bench.steps, seed, curve, signs)
    return model, {"scale_init": bench.scale_init}


def run_lordba_scratch(bench, plan, lr, seed, curve):
    """``lordba-scratch``: random signs, latents and scales trained at ``lr``."""
    return _run_lordba(bench, plan, lr, seed, curve, frozen=False)


def run_frozen_signs(bench, plan, lr, seed, curve):
    """``frozen-signs``: random signs frozen (latents without gradients), scales trained at ``lr``."""
    return _run_lordba(bench, plan, lr, seed, curve, frozen=True)


def run_qat_full(bench: Bench, plan: BatchPlan, lr: float, seed: int, curve: Curve) -> tuple[nn.Module, dict]:
    """``lordba-qat-full``: LoRA warm-up, ``svd`` import on a fresh base, then STE training (latents and scales at ``lr``).

    Extra fields: warm-up steps, eval loss at the end of the warm-up and right after the import (what
    the import itself costs), and the median / max relative Frobenius fit error over layers.
    """
    warm = warmup_steps(bench.steps, bench.warmup_frac)
    lora, groups = lora_model(bench, lr, seed)
    train_span(lora, groups, make_optimizer(groups, bench.train_config(1)), bench, plan, 0, warm, seed, curve)
    warm_loss = bench.evaluate(lora, bench.data.eval_sets[bench.data.primary])
    model, errors = import_warmup(bench, lora, seed)
    del lora, groups
    import_loss = bench.evaluate(model, bench.data.eval_sets[bench.data.primary])
    signs = SignTracker(model)
    groups = train_groups(model, signs.spec, lr, lr, bench.scale_lr)
    train_span(model, groups, make_optimizer(groups, bench.train_config(1)), bench, plan, warm, bench.steps, seed,
               curve, signs)
    fit = sorted(errors.values())
    return model, {"warmup_steps": warm, "warmup_eval_loss": warm_loss, "import_eval_loss": import_loss,
                   "svd_fit_error_median": statistics.median(fit), "svd_fit_error_max": fit[-1]}


METHODS: dict[str, Callable[..., tuple[nn.Module, dict]]] = {
    "lora": run_lora,
    "lordba-scratch": run_lordba_scratch,
    "lordba-qat-full": run_qat_full,
    "frozen-signs": run_frozen_signs,
}


def run_method(name: str, bench: Bench, lr: float, seed: int) -> tuple[dict, nn.Module | None]:
    """One run of method ``name`` at ``lr``: (its record, the trained model or None if it diverged).

    The record holds the validation loss at the end (``None`` when training diverged) and the curve.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {sorted(METHODS)}")
    torch.manual_seed(seed)
    t0 = time.time()
    curve = Curve()
    plan = BatchPlan(bench.data.train, bench.steps, bench.batch_size, seed)
    model, extra, val = None, {}, None
    try:
        model, extra = METHODS[name](bench, plan, lr, seed, curve)
        val = _finite(bench.evaluate(model, bench.data.val))
    except FloatingPointError:  # train_local refuses a non-finite loss: this lr diverged
        pass
    record = {"method": name, "lr": lr, "seed": seed, "val_loss": val, "diverged": val is None,
              "steps": curve.steps, "eval_loss": curve.eval.get(bench.data.primary, []), "eval_sets": curve.eval,
              "train_loss": curve.train_loss, "signs_flipped_by_step": curve.flipped,
              "signs_flipped": curve.flipped[-1] if curve.flipped else None, **extra,
              "wall_s": round(time.time() - t0, 2)}
    return record, model


def select_lr(scores: dict[float, list[float | None]]) -> float | None:
    """The lr with the lowest mean validation loss over seeds (a diverged seed, ``None``, counts as +inf).

    Ties go to the smaller lr; ``None`` when every lr diverged.
    """
    def mean(vals):
        return math.inf if any(v is None or not math.isfinite(v) for v in vals) else sum(vals) / len(vals)

    finite = {lr: mean(v) for lr, v in scores.items() if v and mean(v) < math.inf}
    return min(finite, key=lambda lr: (finite[lr], lr)) if finite else None


def sweep_method(name: str, bench: Bench, lrs: Sequence[float], seeds: Sequence[int], common: dict,
                 out: Path | None) -> float | None:
    """Sweep ``lrs`` for method ``name``, emit the ``sweep`` lines and the chosen lr's ``curve`` lines."""
    runs: dict[tuple[float, int], dict] = {}
    for lr in lrs:
        for seed in seeds:
            rec, model = run_method(name, bench, lr, seed)
            del model
            runs[(lr, seed)] = rec
            emit({"kind": "sweep", **common, **{k: rec[k] for k in ("method", "lr", "seed", "val_loss", "diverged",
                                                                    "wall_s")}}, out)
    chosen = select_lr({lr: [runs[(lr, s)]["val_loss"] for s in seeds] for lr in lrs})
    if chosen is not None:
        for seed in seeds:
            rec = runs[(chosen, seed)]
            emit({"kind": "curve", **common, **rec, "lrs": list(lrs)}, out)
    return chosen


# ---- CLI ------------------------------------------------------------------------------------------


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def run_task(task: str, args: argparse.Namespace, out: Path | None) -> dict[str, float | None]:
    """Sweep and record every method on ``task``; returns ``{method: chosen lr}``."""
    from simulations.run import project_run_config

    run_config = {**project_run_config(), "task": task, "model": args.model, "rank": args.rank,
                  "alpha": args.alpha, "device": args.device}
    cfg = parse_run_config(run_config)
    base, tok = load_model(args.model, cfg.quant, compute_dtype=cfg.torch_compute_dtype())
    split, partitions = load_split(run_config, tok, args)
    bench = Bench(args.model, tok, split, cfg, args.steps, args.eval_every, args.batch_size, args.seq_len, args.rank,
                  args.alpha, args.warmup_frac, args.scale_init, tuple(s for s in args.scales.split(",") if s),
                  args.scale_lr)
    initial = bench.evaluate_sets(base.to(cfg.torch_device()))  # every method starts as a no-op adapter on it
    del base
    common = {"task": task, "model": args.model, "rank": args.rank, "alpha": args.alpha, "batch_size": args.batch_size,
              "seq_len": args.seq_len, "eval_set": args.eval_set, "initial_eval_loss": initial[split.primary],
              "scales": ",".join(bench.scales), "scale_lr": bench.scale_lr}
    emit({"kind": "setup", **common, "partitions": partitions, "n_train": len(split.train), "n_val": len(split.val),
          "n_dropped": split.dropped, "n_eval": {k: len(v) for k, v in split.eval_sets.items()},
          "n_eval_scored": {k: len(trainable(tok, v, args.seq_len)) for k, v in split.eval_sets.items()},
          "initial_eval_sets": initial, "total_steps": args.steps, "eval_every": args.eval_every}, out)
    methods = [m for m in args.methods.split(",") if m] or list(METHODS)
    chosen = {m: sweep_method(m, bench, _floats(args.lrs), _ints(args.seeds), common, out) for m in methods}
    emit({"kind": "chosen_lr", "task": task, "model": args.model, "rank": args.rank, "steps": args.steps,
          "lrs": chosen}, out)
    return chosen


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """CLI arguments; ``--quick`` fills in tiny-llama smoke settings wherever a flag was not given."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", help="comma list of shakespeare, gsm, skills, ... (default: shakespeare,gsm)")
    p.add_argument("--model", help="smollm2-135m (default) | tiny-llama")
    for flag, typ in (("--steps", int), ("--eval-every", int), ("--batch-size", int), ("--seq-len", int),
                      ("--rank", int), ("--alpha", float), ("--eval-examples", int), ("--warmup-frac", float),
                      ("--val-fraction", float), ("--min-val", int), ("--supernodes", int)):
        p.add_argument(flag, type=typ)
    p.add_argument("--lrs", help="comma list swept per method (default 3e-4,1e-3,3e-3)")
    p.add_argument("--methods", help=f"comma list of {', '.join(METHODS)} (default: all)")
    p.add_argument("--seeds", help="comma list (default 0)")
    p.add_argument("--eval-set", choices=("clients", "server"),
                   help="server: the federation's own eval sets, so curves compare with its rounds (default); clients: the training clients' pooled held-out examples")
    p.add_argument("--scale-init", choices=SCALE_INITS, help="fresh LoRDBA scales (default normalized)")
    p.add_argument("--scales", help="LoRDBA scale set, a comma list of in, mid, out (default in,mid,out; the "
                   "federation's default is mid,out)")
    p.add_argument("--scale-lr", choices=SCALE_LRS, help="how lr reaches each scale (default uniform)")
    p.add_argument("--device", help="auto (CUDA if visible) | cpu | cuda")
    p.add_argument("--out", help="JSON-lines file appended to (default results/centralized.jsonl, --quick: "
                   "results/centralized-quick.jsonl); '' for none")
    p.add_argument("--quick", action="store_true", help="tiny-llama, 4 steps, 1 lr: a smoke run of seconds")
    args = p.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None and k != "quick"}
    return argparse.Namespace(**{**DEFAULTS, **(QUICK if args.quick else {}), **given, "quick": args.quick})


def main(argv: list[str] | None = None) -> None:
    """Run every requested task (see the module docstring)."""
    args = parse_args(argv)
    unknown = sorted(set(m for m in args.methods.split(",") if m) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; known: {sorted(METHODS)}")
    out = Path(args.out) if args.out else None
    for task in [t for t in args.task.split(",") if t]:
        run_task(task, args, out)


if __name__ == "__main__":
    main()
