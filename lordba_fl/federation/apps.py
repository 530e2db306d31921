"""What the ServerApp and ClientApp do, as library functions (the apps only call these).

Server: build the method's global state (or resume it), run :class:`~lordba_fl.federation.strategy.AdapterStrategy`
through Flower's own round loop, evaluate the global model after every round, write one JSON line
and an atomic checkpoint per round, and at the end a table, a CSV, plots, the final adapter (packed
and as PEFT LoRA) and sample outputs.

Client: the frozen quantized base with its adapter skeleton is loaded once per worker process and
shared by every client that process runs (:data:`_WORKER` holds no per-client state); each client's
state lives in its Flower ``context.state``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import time
from pathlib import Path

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from lordba_fl.base.models import load_model
from lordba_fl.data import ClientData, load_client_data, load_task
from lordba_fl.federation import faults
from lordba_fl.federation.checkpoint import clear_checkpoints, load_checkpoint, save_checkpoint
from lordba_fl.federation.report import RunRecorder, progress_line, round_row
from lordba_fl.federation.strategy import AdapterStrategy, frame_record, read_frame, reason_class
from lordba_fl.hetero import node_profile, parse_tiers
from lordba_fl.methods import make_method, settings_for
from lordba_fl.registry import METHODS
from lordba_fl.runconfig import RunConfig, parse_run_config
from lordba_fl.scoring import score
from lordba_fl.train import evaluate_loss, generate, return_freed_memory
from lordba_fl.errors import ShapeMismatchError
from lordba_fl.wire.metering import ByteLedger, recorddict_bytes

log = logging.getLogger("lordba_fl")
_WORKER: dict = {}
# Counters of this worker process (not of any client): how often the base was loaded, how many
# client calls it served. Replies carry them so every round shows the base is shared.
WORKER_STATS = {"base_loads": 0, "clients_served": 0}


def run_name(cfg: RunConfig) -> str:
    """The run's folder under ``out-dir``: ``name`` if set, else the method and what its
    :meth:`~lordba_fl.methods.Method.folder_suffix` adds (LoRDBA: its aggregator)."""
    if cfg.name:
        return cfg.name
    cls = METHODS.get(cfg.method)
    name = cfg.method + cls.folder_suffix(settings_for(cls.settings_type, cfg))
    return re.sub(r"[^\w.-]+", "-", name)  # an import path (pkg.mod:Class) makes a plain folder name


def client_seed(cfg: RunConfig, server_round: int, partition_id: int) -> int:
    digest = hashlib.blake2b(f"{cfg.seed}/{server_round}/{partition_id}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def _adapted_model(cfg: RunConfig):
    """The frozen quantized base with the method's adapter, on ``cfg.device``; its tokenizer and method."""
    model, tok = load_model(cfg.model, cfg.quant, compute_dtype=cfg.torch_compute_dtype(), runtime=cfg.model_runtime)
    method = make_method(cfg)
    model = method.adapt(model).to(cfg.torch_device())
    return model, tok, method


def _worker(cfg: RunConfig):
    run = (cfg.method, cfg.model, cfg.quant, cfg.seed, cfg.task, tuple(sorted(cfg.task_kwargs().items())),
           tuple(sorted(cfg.method_options.items())), cfg.codec_level, cfg.device, cfg.compute_dtype, cfg.model_runtime)
    key = (run, cfg.rank, cfg.alpha, cfg.top_rank)  # one adapted model per device tier of the same run
    if key not in _WORKER:
        if any(k[0] != run for k in _WORKER):  # another run: drop its models
            _WORKER.clear()
        _WORKER[key] = _adapted_model(cfg)
        WORKER_STATS["base_loads"] += 1
    WORKER_STATS["clients_served"] += 1
    return _WORKER[key]


def _worker_metrics() -> dict[str, float]:
    return {
        "worker-pid": float(os.getpid()),
        "worker-base-loads": float(WORKER_STATS["base_loads"]),
        "worker-clients-served": float(WORKER_STATS["clients_served"]),
    }


_DP_SAFE = ("held-version", "partition-id", "client-state-bytes", "worker-pid", "worker-base-loads",
            "worker-clients-served", "rank")


def _reply_metrics(method, metrics: dict) -> dict:
    """Under a method's local differential privacy (:attr:`Method.private_replies`, LoRDBA's
    ``dp.mode=local``) a reply carries no data-dependent number (losses, flip rates, example counts):
    only bookkeeping, and ``num-examples = 1`` (the server weighs clients equally)."""
    if not method.private_replies:
        return metrics
    return {**{k: v for k, v in metrics.items() if k in _DP_SAFE}, "num-examples": 1.0}


def _client_data(context, cfg: RunConfig) -> ClientData:
    try:
        pid = int(context.node_config["partition-id"])
    except KeyError:
        raise ValueError(
            "node_config has no 'partition-id': start the SuperNode with --node-config 'partition-id=<i>'"
        ) from None
    return load_client_data(cfg.task, pid, **cfg.task_kwargs())


def _nested(cfg: RunConfig) -> bool:
    """Whether the run's method serves several ranks (``Method.nested_ranks``)."""
    return bool(getattr(METHODS.get(cfg.method), "nested_ranks", False))


def tier_config(cfg: RunConfig, context) -> RunConfig:
    """The run config of this node's adapter: at its own rank (``rank`` in its node config, its
    ``memory-mb`` budget's measured fit (or the run's ``client.memory-mb``), or its ``hetero.tiers`` draw) with ``alpha`` scaled so
    ``alpha / rank`` stays the run's (nested adapters), and its own ``local-steps`` / ``batch-size`` /
    checkpointing where its node config sets them (:func:`lordba_fl.hetero.node_profile`)."""
    pid = int(context.node_config.get("partition-id", 0))
    node_cfg = dict(context.node_config)
    if cfg.memory_mb and "memory-mb" not in node_cfg and "batch-size" not in node_cfg:
        node_cfg["memory-mb"] = cfg.memory_mb  # the run's budget for every node that states none of its own
    prof = node_profile(node_cfg, parse_tiers(cfg.tiers, cfg.rank), cfg.seed, pid, cfg.rank,
                        model=cfg.model, quant=cfg.quant, seq_len=cfg.train.seq_len, runtime=cfg.model_runtime)
    train = {k: v for k, v in (("steps", prof.local_steps), ("batch_size", prof.batch_size),
                                ("gradient_checkpointing", prof.gradient_checkpointing)) if v is not None}
    if train:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train))
    rank = prof.rank
    if rank == cfg.rank:
        return cfg
    if not _nested(cfg):
        raise ValueError(f"this node declares rank {rank} but method {cfg.method!r} trains the run's rank "
                         f"{cfg.rank} only; drop rank from its node config")
    alpha = cfg.alpha * rank / cfg.rank
    for _ in range(8):  # the same float alpha / rank as the run's, bit for bit: it is in every frame's fingerprint
        if alpha / rank == cfg.alpha / cfg.rank:
            break
        alpha = math.nextafter(alpha, math.inf if alpha / rank < cfg.alpha / cfg.rank else -math.inf)
    else:
        raise ValueError(f"no float alpha gives rank {rank} the run's scaling {cfg.alpha}/{cfg.rank}; pick another alpha")
    # one rank on this node (no tiers of its own); its version 0 is the leading part of the run's rank's
    return dataclasses.replace(cfg, rank=rank, alpha=alpha, tiers="", top_rank=cfg.rank)


def _method_for(cfg: RunConfig, context=None):
    if context is not None:
        cfg = tier_config(cfg, context)
    model, tok, method = _worker(cfg)
    method.cfg = settings_for(method.settings_type, cfg)  # knobs (steps, lr, flips) may differ between runs sharing a worker
    return model, tok, method


# run-config keys whose value may name code by import path ('pkg.module:attr'), and the one that names a file
IMPORT_KEYS = ("task", "method", "server.aggregator")
DATA_KEYS = ("data.files.path",)
ALLOW_IMPORTS_ENV, ALLOW_DATA_ENV = "LORDBA_FL_ALLOW_IMPORTS", "LORDBA_FL_ALLOW_DATA"


def _allow_list(node_config, key: str, env: str) -> list[str]:
    raw = node_config.get(key) if node_config is not None else None
    raw = os.environ.get(env, "") if raw is None else str(raw)
    return [x.strip() for x in raw.split(",") if x.strip()]


def check_node_allows(run_config: dict, node_config) -> None:
    """Refuse a run config that would make this node import code or read a file it was not told to.

    Whoever sets the run config picks ``task``, ``method`` and ``server.aggregator``; as import paths
    they run code on every SuperNode, and ``data.files.path`` reads a file there. A node honours them
    only when its node config (``allow-imports``: comma list of top-level packages, ``*`` for any;
    ``allow-data``: comma list of folders) or its environment (``LORDBA_FL_ALLOW_IMPORTS``,
    ``LORDBA_FL_ALLOW_DATA``) allows them; registered names need no permission. The local simulation
    launcher allows everything (one user's own machine).
    """
    imports = _allow_list(node_config, "allow-imports", ALLOW_IMPORTS_ENV)
    for key in IMPORT_KEYS:
        value = run_config.get(key)
        if isinstance(value, str) and ":" in value:
            package = value.split(":", 1)[0].split(".", 1)[0]
            if "*" not in imports and package not in imports:
                raise PermissionError(
                    f"run config {key}={value!r} would import and run code of package {package!r} on this node, which "
                    f"does not allow it: start the SuperNode with --node-config \"allow-imports='{package}'\" (or set "
                    f"{ALLOW_IMPORTS_ENV}={package}) if you trust it")
    folders = [Path(f).resolve() for f in _allow_list(node_config, "allow-data", ALLOW_DATA_ENV)]
    for key in DATA_KEYS:
        value = run_config.get(key)
        if isinstance(value, str) and value:
            path = Path(value).resolve()
            if not any(path == f or f in path.parents for f in folders):
                raise PermissionError(
                    f"run config {key}={value!r} would read a file this node does not allow: start the SuperNode with "
                    f"--node-config \"allow-data='{path.parent}'\" (or set {ALLOW_DATA_ENV}) to allow that folder")


def _config(context, fallback: dict | None) -> RunConfig:
    import torch

    torch.set_num_threads(1)  # simulated clients share the machine's cores; one thread each
    raw = dict(context.run_config) or fallback or {}
    check_node_allows(raw, getattr(context, "node_config", None))  # before parsing imports anything
    cfg = parse_run_config(raw)
    if cfg.train.return_memory:
        return_freed_memory()  # before this process loads the model (a deployed client: a fresh process)
    return cfg


def client_train(msg: Message, context, fallback_config: dict | None = None) -> Message:
    """ClientApp train handler: decode the broadcast, train locally, reply with one frame + metrics."""
    cfg = _config(context, fallback_config)
    model, tok, method = _method_for(cfg, context)
    data = _client_data(context, cfg)
    pid = data.partition_id
    server_round = int(msg.content["config"]["server-round"])
    examples = data.train
    faults.before_training(cfg, server_round, pid)
    downlink = read_frame(msg.content)
    try:
        frame, metrics = method.client_train(
            model, tok, downlink, context.state, examples, server_round, client_seed(cfg, server_round, pid)
        )
    except ShapeMismatchError:
        if not method.nested_ranks:
            raise
        # the server still has this node at another rank: say which one it trains now (no update)
        return Message(RecordDict({"metrics": MetricRecord({"rank": float(method.cfg.rank), "partition-id": float(pid),
                                                            "tier-mismatch": 1.0})}), reply_to=msg)
    frame = faults.after_training(cfg, method, frame, context.state, server_round, pid, data.num_partitions, downlink)
    metrics["num-examples"] = float(len(examples))
    metrics["held-version"] = metrics.pop("held_version")
    metrics["partition-id"] = float(pid)
    metrics["client-state-bytes"] = float(recorddict_bytes(context.state))
    if method.nested_ranks:
        metrics["rank"] = float(method.cfg.rank)  # the nested rank this node trains (heterogeneous devices)
    metrics.update(_worker_metrics())
    metrics = _reply_metrics(method, metrics)
    frame, metrics = faults.hostile(cfg, frame, metrics, context.state, server_round, pid)
    content = {"metrics": MetricRecord(metrics)} if frame is None else {"adapter": frame_record(frame),
                                                                         "metrics": MetricRecord(metrics)}
    return Message(RecordDict(content), reply_to=msg)


def client_query(msg: Message, context, fallback_config: dict | None = None) -> Message:
    """ClientApp query handler: this node's ``partition-id`` (the server samples partitions, not the
    random node ids a simulation assigns, so a seeded run samples the same data every time) and, for
    LoRDBA, the adapter rank it trains (heterogeneous devices: the server sends it its nested tier)."""
    metrics = {"partition-id": float(int(context.node_config["partition-id"]))}
    raw = dict(context.run_config) or fallback_config or {}
    check_node_allows(raw, context.node_config)
    run = parse_run_config(raw)
    if _nested(run):
        metrics["rank"] = float(tier_config(run, context).rank)
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def client_evaluate(msg: Message, context, fallback_config: dict | None = None) -> Message:
    """ClientApp evaluate handler: load the broadcast, report held-out loss / perplexity of this client."""
    cfg = _config(context, fallback_config)
    model, tok, method = _method_for(cfg, context)
    data = _client_data(context, cfg)
    pid = data.partition_id
    version = method.client_load_(model, read_frame(msg.content), context.state)
    test = data.test[: cfg.eval_examples]
    res = evaluate_loss(model, tok, test, cfg.train.seq_len)
    res.update({"num-examples": float(len(test)), "held-version": float(version), "partition-id": float(pid)})
    res.update(_worker_metrics())
    return Message(RecordDict({"metrics": MetricRecord(_reply_metrics(method, res))}), reply_to=msg)


def _server_eval_sets(task, cfg: RunConfig) -> dict:
    if task.server_eval:
        return {name: ex[: cfg.eval_examples] for name, ex in task.server_eval.items()}
    pooled, i = [], 0
    while len(pooled) < cfg.eval_examples and any(i < len(t) for t in task.test):
        pooled += [t[i] for t in task.test if i < len(t)]
        i += 1
    return {"pooled": pooled[: cfg.eval_examples]}


def run_server(grid, run_config: dict) -> dict:
    """The ServerApp's whole job; returns the final round's row."""
    cfg = parse_run_config(run_config)
    run_dir = Path(cfg.out_dir) / run_name(cfg)
    t0 = time.time()
    model, tok, method = _adapted_model(cfg)
    task = load_task(cfg.task, **cfg.task_kwargs())
    method.init_from_data(model, tok, task)
    method.init_server(model)
    ledger = ByteLedger()
    offset, rows, extra = 0, [], {}
    if not cfg.resume and clear_checkpoints(run_dir):
        log.info("%s: removed an earlier run's checkpoints (resume=false starts afresh)", run_dir)
    if cfg.resume:
        restored = load_checkpoint(run_dir, method, ledger)
        if restored is not None:
            offset, rows, extra = restored
            log.info("resuming %s from round %d", run_dir, offset)
    recorder = RunRecorder(run_dir, rows)
    strategy = AdapterStrategy(method, cfg.clients_per_round, cfg.seed, offset, ledger, cfg.client_eval,
                               weight_cap=cfg.weight_cap, min_clients=cfg.faults.min_clients,
                               max_failed_rounds=cfg.faults.max_failed_rounds)
    # nodes that live on across a server restart are not asked for their partition again
    strategy.partitions = {int(k): float(v) for k, v in extra.get("partitions", {}).items()}
    eval_sets = _server_eval_sets(task, cfg)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        run_round = server_round + offset
        if server_round == 0 and offset > 0:
            return None
        method.load_global_(model)
        res = {}
        for i, (name, ex) in enumerate(eval_sets.items()):
            r = evaluate_loss(model, tok, ex, cfg.train.seq_len)
            prefix = "" if i == 0 else f"{name}_"  # the task's first set is the headline eval_loss
            res[f"{prefix}eval_loss"], res[f"{prefix}perplexity"] = r["eval_loss"], r["perplexity"]
        every = cfg.metric_every
        if run_round == cfg.rounds or (every and run_round % every == 0):
            res.update(score_metric(model, tok, task, eval_sets, cfg))
        started = strategy.round_started.get(run_round, t0)
        row = round_row(run_round, run_name(cfg), ledger.round_summary(run_round), strategy.round_metrics.get(run_round, {}),
                        res, time.time() - started)
        tiers = ledger.tier_summary(run_round, getattr(method, "node_ranks", {}))
        if len(tiers) > 1 or cfg.tiers:  # heterogeneous devices: the tier mix and each tier's bytes
            row["tier_mix"] = ",".join(f"{r}:{t['clients']}" for r, t in tiers.items())
            for r, t in tiers.items():
                row.update({f"tier{r}_{k}": v for k, v in t.items()})
        if strategy.round_failures.get(run_round):  # why replies were refused, by kind
            counts: dict[str, int] = {}
            for _, why in strategy.round_failures[run_round]:
                counts[reason_class(why)] = counts.get(reason_class(why), 0) + 1
            row["refused"] = counts
        if run_round in strategy.round_workers:
            row["workers"] = strategy.round_workers[run_round]  # {pid: {base_loads, clients_served}}
        if row["clients_sampled"]:  # every message of the round (training, and the broadcast of client-side evaluation)
            prev = recorder.rows[-1] if recorder.rows else {}
            for d in ("up", "down"):
                row[f"{d}_wire_per_client"] = (row[f"total_{d}_wire"] - prev.get(f"total_{d}_wire", 0)) / row["clients_sampled"]
        recorder.log(row)
        print(progress_line(row, cfg.rounds), flush=True)
        save_checkpoint(run_dir, run_round, method, ledger, recorder.rows,
                        extra={"partitions": {str(k): v for k, v in strategy.partitions.items()}})
        log.info("round %d: %s", run_round, {k: row[k] for k in ("up_wire_mean", "down_wire_mean", "eval_loss") if k in row})
        return MetricRecord({k: float(v) for k, v in res.items()})

    if cfg.rounds > offset:
        strategy.start(grid, ArrayRecord(), num_rounds=cfg.rounds - offset, timeout=cfg.round_timeout, evaluate_fn=evaluate_fn)
    return finish(cfg, model, tok, method, task, recorder, run_dir)


def score_metric(model, tok, task, eval_sets: dict, cfg: RunConfig) -> dict:
    """``accuracy_<set>`` of the task's metric on each server eval set: label accuracy on every example
    (no generation), exact match on the first ``eval.generate`` (none when 0); {} for perplexity."""
    if task.metric == "perplexity" or (task.metric == "exact-match" and cfg.generate_examples == 0):
        return {}
    n = cfg.generate_examples if task.metric == "exact-match" else None
    return {f"accuracy_{name}": score(model, tok, task, ex[:n], cfg.train.seq_len) for name, ex in eval_sets.items()}


def finish(cfg, model, tok, method, task, recorder, run_dir: Path) -> dict:
    """Final adapter (packed + PEFT), the task's metric (scored with the last round) and sample
    generations, table, CSV and plots."""
    method.load_global_(model)
    final = dict(recorder.rows[-1]) if recorder.rows else {}
    method.export(model, run_dir)
    samples = []
    if task.metric != "perplexity":
        final["metric"] = task.metric
        if not any(k.startswith("accuracy_") for k in final):  # e.g. a resumed run whose last round was done
            final.update(score_metric(model, tok, task, _server_eval_sets(task, cfg), cfg))
    if task.metric == "exact-match" and cfg.generate_examples > 0:
        ex = next(iter(_server_eval_sets(task, cfg).values()))[0]
        out = generate(model, tok, ex.prompt, max_new_tokens=task.max_new_tokens)
        samples.append(f"{ex.prompt}{out}\n(expected {ex.answer})")
    elif task.metric == "perplexity" and cfg.generate_examples > 0:
        for name, exs in list(zip(task.clients, task.test))[: min(3, cfg.generate_examples)]:
            samples.append(f"[{name}] {exs[0].prompt}{generate(model, tok, exs[0].prompt, max_new_tokens=40)}")
    if recorder.rows:
        recorder.rows[-1] = final
        recorder.path.write_text("".join(json.dumps(r) + "\n" for r in recorder.rows))
    print(recorder.table())
    recorder.write_csv()
    plots = recorder.plot()
    for s in samples:
        print("\n--- sample ---\n" + s)
    print(f"\nrun folder: {run_dir}  (rounds.jsonl, rounds.csv, {', '.join(p.name for p in plots)}, final adapter)")
    return final
