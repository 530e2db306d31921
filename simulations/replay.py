"""A federated run replayed in one process, without Flower: for sweeping a method's knobs fast.

Each round does what the ServerApp and the sampled ClientApps do, in the same order and with the same
seeds: the server samples the round's partitions as its strategy does (one virtual node per partition,
``--supernodes`` of them), builds every sampled node's downlink, each node trains from it with its own
kept state (``context.state``), the replies are weighed by their examples (``server.weight-cap``) and
aggregated in partition order, and the server evaluates the global adapter on its own eval sets. So a
replay's eval losses are those of a simulation of the same run config (``tests/test_simulation.py``
checks it), at a fraction of the time: one model in one process, no Ray workers, no SuperLink.

What it leaves out: messages (the bytes reported are the frames' payloads, not Flower's wire bytes),
faults, round timeouts, generation metrics and checkpoints. Use ``simulations.run`` for those.

Usage::

    python -m simulations.replay --quick                       # tiny model, 2 rounds
    python -m simulations.replay --supernodes 8 --eval-every 3 \\
        --run-config "task='skills' rounds=15 clients-per-round=3 train.local-steps=4 scale-lr-ratio=3"

Prints one JSON line per evaluated round and a summary line (``kind: "replay"``: the overrides, eval
loss by evaluated round, final loss, mean payload bytes per client-round each way, wall time), which
is also appended to ``--out``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from simulations.common import emit
from simulations.run import QUICK, project_run_config


def replay(run_config: dict, supernodes: int | None = None, eval_every: int = 1, threads: int = 1) -> dict:
    """Replay ``run_config`` (a full run config, as the ServerApp reads it) with ``supernodes``
    partitions (default: ``clients-per-round``); evaluate after every ``eval_every``-th round and the
    last. Returns the summary record; prints a line per evaluated round."""
    import torch
    from flwr.app import RecordDict

    from lordba_fl.data import load_client_data, load_task
    from lordba_fl.federation.apps import _adapted_model, _server_eval_sets, client_seed
    from lordba_fl.federation.strategy import sample_round
    from lordba_fl.methods import Reply
    from lordba_fl.runconfig import parse_run_config
    from lordba_fl.train import evaluate_loss
    from lordba_fl.wire.replies import cap_weights

    if eval_every < 1:
        raise ValueError(f"--eval-every must be >= 1; got {eval_every}")
    torch.set_num_threads(threads)  # a simulated client trains on one thread (apps.py): the same sums
    cfg = parse_run_config(run_config)
    nodes = supernodes or cfg.clients_per_round
    if nodes < cfg.clients_per_round:
        raise ValueError(f"--supernodes {nodes} is below clients-per-round {cfg.clients_per_round}: "
                         "raise --supernodes or lower clients-per-round")
    t0 = time.time()
    model, tok, method = _adapted_model(cfg)
    task = load_task(cfg.task, **cfg.task_kwargs())
    method.init_from_data(model, tok, task)
    method.init_server(model)
    eval_sets = _server_eval_sets(task, cfg)
    data = {p: load_client_data(cfg.task, p, **cfg.task_kwargs()) for p in range(nodes)}
    states = {p: RecordDict() for p in range(nodes)}
    losses: dict[int, float] = {}
    up = down = client_rounds = 0
    for rnd in range(1, cfg.rounds + 1):
        sampled = sample_round(list(range(nodes)), cfg.seed, rnd, "train", cfg.clients_per_round)
        frames = {p: method.downlink(p, rnd) for p in sampled}  # the server sends before anyone trains
        replies, train_losses = [], []
        for p in sampled:
            frame, metrics = method.client_train(model, tok, frames[p], states[p], data[p].train, rnd,
                                                 client_seed(cfg, rnd, p))
            method.note_held(p, int(metrics["held_version"]))
            replies.append(Reply(p, frame, float(len(data[p].train))))
            train_losses.append(metrics["train_loss"])
            up, down = up + len(frame), down + len(frames[p])
        client_rounds += len(sampled)
        weights = cap_weights([r.weight for r in replies], cfg.weight_cap)
        _, rejected = method.aggregate(rnd, [Reply(r.node_id, r.frame, w) for r, w in zip(replies, weights)])
        if rnd % eval_every and rnd != cfg.rounds:
            continue
        method.load_global_(model)
        row = {"kind": "replay_round", "round": rnd, "train_loss": sum(train_losses) / len(train_losses),
               "rejected": len(rejected), "elapsed_s": round(time.time() - t0, 1)}
        for i, (name, examples) in enumerate(eval_sets.items()):
            row[("" if i == 0 else f"{name}_") + "eval_loss"] = evaluate_loss(model, tok, examples, cfg.train.seq_len)["eval_loss"]
        losses[rnd] = row["eval_loss"]
        emit(row, None)
    return {"kind": "replay", "task": cfg.task, "method": cfg.method, "rank": cfg.rank, "seed": cfg.seed,
            "rounds": cfg.rounds, "clients_per_round": cfg.clients_per_round, "supernodes": nodes,
            "eval_loss_by_round": {str(k): v for k, v in losses.items()}, "final_eval_loss": losses[cfg.rounds],
            "up_payload_per_client_round": up / client_rounds, "down_payload_per_client_round": down / client_rounds,
            "wall_s": round(time.time() - t0, 1)}


def main(argv: list[str] | None = None) -> dict:
    from flwr.common.config import parse_config_args

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-config", action="append", default=[], help="overrides, e.g. \"method='lora-q2' rounds=2\"")
    p.add_argument("--supernodes", type=int, default=None, help="partitions (default: clients-per-round)")
    p.add_argument("--eval-every", type=int, default=1, help="evaluate after every Nth round (and the last)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: as a simulated client trains)")
    p.add_argument("--quick", action="store_true", help="tiny random model, 2 short rounds")
    p.add_argument("--out", type=Path, default=Path("results/replay.jsonl"))
    args = p.parse_args(argv)
    run_config = project_run_config()
    if args.quick:
        run_config.update(QUICK)
    overrides = parse_config_args(args.run_config) if args.run_config else {}
    run_config.update(overrides)
    rec = {**replay(run_config, args.supernodes, args.eval_every, args.threads), "overrides": overrides}
    emit(rec, args.out)
    return rec


if __name__ == "__main__":
    main()
