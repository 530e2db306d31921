"""How much of a scale delta survives its wire codes: every uplink encoding and rounding on the real
scale deltas of a finished LoRDBA run.

The run's checkpoint (``--run-dir``, written by ``simulations.frontier`` / ``lordba-fl run``) keeps
the broadcast scales of its last ``server.history`` versions. The difference between two
consecutive versions is one round's aggregated scale delta, of the size and spread a client's
uplink delta has (three clients' mean). Each is encoded as an update frame (no flips) with
``codec.scale-encoding`` q8 / q4 / q3 / q2 and ``codec.scale-rounding`` stochastic / nearest, decoded,
and compared. One JSON line per (encoding, rounding), medians over the run's versions:

- ``rel_sq_error``: ``|decoded - delta|^2 / |delta|^2`` of one round (no error feedback; with
  ``--fractions`` below 1, what ``codec.scale-fraction`` leaves for later counts as error);
- ``nonzero``: the fraction of codes that are not zero;
- ``scale_section_bytes``: the scale section as zstd compresses it inside the frame (the frame's
  bytes less those of the same frame with zero deltas), and ``code_entropy_bytes``: the codes'
  empirical entropy (bits per code x codes / 8) plus one fp16 step per segment.

Usage: ``python -m simulations.bench_scale_codes --run-dir results/frontier-15-rounds/skills/lordba-step-decay-h16-lr2-r16-s0
--variant lordba-step-decay-h16-lr2 --task skills``
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch

from simulations.common import emit

ENCODINGS = ("q8", "q4", "q3", "q2")
ROUNDINGS = ("stochastic", "nearest")


def version_deltas(run_dir: Path) -> list[np.ndarray]:
    """Consecutive differences of the broadcast scales the run's latest checkpoint keeps, oldest first."""
    from safetensors.numpy import load_file

    latest = json.loads((run_dir / "latest.json").read_text())
    path = run_dir / f"ckpt-{latest['round']}.safetensors"
    tensors = load_file(str(path))
    history = sorted((int(k.split(".")[1]), v) for k, v in tensors.items() if k.startswith("history_scales."))
    versions = [v for _, v in history] + [tensors["scales"]]
    return [(b - a).astype(np.float32) for a, b in zip(versions, versions[1:])]


def code_entropy_bits(codes: np.ndarray) -> float:
    """Empirical entropy of integer codes, bits per code."""
    _, counts = np.unique(codes, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def measure(spec, deltas: list[np.ndarray], encoding: str, rounding: str, fraction: float = 1.0) -> dict:
    from lordba_fl.methods.lordba.codec import CodecOptions, Update, _encode_uplink_scales, decode_update, encode_update

    opts = CodecOptions(scale_encoding=encoding, scale_rounding=rounding, scale_fraction=fraction)
    flips = torch.zeros(spec.n_bits, dtype=torch.bool)
    empty = len(encode_update(Update(1, 0, flips, torch.zeros(spec.n_scales)), spec, opts, rng=0))
    errors, nonzero, section, entropy = [], [], [], []
    for i, d in enumerate(deltas):
        frame = encode_update(Update(1, 0, flips, torch.from_numpy(d)), spec, opts, rng=i)
        got = decode_update(frame, spec, opts).scale_delta.numpy()
        errors.append(float(((got - d) ** 2).sum() / max((d.astype(np.float64) ** 2).sum(), 1e-30)))
        raw = _encode_uplink_scales(d, spec, opts, i)  # the section's bytes before zstd: fp16 steps, codes
        steps = np.repeat(np.frombuffer(raw[: 2 * spec.scale_segments.size], np.float16).astype(np.float32),
                          spec.scale_segments)
        codes = np.rint(np.divide(got, steps, out=np.zeros_like(got), where=steps > 0)).astype(np.int64)
        nonzero.append(float((codes != 0).mean()))
        section.append(len(frame) - empty)
        entropy.append(code_entropy_bits(codes) * codes.size / 8 + 2 * spec.scale_segments.size)
    return {"bench": "scale_codes", "encoding": encoding, "rounding": rounding, "fraction": fraction, "versions": len(deltas),
            "rel_sq_error": statistics.median(errors), "nonzero": statistics.median(nonzero),
            "scale_section_bytes": statistics.median(section), "code_entropy_bytes": statistics.median(entropy)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", type=Path, required=True, help="a LoRDBA run folder with a checkpoint (latest.json)")
    p.add_argument("--variant", default="lordba-step-decay-h16-lr2", help="the frontier variant the run used")
    p.add_argument("--task", default="skills")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--fractions", default="1", help="comma list of codec.scale-fraction values to measure")
    p.add_argument("--encodings", default=",".join(ENCODINGS), help="comma list of q8, q4, q3, q2")
    p.add_argument("--out", type=Path, default=Path("results/bench_scale_codes.jsonl"))
    args = p.parse_args(argv)

    from lordba_fl.base.models import load_model
    from lordba_fl.methods import make_method
    from lordba_fl.runconfig import parse_run_config
    from simulations.frontier import LEARNING_RATES, plan_runs, run_config_for
    from simulations.run import project_run_config

    run = plan_runs(args.task, only=[f"{args.variant}-r{args.rank}"], lordba_ranks=(args.rank,))[0]
    cfg = parse_run_config({**project_run_config(), **run_config_for(run, LEARNING_RATES)})
    model, _ = load_model(cfg.model, cfg.quant, compute_dtype=cfg.torch_compute_dtype(), runtime=cfg.model_runtime)
    method = make_method(cfg)
    method.adapt(model)
    deltas = version_deltas(args.run_dir)
    if not deltas:
        raise SystemExit(f"{args.run_dir}: its checkpoint keeps fewer than two versions of the scales")
    if deltas[0].size != method.spec.n_scales:
        raise SystemExit(f"{args.run_dir}: {deltas[0].size} scales per version, the variant's layout has "
                         f"{method.spec.n_scales}: give the run's --variant, --task and --rank")
    for fraction in (float(f) for f in args.fractions.split(",")):
        for encoding in args.encodings.split(","):
            for rounding in ROUNDINGS:
                emit({**measure(method.spec, deltas, encoding, rounding, fraction), "run_dir": str(args.run_dir)}, args.out)


if __name__ == "__main__":
    main()
