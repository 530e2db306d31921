"""Where one LoRDBA round's learning goes: the same round scored at every stage of the protocol.

From a federated run's checkpoint (``--run-dir``, written by ``simulations.frontier`` / ``lordba-fl run``),
the next round is replayed in one process: the sampled clients train from the broadcast exactly as
their ClientApps would, and the server's held-out loss (the run's own eval set) is measured for

- ``global``: the broadcast the clients start from;
- ``client_trained``: each client's adapter as trained (every sign it flipped, fp32 scales);
- ``client_sent``: each client's adapter as the server decodes it (the flip budget's signs, coded scale deltas);
- ``exact_mean``: the weighted mean of the sent adapters' products, applied as a dense update (what
  FedAvg of the clients' exact updates would broadcast; not representable by one LoRDBA adapter);
- ``refit_target``: ``exact_mean`` plus the server's error-feedback residual (what the refit fits);
- ``mean_scales``: the clients' averaged scales on the old signs (no sign changes);
- ``broadcast``: the aggregator's new global adapter (what the next round starts from).

The gaps between stages say which part of the protocol loses what: the clients' budget and coding
(``client_trained`` -> ``client_sent``), the aggregation of non-IID clients (``exact_mean``), the
re-binarization (``refit_target`` -> ``broadcast``). One JSON line per run (``--out``, appended).

Usage: ``python -m simulations.round_anatomy --run-dir results/frontier/skills/lordba-lean-ef-hot-r16-s0
--variant lordba-lean-ef-hot --task skills``
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from simulations.common import emit


def _dense_override(model, products: dict[str, torch.Tensor]) -> list:
    """Every LoRDBA layer computes ``base(x) + x @ dW^T`` with ``dW = products[name]`` (scaling included)."""
    from lordba_fl.adapter.layer import lordba_layers

    saved = []
    for name, layer in lordba_layers(model).items():
        dw = products[name].float()

        def forward(x, layer=layer, dw=dw):
            y = layer.base_layer(x)
            return y + (x @ dw.T.to(x.dtype)).to(y.dtype)

        saved.append((layer, layer.forward))
        layer.forward = forward
    return saved


def _restore(saved: list) -> None:
    for layer, forward in saved:
        layer.forward = forward


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", type=Path, required=True, help="a run folder with a checkpoint (latest.json)")
    p.add_argument("--variant", default="lordba-lean-ef-hot", help="the frontier variant the run used")
    p.add_argument("--task", default="skills")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="the run's seed")
    p.add_argument("--clients", type=int, nargs="+", help="partition ids (default: 3 drawn with --draw)")
    p.add_argument("--draw", type=int, default=0, help="seed of the client draw")
    p.add_argument("--run-config", default="", help="extra overrides (Flower syntax), as given to the run")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("results/round_anatomy.jsonl"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from flwr.common.config import parse_config_args

    from lordba_fl.adapter.layer import lordba_layers
    from lordba_fl.base.models import load_model
    from lordba_fl.data import load_client_data, load_task
    from lordba_fl.federation.apps import _server_eval_sets, client_seed
    from lordba_fl.federation.checkpoint import load_checkpoint
    from lordba_fl.methods import make_method
    from lordba_fl.methods.base import Reply
    from lordba_fl.methods.lordba.aggregation import collect_updates, layer_product
    from lordba_fl.methods.lordba.layout import AdapterState, split_carriers, split_scales, write_state_
    from lordba_fl.wire.metering import ByteLedger
    from lordba_fl.runconfig import parse_run_config
    from lordba_fl.train import evaluate_loss
    from simulations.frontier import LEARNING_RATES, plan_runs, run_config_for
    from simulations.run import project_run_config

    spec_run = plan_runs(args.task, seeds=(args.seed,), only=[f"{args.variant}-r{args.rank}"])[0]
    overrides = run_config_for(spec_run, LEARNING_RATES, user=parse_config_args([args.run_config]) if args.run_config else None)
    cfg = parse_run_config({**project_run_config(), **overrides})
    t0 = time.time()
    model, tok = load_model(cfg.model, cfg.quant, compute_dtype=cfg.torch_compute_dtype(), runtime=cfg.model_runtime)
    method = make_method(cfg)
    model = method.adapt(model)
    task = load_task(cfg.task, **cfg.task_kwargs())
    method.init_from_data(model, tok, task)
    method.init_server(model)
    restored = load_checkpoint(args.run_dir, method, ByteLedger())
    if restored is None:
        raise SystemExit(f"{args.run_dir} holds no checkpoint (latest.json)")
    last_round = restored[0]
    server_round = last_round + 1
    eval_name, eval_examples = next(iter(_server_eval_sets(task, cfg).items()))
    score = lambda: evaluate_loss(model, tok, eval_examples, cfg.train.seq_len)["eval_loss"]  # noqa: E731

    spec = method.spec
    old = method.server.state
    method.load_global_(model)
    rec: dict = {"bench": "round_anatomy", "run_dir": str(args.run_dir), "variant": args.variant, "task": args.task,
                 "rank": args.rank, "checkpoint_round": last_round, "eval_set": eval_name,
                 "eval_examples": len(eval_examples), "global": score()}
    n_parts = len(task.train)
    clients = args.clients or sorted(random.Random(args.draw).sample(range(n_parts), cfg.clients_per_round))
    rec["clients"] = clients
    replies, trained = [], []
    for pid in clients:
        node_id = 1000 + pid
        frame = method.downlink(node_id, server_round)
        data = load_client_data(cfg.task, pid, **cfg.task_kwargs()).train
        up, _ = method.client_train(model, tok, frame, None, data, server_round, client_seed(cfg, server_round, pid))
        trained.append(score())  # the model holds this client's adapter as trained
        replies.append(Reply(node_id, up, float(len(data))))
    rec["client_trained"] = trained
    got, bad = collect_updates([(r.frame, r.weight) for r in replies], spec, method.options, version=old.version,
                               round=server_round)
    if bad:
        raise SystemExit(f"replies refused: {bad}")
    total = sum(w for _, w in got)
    sent, mean = [], {}
    for u, w in got:
        state = AdapterState(old.version, old.negative ^ u.flips, old.scales + u.scale_delta.float())
        write_state_(model, spec, state, latent_magnitude=method.cfg.flip.m0)
        sent.append(score())
        carriers, scales = split_carriers(spec, state.signs()), split_scales(spec, state.scales)
        for layer in spec.layers:
            prod = layer_product(*carriers[layer.name], scales[layer.name], layer) * (w / total)
            mean[layer.name] = mean[layer.name] + prod if layer.name in mean else prod
    rec["client_sent"] = sent
    scaling = {name: layer.scaling for name, layer in lordba_layers(model).items()}
    saved = _dense_override(model, {k: v * scaling[k] for k, v in mean.items()})
    rec["exact_mean"] = score()
    _restore(saved)
    residual = method.server.residual or {}
    if residual:
        saved = _dense_override(model, {k: (v + residual[k].double()) * scaling[k] if k in residual else v * scaling[k]
                                        for k, v in mean.items()})
        rec["refit_target"] = score()
        _restore(saved)
    mean_delta = sum((w / total) * u.scale_delta.float() for u, w in got)
    write_state_(model, spec, AdapterState(old.version, old.negative, old.scales + mean_delta), latent_magnitude=method.cfg.flip.m0)
    rec["mean_scales"] = score()
    metrics, _ = method.aggregate(server_round, replies)
    method.load_global_(model)
    rec["broadcast"] = score()
    rec["aggregate"] = {k: metrics[k] for k in ("client_flip_rate", "global_flip_rate", "fit_error_median", "flip_agreement")
                        if k in metrics}
    rec["wall_s"] = round(time.time() - t0, 1)
    emit(rec, args.out)


if __name__ == "__main__":
    main()
