"""Batched multi-client training vs K sequential clients: client-steps per second and agreement.

For each K, K Shakespeare clients (real data, default local-training settings) start from the same
broadcast with their own seeds; they train once one after another (:func:`train_sequential`, what a
worker does today) and once together over one shared base forward (:func:`train_batched`).
Repetitions are interleaved and the median wall time is reported. One JSON line per K with
``client_steps_per_s`` for both, their ratio, and how far the two results are apart.

Usage: ``python -m simulations.bench_batched [--k 1 2 4 8] [--model smollm2-135m] [--device auto]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from lordba_fl.base.models import load_model
from lordba_fl.data import load_task
from lordba_fl.methods import make_method
from lordba_fl.methods.lordba import budget_flips
from lordba_fl.runconfig import RunConfig, parse_run_config
from lordba_fl.train import encode_examples, micro_batches
from lordba_fl.methods.lordba.layout import read_latents, read_scales
from simulations.batched import ClientJob, train_batched, train_sequential
from simulations.common import emit


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def padded_tokens(tok, jobs: list[ClientJob], cfg) -> tuple[int, int, int]:
    """(real tokens, tokens computed sequentially, tokens computed batched) over all micro-batches:
    a sequential client pads to its own longest row, the batch to the longest of all K clients."""
    streams = [micro_batches(encode_examples(tok, j.examples, cfg.seq_len), cfg, j.seed) for j in jobs]
    real = seq = bat = 0
    for _ in range(cfg.steps * cfg.grad_accum):
        blocks = [[len(ids) for ids, _ in next(s)] for s in streams]
        real += sum(map(sum, blocks))
        seq += sum(len(b) * max(b) for b in blocks)
        bat += sum(map(len, blocks)) * max(map(max, blocks))
    return real, seq, bat


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="auto")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=0, help="local steps per client (0: the run config's default)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=Path("results/bench_batched.jsonl"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {"model": args.model, "device": args.device}
    if args.steps:
        overrides["train.local-steps"] = args.steps
    cfg: RunConfig = parse_run_config(overrides)
    device = cfg.torch_device()
    model, tok = load_model(cfg.model, cfg.quant)
    method = make_method(cfg)
    model = method.adapt(model).to(device)
    spec = method.spec
    task = load_task("shakespeare", progress=False, **cfg.task_kwargs())
    flip = method.cfg.flip  # LoRDBA's own flip settings
    scale_lr = cfg.lr * method.cfg.scale_lr_ratio  # the scales' learning rate, as a LoRDBA client trains them
    latent0 = torch.where(read_latents(model, spec) < 0, -flip.m0, flip.m0)  # (n_bits,): the broadcast
    scales0 = read_scales(model, spec)
    for k in args.k:
        jobs = [ClientJob(latent0, scales0, task.train[i], seed=1000 + i) for i in range(k)]
        run = {
            "sequential": lambda: train_sequential(model, spec, tok, jobs, cfg.train, scale_lr, flip.latent_lr),
            "batched": lambda: train_batched(model, spec, tok, jobs, cfg.train, scale_lr, flip.latent_lr),
        }
        times: dict[str, list[float]] = {name: [] for name in run}
        results = {}
        for _ in range(args.reps):
            for name, fn in run.items():
                _sync(device)
                t0 = time.perf_counter()
                results[name] = fn()
                _sync(device)
                times[name].append(time.perf_counter() - t0)
        steps = k * cfg.train.steps
        real, seq_tokens, bat_tokens = padded_tokens(tok, jobs, cfg.train)
        med = {name: statistics.median(t) for name, t in times.items()}
        lat_diff = max(float((a[0] - b[0]).abs().max()) for a, b in zip(results["sequential"], results["batched"]))
        sc_diff = max(float((a[1] - b[1]).abs().max()) for a, b in zip(results["sequential"], results["batched"]))
        flips = [
            float((budget_flips(a[0], latent0 < 0, flip.flip_budget)
                   ^ budget_flips(b[0], latent0 < 0, flip.flip_budget)).float().mean())
            for a, b in zip(results["sequential"], results["batched"])
        ]
        emit({
            "bench": "batched",
            "model": cfg.model,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "k": k,
            "local_steps": cfg.train.steps,
            "batch_size": cfg.train.batch_size,
            "seq_len": cfg.train.seq_len,
            "reps": args.reps,
            "sequential_s": round(med["sequential"], 3),
            "batched_s": round(med["batched"], 3),
            "sequential_client_steps_per_s": round(steps / med["sequential"], 3),
            "batched_client_steps_per_s": round(steps / med["batched"], 3),
            "speedup": round(med["sequential"] / med["batched"], 3),
            "real_tokens": real,
            "computed_tokens_sequential": seq_tokens,
            "computed_tokens_batched": bat_tokens,
            "max_abs_diff_latent": lat_diff,
            "max_abs_diff_scales": sc_diff,
            "flip_mask_disagreement_max": max(flips),
            "times_s": {name: [round(t, 3) for t in ts] for name, ts in times.items()},
        }, args.out)


if __name__ == "__main__":
    main()
