"""The main job: a federated LoRDBA run on Flower's simulation engine, on the embedded default.

Reads the run config from ``pyproject.toml``'s ``[tool.flwr.app.config]``, applies ``--run-config``
overrides in Flower's syntax, and runs this Flower app through Flower's supported path: ``flwr run``
against a private local SuperLink in simulation mode, started for the run and stopped after it (its
own ``FLWR_HOME`` and free ports, so runs never share state; one virtual SuperNode per sampled
client unless ``--supernodes``). ``--engine run-simulation`` runs the same apps in-process with the
deprecated ``flwr.simulation.run_simulation`` instead. Writes ``<out-dir>/<run>/rounds.jsonl``, a CSV,
plots, the final adapter, and prints the per-round table and sample outputs.

Usage::

    python -m simulations.run                                   # lordba on shakespeare, SmolLM2-135M
    python -m simulations.run --run-config "method='lora-fedavg' rounds=2"
    python -m simulations.run --quick                           # tiny model, 2 rounds: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import tomllib

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# the simulated SuperNodes are this user's own processes: they may import the user's plug-ins and read
# the user's files named in the run config (a deployed SuperNode allows neither unless its node config does)
os.environ.setdefault("LORDBA_FL_ALLOW_IMPORTS", "*")
os.environ.setdefault("LORDBA_FL_ALLOW_DATA", "/")

PROJECT = Path(__file__).resolve().parents[1]
QUICK = {"model": "tiny-llama", "rounds": 2, "train.local-steps": 2, "train.batch-size": 2, "train.seq-len": 64,
         "eval.examples": 16, "eval.generate": 2}


def project_run_config() -> dict:
    from flwr.common.config import flatten_dict

    with (PROJECT / "pyproject.toml").open("rb") as f:
        return flatten_dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])


def backend_resources(cpus_per_client: float, gpus_per_client: float, ray_address: str | None = None) -> tuple[dict, dict]:
    """(client resources, Ray init arguments); fractional GPUs let several clients share one device.

    With ``ray_address`` the simulation joins a running Ray cluster (``ray start --head`` on one
    machine, ``ray start --address=<head>:6379`` on the others), whose nodes bring their own CPUs
    and GPUs; otherwise Ray starts here with this machine's.
    """
    if cpus_per_client <= 0 or gpus_per_client < 0:
        raise ValueError("--cpus-per-client must be > 0 and --gpus-per-client >= 0")
    client = {"num_cpus": cpus_per_client, "num_gpus": gpus_per_client}
    if ray_address:
        return client, {"address": ray_address}
    gpus = 0
    if gpus_per_client > 0:
        import torch

        gpus = torch.cuda.device_count()
        if gpus == 0:
            raise ValueError(
                "--gpus-per-client > 0 but no CUDA device is visible; drop the flag to run on CPU, "
                "or pass --ray-address to use the GPUs of a Ray cluster"
            )
    return client, {"num_cpus": os.cpu_count() or 2, "num_gpus": gpus}


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """Fail fast when nothing listens at a Ray head's ``host:port`` (Ray itself retries forever)."""
    import socket

    if address in ("auto", "local") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--ray-address must be host:port (e.g. 10.0.0.1:6379) or 'auto'; got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise ValueError(
            f"no Ray cluster answers at {address} ({e}); start one with 'ray start --head --port {port}' "
            "on that machine, or drop --ray-address to run on this one"
        ) from None


def _check_nodes(run_config: dict, supernodes: int | None) -> int:
    from lordba_fl.runconfig import parse_run_config

    cfg = parse_run_config(run_config)  # fail fast, before Ray starts
    nodes = supernodes or cfg.clients_per_round
    if nodes < cfg.clients_per_round:
        raise ValueError(f"--supernodes {nodes} < clients-per-round {cfg.clients_per_round}: the run would wait forever")
    if cfg.task == "files":  # the data's every check (file, columns, split, target lengths) before any process
        from lordba_fl.data.files import check

        check(cfg.train.seq_len, cfg.model, nodes, **cfg.task_kwargs())
    return nodes


def simulate(run_config: dict, supernodes: int | None = None, cpus_per_client: float = 1.0,
             gpus_per_client: float = 0.0, ray_address: str | None = None) -> None:
    """Run the ServerApp and ClientApp on Flower's simulation engine with ``run_config``."""
    from flwr.simulation import run_simulation

    from clients.app import make_client_app
    from server.app import make_server_app

    nodes = _check_nodes(run_config, supernodes)
    if ray_address:
        check_ray_address(ray_address)
    client, init = backend_resources(cpus_per_client, gpus_per_client, ray_address)
    run_simulation(
        server_app=make_server_app(run_config),
        client_app=make_client_app(run_config),
        num_supernodes=nodes,
        backend_config={"client_resources": client, "init_args": {**init, "include_dashboard": False}},
    )


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def flwr_run(run_config: dict, supernodes: int | None = None, cpus_per_client: float = 1.0,
             gpus_per_client: float = 0.0, ray_address: str | None = None) -> None:
    """``flwr run`` of this app on a private local SuperLink (simulation mode), stopped afterwards."""
    import shutil
    import subprocess
    import sys
    import tempfile
    import time
    import urllib.request

    from lordba_fl.federation.apps import run_name
    from lordba_fl.federation.quiet import is_noise, verbose
    from lordba_fl.runconfig import parse_run_config
    from simulations.common import toml_value

    nodes = _check_nodes(run_config, supernodes)
    if ray_address:
        check_ray_address(ray_address)
    run_config = dict(run_config)
    run_config["out-dir"] = str(Path(run_config.get("out-dir", "results/run")).resolve())
    defaults = project_run_config()
    unknown = sorted(set(run_config) - set(defaults))
    if unknown:
        raise ValueError(f"flwr run only overrides keys declared in pyproject.toml's [tool.flwr.app.config]; "
                         f"{unknown} are not: declare them there, or use --engine run-simulation")
    overrides = " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items() if v != defaults[k])
    bindir = Path(sys.executable).parent
    home = Path(tempfile.mkdtemp(prefix="lordba-flwr-home-"))
    http, control = _free_port(), _free_port()
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http),
               FLWR_LOCAL_CONTROL_API_PORT=str(control), FLWR_DISABLE_UPDATE_CHECK="1",
               PATH=os.pathsep.join([str(bindir), os.environ.get("PATH", "")]))
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    (home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    client, init = backend_resources(cpus_per_client, gpus_per_client, ray_address)
    federation = {"num-supernodes": nodes, "client-resources-num-cpus": _num(client["num_cpus"]),
                  "client-resources-num-gpus": _num(client["num_gpus"])}
    if not ray_address:  # joining a Ray cluster (RAY_ADDRESS), Ray must not be given CPU / GPU counts
        federation.update({"init-args-num-cpus": init["num_cpus"], "init-args-num-gpus": init["num_gpus"]})
    log = home / "superlink.log"
    with log.open("w") as log_file:
        link = subprocess.Popen(
            [str(bindir / "flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
             "--control-api-address", f"127.0.0.1:{control}", "--host", "127.0.0.1", "--port", str(http)],
            env=env, cwd=PROJECT, stdout=log_file, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if link.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the local SuperLink did not start; its log:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        cmd = [str(bindir / "flwr"), "run", str(PROJECT), "local", "--stream",
               "--federation-config", " ".join(f"{k}={v}" for k, v in federation.items())]
        if overrides:
            cmd += ["--run-config", overrides]
        proc = subprocess.Popen(cmd, env=env, cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        for line in proc.stdout:  # Flower's and Ray's own chatter dropped (LORDBA_FL_VERBOSE=1 keeps it)
            if verbose() or not is_noise(line):
                sys.stdout.write(line)
                sys.stdout.flush()
        proc.wait()
    finally:
        link.terminate()
        try:
            link.wait(timeout=30)
        except subprocess.TimeoutExpired:
            link.kill()
        shutil.rmtree(home, ignore_errors=True)
    cfg = parse_run_config(run_config)
    rows = Path(cfg.out_dir) / run_name(cfg) / "rounds.jsonl"
    done = rows.is_file() and any(json.loads(line).get("round") == cfg.rounds for line in rows.read_text().splitlines())
    if proc.returncode != 0 or not done:
        raise SystemExit(f"flwr run did not complete {cfg.rounds} rounds (exit code {proc.returncode}; {rows} "
                         f"{'has no final round' if rows.is_file() else 'missing'}); see the log above")


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)  # Flower wants integers where they are whole


def write_flwr_federation(name: str, supernodes: int, cpus_per_client: float, gpus_per_client: float,
                          flwr_home: str | None = None, ray_address: str | None = None) -> Path:
    """Add (or replace) ``[superlink.<name>]`` in ``$FLWR_HOME/config.toml`` for ``flwr run . <name>``.

    Other connections in the file are kept. Federations belong there, not in pyproject.toml.
    """
    import tomli_w

    home = Path(flwr_home or os.environ.get("FLWR_HOME") or Path.home() / ".flwr")
    path = home / "config.toml"
    doc = tomllib.loads(path.read_text()) if path.is_file() else {}
    client, init = backend_resources(cpus_per_client, gpus_per_client, ray_address)
    doc.setdefault("superlink", {})
    doc["superlink"].setdefault("default", name)
    backend = {"client-resources": {"num-cpus": _num(client["num_cpus"]), "num-gpus": _num(client["num_gpus"])}}
    if not ray_address:
        # Flower's config.toml has no Ray address: a cluster is joined through RAY_ADDRESS instead
        # (ray.init reads it), and then it must be given no CPU / GPU counts of its own
        backend["init-args"] = {"num-cpus": init["num_cpus"], "num-gpus": init["num_gpus"]}
    doc["superlink"][name] = {"address": ":local:", "options": {"num-supernodes": supernodes, "backend": backend}}
    home.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(tomli_w.dumps(doc))
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> None:
    from flwr.common.config import parse_config_args

    from lordba_fl.runconfig import PROFILES

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-config", action="append", default=[], help="overrides, e.g. \"method='lora-q2' rounds=2\"")
    p.add_argument("--supernodes", type=int, default=None, help="virtual SuperNodes (default: clients-per-round)")
    p.add_argument("--cpus-per-client", type=float, default=1.0)
    p.add_argument("--gpus-per-client", type=float, default=0.0, help="e.g. 0.25: four clients share a GPU")
    p.add_argument("--ray-address", help="join a running Ray cluster (e.g. 'auto' or head-ip:6379) for many machines")
    p.add_argument("--write-flwr-config", metavar="NAME", help="write [superlink.NAME] to $FLWR_HOME/config.toml and exit")
    p.add_argument("--quick", action="store_true", help="tiny random model, 2 short rounds")
    p.add_argument("--engine", choices=("flwr-run", "run-simulation"), default="flwr-run",
                   help="flwr-run (default): a private local SuperLink; run-simulation: the deprecated in-process API")
    p.add_argument("--profile", choices=sorted(PROFILES), help="a named set of overrides, e.g. edge (low-RAM devices)")
    args = p.parse_args(argv)
    run_config = project_run_config()
    if args.profile:
        run_config.update(PROFILES[args.profile])
    if args.quick:
        run_config.update(QUICK)
    run_config.update(parse_config_args(args.run_config) if args.run_config else {})
    if args.write_flwr_config:
        nodes = _check_nodes(run_config, args.supernodes)
        path = write_flwr_federation(args.write_flwr_config, nodes, args.cpus_per_client, args.gpus_per_client,
                                     ray_address=args.ray_address)
        env = f"RAY_ADDRESS={args.ray_address} " if args.ray_address else ""
        print(f"wrote [superlink.{args.write_flwr_config}] to {path}; run: {env}flwr run . {args.write_flwr_config} --stream")
        return
    launch = flwr_run if args.engine == "flwr-run" else simulate
    launch(run_config, args.supernodes, args.cpus_per_client, args.gpus_per_client, args.ray_address)


if __name__ == "__main__":
    main()
