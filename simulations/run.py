"""The main job: a federated LoRDBA run on Flower's simulation engine, on the embedded default.

Reads the run config from ``pyproject.toml``'s ``[tool.flwr.app.config]`` (the same defaults
``flwr run .`` uses), applies ``--run-config`` overrides in Flower's syntax, and runs the same
ServerApp and ClientApp in-process with ``flwr.simulation.run_simulation`` (one virtual SuperNode per
sampled client unless ``--supernodes``). Writes ``<out-dir>/<run>/rounds.jsonl``, a CSV, plots, the
final adapter, and prints the per-round table and sample outputs.

Usage::

    python -m simulations.run                                   # lordba on shakespeare, SmolLM2-135M
    python -m simulations.run --run-config "method='lora-fedavg' rounds=2"
    python -m simulations.run --quick                           # tiny model, 2 rounds: a smoke run
"""

from __future__ import annotations

import argparse
import os
import tomllib
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

PROJECT = Path(__file__).resolve().parents[1]
QUICK = {"model": "tiny-llama", "rounds": 2, "train.local-steps": 2, "train.batch-size": 2, "train.seq-len": 64,
         "eval.examples": 16, "eval.generate": 2}


def project_run_config() -> dict:
    from flwr.common.config import flatten_dict

    with (PROJECT / "pyproject.toml").open("rb") as f:
        return flatten_dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])


def simulate(run_config: dict, supernodes: int | None = None, cpus_per_client: float = 1.0) -> None:
    """Run the ServerApp and ClientApp on Flower's simulation engine with ``run_config``."""
    from flwr.simulation import run_simulation

    from clients.app import make_client_app
    from lordba_fl.runconfig import parse_run_config
    from server.app import make_server_app

    cfg = parse_run_config(run_config)  # fail fast, before Ray starts
    nodes = supernodes or cfg.clients_per_round
    if nodes < cfg.clients_per_round:
        raise ValueError(f"--supernodes {nodes} < clients-per-round {cfg.clients_per_round}: the run would wait forever")
    run_simulation(
        server_app=make_server_app(run_config),
        client_app=make_client_app(run_config),
        num_supernodes=nodes,
        backend_config={"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
                        "init_args": {"num_cpus": os.cpu_count() or 2, "include_dashboard": False}},
    )


def main(argv: list[str] | None = None) -> None:
    from flwr.common.config import parse_config_args

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-config", action="append", default=[], help="overrides, e.g. \"method='lora-q2' rounds=2\"")
    p.add_argument("--supernodes", type=int, default=None, help="virtual SuperNodes (default: clients-per-round)")
    p.add_argument("--cpus-per-client", type=float, default=1.0)
    p.add_argument("--quick", action="store_true", help="tiny random model, 2 short rounds")
    args = p.parse_args(argv)
    run_config = project_run_config()
    if args.quick:
        run_config.update(QUICK)
    run_config.update(parse_config_args(args.run_config) if args.run_config else {})
    simulate(run_config, args.supernodes, args.cpus_per_client)


if __name__ == "__main__":
    main()
