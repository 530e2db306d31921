"""``task = "files"``: your own data from local files, offline.

Reads JSON Lines (``.jsonl``, ``.json`` with one object per line), CSV (``.csv``), Parquet
(``.parquet``) or a folder written by ``datasets.Dataset.save_to_disk``. Each row is one example:

- ``data.files.prompt-column`` + ``data.files.target-column``: the prompt is context (not scored), the
  target is learned; or
- ``data.files.text-column``: plain language modelling (the whole text is the target).

Rows are split into clients with flwr-datasets' partitioners: by a natural id
(``data.files.partition-by``, e.g. a user or a source; ids are packed whole into
``data.files.num-clients`` clients, largest first, or one client per id when it is 0), by a label
with a Dirichlet prior (``data.files.label-column`` + ``data.files.dirichlet-alpha``), or IID.
``data.files.test-fraction`` of each client's rows are held out (at least one); the server
evaluates the pooled held-out rows. ``data.files.metric``: ``perplexity`` (the loss, always
reported), ``exact-match`` (the first generated line against the target) or ``label-accuracy`` (the
target is a class label; each distinct target in the data, exactly as written and tokenized for
training, is scored by its likelihood, no generation).

A target is learned and scored whole: a prompt longer than ``train.seq-len`` allows beside its
target loses its first tokens; a target that does not fit on its own is an error, raised by the
launcher (:func:`check`) before any process starts.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from lordba_fl.data.tasks import METRICS, Example, FederatedTask

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def _fix(key: str) -> str:
    return f"data.files.{key.replace('_', '-')}"


def read_table(path: str):
    """The rows of ``path`` as a ``datasets.Dataset`` (file or ``save_to_disk`` folder)."""
    import datasets

    if not path:
        raise ValueError("task 'files' needs data.files.path: a .jsonl, .csv or .parquet file, or a "
                         "datasets.save_to_disk folder")
    p = Path(path).expanduser()
    if p.is_dir():
        try:
            table = datasets.load_from_disk(str(p))
        except FileNotFoundError as e:
            raise ValueError(f"data.files.path={path!r} is a folder but not one written by "
                             f"datasets.Dataset.save_to_disk ({e}); point it at that folder or at a file") from None
        if isinstance(table, datasets.DatasetDict):
            raise ValueError(f"data.files.path={path!r} holds a DatasetDict with splits {list(table)}; "
                             "save one split (dataset_dict['train'].save_to_disk(...)) and point to it")
        return table
    if not p.is_file():
        raise ValueError(f"data.files.path={path!r} does not exist (working directory {os.getcwd()}); "
                         "give an absolute path to a .jsonl, .csv or .parquet file")
    fmt = FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise ValueError(f"data.files.path={path!r}: unknown format {p.suffix!r}; use one of {sorted(FORMATS)} "
                         "or a datasets.save_to_disk folder")
    import pandas as pd

    try:
        if fmt == "json":
            df = pd.read_json(p, lines=True, dtype=False)
        elif fmt == "csv":
            df = pd.read_csv(p, dtype=str, keep_default_na=False)
        else:
            df = pd.read_parquet(p)
    except ValueError as e:
        raise ValueError(f"data.files.path={path!r} could not be read as {fmt} ({e})") from None
    if df.empty:
        raise ValueError(f"data.files.path={path!r} has no rows")
    return datasets.Dataset.from_pandas(df, preserve_index=False)


def _column(table, key: str, name: str) -> list:
    if name not in table.column_names:
        raise ValueError(f"{_fix(key)}={name!r} is not a column of the data; its columns are {table.column_names}")
    return table[name]


def _text(v) -> str:
    return "" if v is None else str(v)


def _partitions(table, partition_by: str, label_column: str, dirichlet_alpha: float | None, num_clients: int,
                seed: int) -> tuple[list[list[int]], list[str]]:
    """Row indices of each client, and the clients' names."""
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    n = len(table)
    if partition_by:
        ids = [_text(v) for v in _column(table, "partition_by", partition_by)]
        groups: dict[str, list[int]] = {}
        for i, v in enumerate(ids):
            groups.setdefault(v, []).append(i)
        order = sorted(groups, key=lambda k: (-len(groups[k]), k))
        if num_clients == 0:
            return [groups[k] for k in order], [f"{partition_by}={k}" for k in order]
        if len(order) < num_clients:
            raise ValueError(f"{_fix('partition_by')}={partition_by!r} has {len(order)} distinct ids, fewer than "
                             f"data.files.num-clients={num_clients}; lower num-clients to <= {len(order)} "
                             "(0: one client per id)")
        clients: list[list[int]] = [[] for _ in range(num_clients)]
        members: list[list[str]] = [[] for _ in range(num_clients)]
        for k in order:  # whole ids, largest first, to the client with the fewest rows so far
            j = min(range(num_clients), key=lambda c: (len(clients[c]), c))
            clients[j] += groups[k]
            members[j].append(k)
        return [sorted(c) for c in clients], [f"{partition_by}={'+'.join(m[:3])}{'+…' if len(m) > 3 else ''}"
                                              for m in members]
    if num_clients < 1:
        raise ValueError("data.files.num-clients must be >= 1 without data.files.partition-by")
    if num_clients > n:
        raise ValueError(f"data.files.num-clients={num_clients} but the data has {n} rows; lower num-clients")
    if dirichlet_alpha is not None:
        if not label_column:
            raise ValueError("data.files.dirichlet-alpha partitions by a label: set data.files.label-column too")
        _column(table, "label_column", label_column)
        part = DirichletPartitioner(num_clients, partition_by=label_column, alpha=dirichlet_alpha,
                                    min_partition_size=2, seed=seed)
        kind = f"{label_column}~Dir({dirichlet_alpha:g})"
    else:
        part = IidPartitioner(num_clients)
        kind = "iid"
    part.dataset = table.add_column("_row", list(range(n)))
    try:
        rows = [list(part.load_partition(i)["_row"]) for i in range(num_clients)]
    except ValueError as e:
        raise ValueError(f"could not split {n} rows into {num_clients} clients by {kind} with >= 2 rows each ({e}); "
                         "lower data.files.num-clients or raise data.files.dirichlet-alpha") from None
    return rows, [f"{kind}/{i}" for i in range(num_clients)]


def load(path: str = "", prompt_column: str = "", target_column: str = "", text_column: str = "",
         partition_by: str = "", label_column: str = "", dirichlet_alpha: float | None = None, num_clients: int = 4,
         test_fraction: float = 0.1, metric: str = "perplexity", seed: int = 0, max_new_tokens: int = 32) -> FederatedTask:
    """The federated task of a local table (see the module docstring for the options)."""
    if metric not in METRICS:
        raise ValueError(f"data.files.metric must be one of {list(METRICS)}; got {metric!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"data.files.test-fraction must be in (0, 1); got {test_fraction}")
    if dirichlet_alpha is not None and not dirichlet_alpha > 0:
        raise ValueError(f"data.files.dirichlet-alpha must be > 0 (0 or unset: no Dirichlet split); got {dirichlet_alpha}")
    if bool(text_column) == bool(target_column):
        raise ValueError("task 'files' needs either data.files.target-column (with an optional "
                         "data.files.prompt-column) or data.files.text-column (plain language modelling), not both")
    if partition_by and dirichlet_alpha is not None:
        raise ValueError("data.files.partition-by and data.files.dirichlet-alpha are two ways to split: set one")
    if metric != "perplexity" and not target_column:
        raise ValueError(f"data.files.metric={metric!r} scores a target: set data.files.target-column "
                         "(and data.files.prompt-column)")
    table = read_table(path)
    if text_column:
        texts = [_text(v) for v in _column(table, "text_column", text_column)]
        examples = [Example("", t) for t in texts]
    else:
        targets = [_text(v) for v in _column(table, "target_column", target_column)]
        prompts = ([_text(v) for v in _column(table, "prompt_column", prompt_column)] if prompt_column
                   else [""] * len(targets))
        # label-accuracy scores each label exactly as training writes it (" business" stays " business");
        # exact-match compares the first generated line, stripped, with the stripped target
        examples = [Example(p, t, answer=t if metric == "label-accuracy" else t.strip(), whole_target=True)
                    for p, t in zip(prompts, targets)]
    empty = [i for i, ex in enumerate(examples) if not ex.target.strip()]
    if empty:
        col = text_column or target_column
        raise ValueError(f"{len(empty)} rows have an empty {col!r} (first: row {empty[0]}); drop them or fill them")
    rows, names = _partitions(table, partition_by, label_column, dirichlet_alpha, num_clients, seed)
    train, test = [], []
    for name, idx in zip(names, rows):
        if len(idx) < 2:
            raise ValueError(f"client {name!r} has {len(idx)} row(s); each client needs >= 2 (one to train on, one "
                             "held out): lower data.files.num-clients or use another split")
        idx = list(idx)
        random.Random(f"{seed}/{name}").shuffle(idx)
        n_test = min(len(idx) - 1, max(1, int(round(len(idx) * test_fraction))))
        train.append([examples[i] for i in idx[n_test:]])
        test.append([examples[i] for i in idx[:n_test]])
    labels = sorted({ex.answer for ex in examples}) if metric == "label-accuracy" else None
    if labels is not None and len(labels) < 2:
        raise ValueError(f"data.files.metric='label-accuracy' needs >= 2 distinct values in {target_column!r}; "
                         f"found {labels}")
    return FederatedTask("files", names, train, test, metric=metric, labels=labels, max_new_tokens=max_new_tokens,
                         info={"path": str(path), "rows": len(examples), "split": partition_by or label_column or "iid"})


def check(seq_len: int, model: str = "smollm2-135m", supernodes: int | None = None, **options) -> FederatedTask:
    """Every check of a ``files`` run, for a launcher to call before any process starts: the file, its
    columns and split (:func:`load`), every target within ``seq_len`` tokens of ``model``'s tokenizer
    (:func:`lordba_fl.train.check_targets_fit`) and no more SuperNodes than clients."""
    from lordba_fl.base.models import model_tokenizer
    from lordba_fl.train import check_targets_fit

    task = load(**options)
    tok = model_tokenizer(model)
    if tok is not None:  # a plug-in model's tokenizer is checked when its clients encode
        check_targets_fit(tok, [ex for part in task.train + task.test for ex in part], seq_len)
    if supernodes is not None and supernodes > task.num_partitions:
        raise ValueError(f"{supernodes} SuperNodes but the data gives {task.num_partitions} clients; run with "
                         f"--supernodes <= {task.num_partitions} or raise data.files.num-clients")
    return task


def cache_key(path: str = "", **_options) -> str:
    """What makes a cached partition stale besides the options: the file's (or folder's) size and mtime."""
    p = Path(path).expanduser()
    if not p.exists():
        return "missing"
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    return ";".join(f"{q.resolve()}:{q.stat().st_size}:{q.stat().st_mtime_ns}" for q in files)


load.cache_key = cache_key
