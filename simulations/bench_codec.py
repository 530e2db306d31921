"""Wire-codec benchmark on the SmolLM2-135M target set: uplink bytes vs flip rate, and codec speed.

For each flip rate ``p`` a random flip mask (each of the ``n`` sign bits flips with probability ``p``)
is encoded together with scale deltas into one update frame. Prints one JSON line per ``p`` (and
appends them to ``--out``) with:

- ``sign_bytes``: the compressed sign section; ``entropy_bytes``: the bound ``n * H(p) / 8``;
- ``uplink_bytes``: the whole frame with q8 scale deltas (``uplink_bytes_fp16``: with fp16 deltas);
  ``fp16_lora_bytes``: fp16 LoRA factors of the same shapes, and the ratios;
- ``encode_MBps`` / ``decode_MBps``: carrier data (``n / 8`` bytes) per second through the codec's
  sign path (flat bool mask -> compressed section -> bool mask, as inside a frame), medians over
  ``--repeats`` runs interleaved with the baseline ``baseline_*_MBps``: ``numpy.packbits`` + zstd at
  the same level over the same bits; ``frame_encode_MBps`` / ``frame_decode_MBps``: the whole q8
  frame (signs, scales, layer table, CRC, all checks) per carrier megabyte.

Scale deltas (``--scale-deltas``): ``real`` (default) trains the model's scales for ``--train-steps``
AdamW steps (lr 1e-3, signs frozen, the regime DESIGN.md §3 found to learn) on text and takes
``s_k - s^t``; ``gaussian`` draws N(0, 1e-3) deltas without loading weights for the run.

Usage: ``python -m simulations.bench_codec [--rank 16] [--repeats 7] [--scale-deltas real|gaussian]``.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import zstandard

from lordba_fl import LoRDBAConfig, attach_lordba_, load_default_model
from lordba_fl.methods.lordba.codec import (
    CodecOptions,
    Update,
    decode_bits,
    encode_bits,
    decode_update,
    encode_update,
    read_header,
)
from lordba_fl.methods.lordba.layout import AdapterSpec, read_scales
from simulations.common import emit

FLIP_RATES = (0.001, 0.01, 0.05, 0.2, 0.5)


def entropy_bytes(n: int, p: float) -> float:
    """``n * H(p) / 8``: the fewest bytes any code can spend on ``n`` independent Bernoulli(p) bits."""
    if p <= 0 or p >= 1:
        return 0.0
    return n * -(p * math.log2(p) + (1 - p) * math.log2(1 - p)) / 8


def _text_corpus() -> str:
    """Real English prose available offline: docstrings of standard-library modules."""
    import argparse as a
    import collections
    import email
    import json as j
    import logging
    import pathlib
    import subprocess
    import unittest

    return "\n\n".join(inspect.getdoc(m) or "" for m in (a, collections, email, j, logging, pathlib, subprocess, unittest))


def real_scale_deltas(
    rank: int, scales: tuple[str, ...], steps: int, batch: int, seq: int
) -> tuple[AdapterSpec, torch.Tensor]:
    """Train only the scales of a fresh r-``rank`` adapter for ``steps`` steps; return (spec, s_k - s^0)."""
    model, tok = load_default_model()
    attach_lordba_(model, LoRDBAConfig(rank=rank, scales=scales, seed=0))
    spec = AdapterSpec.from_model(model)
    before = read_scales(model, spec)
    params = [p for n, p in model.named_parameters() if "lordba_scale" in n]
    for n, p in model.named_parameters():
        p.requires_grad_("lordba_scale" in n)
    ids = tok(_text_corpus(), return_tensors="pt").input_ids[0]  # (T,)
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    model.train()
    for step in range(steps):
        starts = [(step * batch + b) * seq % (ids.numel() - seq - 1) for b in range(batch)]
        x = torch.stack([ids[s : s + seq] for s in starts])  # (B, T)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return spec, read_scales(model, spec) - before


def gaussian_scale_deltas(rank: int, scales: tuple[str, ...]) -> tuple[AdapterSpec, torch.Tensor]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from lordba_fl.base.models import default_model_dir

    config = LlamaConfig.from_pretrained(default_model_dir())
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    shapes = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    from lordba_fl.adapter.config import DEFAULT_TARGET_MODULES
    from lordba_fl.methods.lordba.layout import LayerSpec, model_fingerprint

    cfg = LoRDBAConfig(rank=rank, scales=scales)
    layers = tuple(
        LayerSpec(n, i, o, rank) for n, (i, o) in shapes.items() if n.rsplit(".", 1)[-1] in DEFAULT_TARGET_MODULES
    )
    spec = AdapterSpec(layers, cfg.scales, model_fingerprint("gaussian", cfg.scaling))
    return spec, torch.randn(spec.n_scales, generator=torch.Generator().manual_seed(0)) * 1e-3


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(spec: AdapterSpec, delta: torch.Tensor, p: float, repeats: int, level: int) -> dict:
    n = spec.n_bits
    flips = torch.rand(n, generator=torch.Generator().manual_seed(int(p * 1e6))) < p
    bits = flips.numpy()
    q8 = CodecOptions(level=level, scale_encoding="q8")
    fp16 = CodecOptions(level=level, scale_encoding="fp16")
    update = Update(round=1, version=0, flips=flips, scale_delta=delta)
    frame = encode_update(update, spec, q8, rng=0)
    frame16 = encode_update(update, spec, fp16, rng=0)
    h = read_header(frame)
    decoded = decode_update(frame, spec, q8)
    assert torch.equal(decoded.flips, flips), "sign round trip must be exact"

    comp = zstandard.ZstdCompressor(level=level)
    dec = zstandard.ZstdDecompressor()

    def ours_encode():
        enc, n_set, raw = encode_bits(bits)
        return enc, n_set, comp.compress(raw)

    enc, n_set, section = ours_encode()

    def ours_decode():
        return decode_bits(enc, dec.decompress(section), n, n_set)

    def base_encode():
        return comp.compress(np.packbits(bits, bitorder="little").tobytes())

    base_section = base_encode()

    def base_decode():
        return np.unpackbits(np.frombuffer(dec.decompress(base_section), np.uint8), count=n, bitorder="little").view(bool)

    assert np.array_equal(ours_decode(), bits) and np.array_equal(base_decode(), bits)
    # interleave the four paths so machine noise hits them alike
    t = {k: [] for k in ("oe", "od", "be", "bd", "fe", "fd")}
    for _ in range(repeats):
        t["oe"].append(_median_time(ours_encode, 1))
        t["be"].append(_median_time(base_encode, 1))
        t["od"].append(_median_time(ours_decode, 1))
        t["bd"].append(_median_time(base_decode, 1))
        t["fe"].append(_median_time(lambda: encode_update(update, spec, q8, rng=0), 1))
        t["fd"].append(_median_time(lambda: decode_update(frame, spec, q8), 1))
    mb = n / 8 / 1e6
    mbps = {k: round(mb / statistics.median(v), 1) for k, v in t.items()}
    lora = spec.fp16_lora_bytes()
    ent = entropy_bytes(n, p)
    return {
        "bench": "codec_uplink",
        "p": p,
        "rank": spec.layers[0].rank,
        "n_bits": n,
        "n_scales": spec.n_scales,
        "flips": n_set,
        "sign_encoding": ["packed", "gaps"][h.sign_encoding],
        "sign_bytes": h.sign_comp,
        "entropy_bytes": round(ent),
        "sign_over_entropy": round(h.sign_comp / ent, 3) if ent else None,
        "baseline_sign_bytes": len(base_section),
        "scale_bytes": h.scale_comp,
        "table_bytes": h.table_comp,
        "uplink_bytes": len(frame),
        "uplink_bytes_fp16": len(frame16),
        "fp16_lora_bytes": lora,
        "lora_over_uplink": round(lora / len(frame), 2),
        "lora_over_uplink_fp16": round(lora / len(frame16), 2),
        "encode_MBps": mbps["oe"],
        "decode_MBps": mbps["od"],
        "baseline_encode_MBps": mbps["be"],
        "baseline_decode_MBps": mbps["bd"],
        "frame_encode_MBps": mbps["fe"],
        "frame_decode_MBps": mbps["fd"],
        "level": level,
        "repeats": repeats,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--flip-rates", type=float, nargs="+", default=list(FLIP_RATES))
    p.add_argument("--repeats", type=int, default=7, help="timed runs per path, interleaved; medians are reported")
    p.add_argument("--level", type=int, default=3, help="zstd level for ours and the baseline")
    p.add_argument("--scale-deltas", choices=["real", "gaussian"], default="real")
    p.add_argument(
        "--scale-sets", nargs="+", default=["in,mid,out", "mid,out"], help="adapter scale sets to measure, comma-separated"
    )
    p.add_argument("--train-steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--out", type=Path, default=Path("results/bench_codec.jsonl"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    for scale_set in args.scale_sets:
        scales = tuple(scale_set.split(","))
        t1 = time.perf_counter()
        if args.scale_deltas == "real":
            spec, delta = real_scale_deltas(args.rank, scales, args.train_steps, args.batch, args.seq)
        else:
            spec, delta = gaussian_scale_deltas(args.rank, scales)
        d = delta.numpy()
        emit(
            {
                "bench": "codec_scale_deltas",
                "source": args.scale_deltas,
                "scales": scale_set,
                "train_steps": args.train_steps if args.scale_deltas == "real" else None,
                "n_scales": spec.n_scales,
                "abs_mean": float(np.abs(d).mean()),
                "abs_max": float(np.abs(d).max()),
                "zero_fraction": float((d == 0).mean()),
                "setup_s": round(time.perf_counter() - t1, 1),
            },
            args.out,
        )
        for rate in args.flip_rates:
            rec = measure(spec, delta, rate, args.repeats, args.level)
            rec["scale_deltas"] = args.scale_deltas
            rec["scales"] = scale_set
            emit(rec, args.out)
    emit({"bench": "codec_total", "wall_s": round(time.perf_counter() - t0, 1)}, args.out)


if __name__ == "__main__":
    main()
