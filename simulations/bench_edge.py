"""One LoRDBA client round on an edge profile, in a fresh process: start time, memory, step time, bytes.

Under Flower's deployment engine every message starts a new ClientApp process, so this measures
exactly that: a new Python process that imports the stack, memory-maps the quantized base, attaches
the adapter, decodes a first-contact (full-state) downlink, trains ``train.local-steps`` steps on
one Shakespeare client and encodes its uplink. Resident memory is sampled at each phase and its
peak read from the kernel (``VmHWM``) so the breakdown shows where memory goes: imports, base,
adapter, decoded broadcast, first training step (activations, gradients, optimizer state).

One JSON line per run with ``peak_rss_MB``, ``step_s`` (median), ``start_to_first_step_s``,
``uplink_bytes``, ``downlink_bytes`` and the breakdown. ``--profile edge`` (default) is batch 1,
gradient checkpointing, bf16 where the device has it; ``--run-config`` adds overrides.

Usage: ``python -m simulations.bench_edge [--profile edge|none] [--run-config "quant='nf4'"] [--reps 3]``.

``--sweep --reps 1 --out lordba_fl/edge_memory.jsonl`` writes the memory table a node with
``memory-mb`` in its node config chooses from (one ``kind: "memory"`` line per rank x batch x
checkpointing: its peak RSS); run it on the device class the table is for.
"""

from __future__ import annotations

import time

T_PROCESS = time.perf_counter()  # before any heavy import: a fresh client process starts here

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    """This process's peak resident memory: the kernel's high-water mark of its own address space
    (``VmHWM``). Not ``ru_maxrss``: Linux carries the parent's resident size at fork into the child's
    ``ru_maxrss`` across ``exec``, so a child started by a larger parent (this benchmark, which built the
    server's frame with a model loaded) would report the parent's size. ``ru_maxrss`` where there is no
    ``/proc`` (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, bytes on macOS


def child(overrides: dict, frame_path: Path) -> dict:
    """The measured client process (``--child``)."""
    marks: dict[str, dict] = {}

    def mark(name: str) -> None:
        marks[name] = {"t_s": round(time.perf_counter() - T_PROCESS, 3), "rss_MB": round(_rss_mb(), 1),
                       "peak_MB": round(_peak_mb(), 1)}

    import flwr.clientapp  # noqa: F401  (what the ClientApp process imports first)
    import torch

    import lordba_fl.methods.lordba.method as lordba_method
    from lordba_fl.base.models import load_model
    from lordba_fl.data import load_client_data
    from lordba_fl.methods import make_method
    from lordba_fl.runconfig import parse_run_config
    from lordba_fl.train import return_freed_memory

    cfg = parse_run_config(overrides)
    if cfg.model_runtime == "transformers":  # what loading that model imports (the lean runtime imports neither)
        import transformers.models.llama.modeling_llama  # noqa: F401
        from transformers import PreTrainedTokenizerFast  # noqa: F401
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    mark("imports")
    if cfg.train.return_memory:
        return_freed_memory()  # what the ClientApp does first (lordba_fl.federation.apps._config)
    model, tok = load_model(cfg.model, cfg.quant, compute_dtype=cfg.torch_compute_dtype(), runtime=cfg.model_runtime)
    mark("base")
    method = make_method(cfg)
    model = method.adapt(model).to(cfg.torch_device())
    mark("adapter")
    examples = load_client_data(cfg.task, 0, **cfg.task_kwargs()).train
    frame = frame_path.read_bytes()
    mark("data")

    steps: list[float] = []
    original = lordba_method.train_local

    def timed_train_local(*args, **kwargs):
        last = [time.perf_counter()]
        inner = kwargs.pop("after_step", None)  # the method's own (flip.every-step): part of the step

        def after_step(step):
            if inner is not None:
                inner(step)
            now = time.perf_counter()
            steps.append(now - last[0])
            last[0] = now
            if step == 0:
                mark("first_step")

        mark("decoded")  # client_train decodes the broadcast and loads it before training
        return original(*args, after_step=after_step, **kwargs)

    lordba_method.train_local = timed_train_local
    state = None  # first contact: nothing held, a full-state downlink
    uplink, metrics = method.client_train(model, tok, frame, state, examples, 1, seed=1)
    mark("uplink")
    n_trainable = method.spec.n_bits + method.spec.n_scales
    return {
        "marks": marks,
        "step_s": statistics.median(steps[1:] or steps),
        "first_step_s": steps[0],
        "uplink_bytes": len(uplink),
        "train_loss": metrics["train_loss"],
        "trainable_params": n_trainable,
        "torch_threads": torch.get_num_threads(),
        "compute_dtype": str(cfg.torch_compute_dtype()),
        "heavy_modules": sorted(m for m in ("peft", "bitsandbytes", "transformers.modeling_utils", "torch._dynamo",
                                            "scipy", "datasets") if m in sys.modules),
    }


def server_frame(overrides: dict, path: Path) -> int:
    """The full-state downlink a client gets on first contact (what every party derives from the seed)."""
    from lordba_fl.base.models import load_model
    from lordba_fl.data import load_client_data
    from lordba_fl.methods import make_method
    from lordba_fl.runconfig import parse_run_config

    cfg = parse_run_config(overrides)
    load_client_data(cfg.task, 0, **cfg.task_kwargs())  # builds the per-partition cache a device keeps
    method = make_method(cfg)
    method.init_server(method.adapt(load_model(cfg.model, cfg.quant)[0]))
    frame = method.downlink(node_id=1, server_round=1)
    path.write_bytes(frame)
    return len(frame)


def measure(profile: str, run_config: str, reps: int, threads: int, frame_path: Path) -> list[dict]:
    """``reps`` client rounds, each in a fresh process (``--child``); their records."""
    runs = []
    env = dict(os.environ, BENCH_THREADS=str(threads), FLWR_TELEMETRY_ENABLED="0")
    for _ in range(reps):
        cmd = [sys.executable, "-m", "simulations.bench_edge", "--profile", profile, "--child", str(frame_path)]
        if run_config:
            cmd += ["--run-config", run_config]
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise SystemExit(f"client process failed:\n{r.stderr[-3000:]}")
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    return runs


def sweep(args: argparse.Namespace, overrides: dict, frame_path: Path) -> None:
    """``--sweep``: the memory table ``memory-mb`` nodes choose from (lordba_fl.hetero.fit_memory): the
    peak RSS (median of ``--reps``) of one client round at every rank x batch x checkpointing."""
    from flwr.common.config import parse_config_args

    from lordba_fl.runconfig import parse_run_config
    from simulations.common import emit

    for rank in args.ranks:
        grid = f"rank={rank} alpha={2.0 * rank}"
        server_frame({**overrides, **parse_config_args([grid])}, frame_path)
        for batch in args.batches:
            for ckpt in (True, False):
                extra = f"{grid} train.batch-size={batch} train.gradient-checkpointing={str(ckpt).lower()}"
                run_config = f"{args.run_config} {extra}".strip()
                cfg = parse_run_config({**overrides, **parse_config_args([run_config])})
                runs = measure(args.profile, run_config, args.reps, args.threads, frame_path)
                emit({"bench": "edge", "kind": "memory", "model": cfg.model, "quant": cfg.quant,
                      "model_runtime": cfg.model_runtime,
                      "seq_len": cfg.train.seq_len, "rank": rank, "batch_size": batch, "gradient_checkpointing": ckpt,
                      "peak_rss_MB": statistics.median(r["marks"]["uplink"]["peak_MB"] for r in runs),
                      "step_s": round(statistics.median(r["step_s"] for r in runs), 3), "reps": args.reps,
                      "threads": args.threads, "profile": args.profile}, args.out)


def main(argv: list[str] | None = None) -> None:
    from lordba_fl.runconfig import PROFILES
    from simulations.common import emit

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--profile", default="edge", choices=["none", *PROFILES])
    p.add_argument("--run-config", default="", help="extra overrides, e.g. \"quant='nf4' train.local-steps=8\"")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--sweep", action="store_true",
                   help="the memory table for client memory-mb: every --ranks x --batches x checkpointing on/off")
    p.add_argument("--ranks", nargs="+", type=int, default=[16, 8, 4])
    p.add_argument("--batches", nargs="+", type=int, default=[4, 2, 1])
    p.add_argument("--out", type=Path, default=Path("results/bench_edge.jsonl"))
    args = p.parse_args(argv)
    from flwr.common.config import parse_config_args

    overrides = {"model": "smollm2-135m", "train.local-steps": 4, **PROFILES.get(args.profile, {})}
    if args.run_config:
        overrides.update(parse_config_args([args.run_config]))
    if args.child:
        print(json.dumps(child(overrides, args.child)))
        return
    import tempfile

    frame_path = Path(tempfile.mkdtemp(prefix="lordba-edge-")) / "downlink.bin"  # not beside --out (e.g. the package)
    if args.sweep:
        sweep(args, overrides, frame_path)
        return
    down = server_frame(overrides, frame_path)
    runs = measure(args.profile, args.run_config, args.reps, args.threads, frame_path)
    med = lambda f: statistics.median(f(r) for r in runs)  # noqa: E731
    m = runs[-1]["marks"]
    n = runs[-1]["trainable_params"]
    emit({
        "bench": "edge",
        "profile": args.profile,
        "overrides": overrides,
        "reps": args.reps,
        "threads": args.threads,
        "compute_dtype": runs[-1]["compute_dtype"],
        "peak_rss_MB": med(lambda r: r["marks"]["uplink"]["peak_MB"]),
        "step_s": round(med(lambda r: r["step_s"]), 3),
        "start_to_first_step_s": round(med(lambda r: r["marks"]["first_step"]["t_s"]), 3),
        "import_s": round(med(lambda r: r["marks"]["imports"]["t_s"]), 3),
        "base_load_s": round(med(lambda r: r["marks"]["base"]["t_s"] - r["marks"]["imports"]["t_s"]), 3),
        "uplink_bytes": runs[-1]["uplink_bytes"],
        "downlink_bytes": down,
        "train_loss": runs[-1]["train_loss"],
        "heavy_modules": runs[-1]["heavy_modules"],
        # where memory goes (last run): resident MB after each phase, and what each phase added
        "rss_after_MB": {k: v["rss_MB"] for k, v in m.items()},
        "added_MB": {
            "imports": m["imports"]["rss_MB"],
            "base": round(m["base"]["rss_MB"] - m["imports"]["rss_MB"], 1),
            "adapter": round(m["adapter"]["rss_MB"] - m["base"]["rss_MB"], 1),
            "client data + decoded broadcast": round(m["decoded"]["rss_MB"] - m["adapter"]["rss_MB"], 1),
            "first step peak (activations, grads, optimizer)": round(m["first_step"]["peak_MB"] - m["decoded"]["rss_MB"], 1),
        },
        # exact sizes of the fp32 training state of the trainable tensors
        "grads_MB": round(4 * n / 2**20, 1),
        "adamw_state_MB": round(8 * n / 2**20, 1),
    }, args.out)


if __name__ == "__main__":
    main()
