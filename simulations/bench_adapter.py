"""Adapter benchmark on the embedded SmolLM2-135M with an nf4 base: LoRDBA vs PEFT LoRA.

Prints JSON lines (and appends them to ``--out``):

- ``file``: packed LoRDBA file bytes (three scales and ``out,mid`` only) vs an fp16 PEFT LoRA file of
  the same targets and rank.
- ``train_step``: one AdamW training step (batch 4 x 128 tokens) per method, each method in its own
  fresh process so that its peak RSS is its own; medians over ``--steps`` timed steps.
- ``train_step_ratio``: LoRDBA / LoRA step time and peak RSS, per rank.
- ``prefill``: no-grad forward latency of base alone, LoRDBA and LoRA, in fp32 and bf16 compute,
  measured round-robin in one process so that machine noise hits all three alike.

Usage: ``python -m simulations.bench_adapter [--ranks 8 16 32] [--steps 4]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from lordba_fl import LoRDBAConfig, attach_lordba_, load_default_model, save_lordba
from lordba_fl.adapter.config import DEFAULT_TARGET_MODULES
from simulations.common import emit

VOCAB = 49152


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_hwm() -> bool:
    try:  # Linux: writing 5 to clear_refs resets the peak-RSS counter (VmHWM) of this process
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _lora(model, rank: int):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(DEFAULT_TARGET_MODULES), lora_dropout=0.0)
    return get_peft_model(model, cfg)


def _adapted(method: str, rank: int, quant: str, dtype: torch.dtype):
    model, _ = load_default_model(quant, compute_dtype=dtype)
    if method == "lordba":
        attach_lordba_(model, LoRDBAConfig(rank=rank, alpha=2 * rank, seed=0))
    elif method == "lora":
        model = _lora(model, rank)
    elif method != "base":
        raise ValueError(f"unknown method {method!r}")
    return model


# --------------------------------------------------------------------------------------------------
# Workers (run in fresh processes)


def worker_train(rank: int, method: str, steps: int, batch: int, seq: int, quant: str) -> dict:
    torch.manual_seed(0)
    model = _adapted(method, rank, quant, torch.float32)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(0))
    rss_before = _rss_mb()
    reset = _reset_hwm()
    times = []
    for i in range(steps + 1):  # the first step allocates optimizer state and warms up kernels
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    return {
        "bench": "train_step",
        "method": method,
        "rank": rank,
        "quant": quant,
        "batch": batch,
        "seq": seq,
        "step_s": statistics.median(times),
        "step_s_all": [round(t, 4) for t in times],
        "peak_rss_MB": round(_hwm_mb(), 1),
        "peak_is_training_only": reset,
        "rss_before_steps_MB": round(rss_before, 1),
        "trainable_params": sum(p.numel() for p in params),
        "loss": float(loss),
    }


def worker_prefill(rank: int, dtype_name: str, tokens: int, reps: int, quant: str) -> dict:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    torch.manual_seed(0)
    base, _ = load_default_model(quant, compute_dtype=dtype)
    lordba = copy.deepcopy(base)
    attach_lordba_(lordba, LoRDBAConfig(rank=rank, alpha=2 * rank, seed=0))
    lora = _lora(copy.deepcopy(base), rank)
    if dtype != torch.float32:
        for n, p in lora.named_parameters():
            if "lora_" in n:
                p.data = p.data.to(dtype)  # an inference-time LoRA in the compute dtype, as users run it
    models = {"base": base, "lordba": lordba, "lora": lora}
    ids = torch.randint(0, VOCAB, (1, tokens), generator=torch.Generator().manual_seed(1))
    times = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():
            m.eval()(input_ids=ids)  # warm-up
        for _ in range(reps):
            for k, m in models.items():
                t0 = time.perf_counter()
                m(input_ids=ids)
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "bench": "prefill",
        "rank": rank,
        "dtype": dtype_name,
        "quant": quant,
        "tokens": tokens,
        "base_ms": round(1e3 * med["base"], 2),
        "lordba_ms": round(1e3 * med["lordba"], 2),
        "lora_ms": round(1e3 * med["lora"], 2),
        "lordba_vs_base": round(med["lordba"] / med["base"], 4),
        "lordba_vs_lora": round(med["lordba"] / med["lora"], 4),
        "lora_vs_base": round(med["lora"] / med["base"], 4),
    }


def file_sizes(rank: int, quant: str) -> dict:
    from peft import LoraConfig, get_peft_model

    base, _ = load_default_model(quant)
    out = {"bench": "file", "rank": rank}
    with tempfile.TemporaryDirectory() as tmp:
        for label, scales in (("lordba_bytes", ("in", "mid", "out")), ("lordba_out_mid_bytes", ("mid", "out"))):
            model = copy.deepcopy(base)
            attach_lordba_(model, LoRDBAConfig(rank=rank, alpha=2 * rank, scales=scales, seed=0))
            out[label] = save_lordba(model, Path(tmp) / f"{label}.safetensors")
        lora = get_peft_model(
            copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(DEFAULT_TARGET_MODULES))
        )
        for n, p in lora.named_parameters():
            if "lora_" in n:
                p.data = p.data.half()
        lora.save_pretrained(Path(tmp) / "lora")
        out["lora_fp16_bytes"] = (Path(tmp) / "lora" / "adapter_model.safetensors").stat().st_size
    out["ratio"] = round(out["lora_fp16_bytes"] / out["lordba_bytes"], 3)
    out["ratio_out_mid"] = round(out["lora_fp16_bytes"] / out["lordba_out_mid_bytes"], 3)
    return out


# --------------------------------------------------------------------------------------------------
# Driver


def _run_worker(kind: str, **kwargs) -> dict:
    cmd = [sys.executable, "-m", "simulations.bench_adapter", "--worker", json.dumps({"kind": kind, **kwargs})]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if res.returncode != 0:
        raise RuntimeError(f"benchmark worker {kind} {kwargs} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


WORKERS = {"train": worker_train, "prefill": worker_prefill, "file": file_sizes}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--steps", type=int, default=4, help="timed training steps per process (after one warm-up)")
    p.add_argument("--repeats", type=int, default=1, help="fresh processes per (method, rank), alternated")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--prefill-tokens", type=int, default=128)
    p.add_argument("--prefill-reps", type=int, default=5)
    p.add_argument("--quant", default="nf4")
    p.add_argument("--out", type=Path, default=Path("results/bench_adapter.jsonl"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(WORKERS[spec.pop("kind")](**spec)), flush=True)
        return

    args.out.parent.mkdir(parents=True, exist_ok=True)
    for r in args.ranks:
        emit(_run_worker("file", rank=r, quant=args.quant), args.out)
    for r in args.ranks:
        runs = {"lordba": [], "lora": []}
        for _ in range(args.repeats):
            for method in ("lordba", "lora"):
                rec = _run_worker("train", rank=r, method=method, steps=args.steps, batch=args.batch, seq=args.seq,
                                  quant=args.quant)
                runs[method].append(rec)
                emit(rec, args.out)
        step = {m: statistics.median(x["step_s"] for x in v) for m, v in runs.items()}
        peak = {m: statistics.median(x["peak_rss_MB"] for x in v) for m, v in runs.items()}
        emit({"bench": "train_step_ratio", "rank": r, "quant": args.quant,
               "step_ratio": round(step["lordba"] / step["lora"], 4),
               "peak_rss_ratio": round(peak["lordba"] / peak["lora"], 4),
               "lordba_step_s": round(step["lordba"], 4), "lora_step_s": round(step["lora"], 4),
               "lordba_peak_rss_MB": peak["lordba"], "lora_peak_rss_MB": peak["lora"]}, args.out)
    for dtype in ("fp32", "bf16"):
        for r in args.ranks:
            emit(_run_worker("prefill", rank=r, dtype_name=dtype, tokens=args.prefill_tokens,
                              reps=args.prefill_reps, quant=args.quant), args.out)


if __name__ == "__main__":
    main()
