"""Federated text tasks, prepared offline from package-registry sources and cached locally.

``load_task(name, **options)`` returns a :class:`FederatedTask`: per-client train / held-out texts
with a natural non-IID split, plus server-side evaluation sets. Tasks register themselves in
:data:`TASKS`; an unknown name raises an error listing the known ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Example:
    """One training / evaluation sample: ``prompt`` is context (not scored), ``target`` is learned."""

    prompt: str
    target: str
    answer: str | None = None  # gsm: the final number


@dataclass
class FederatedTask:
    """A federated dataset: clients by partition id, each with train and held-out examples.

    Parameters
    ----------
    name : str
        Task name.
    clients : list of str
        Human-readable name of each partition (e.g. ``"hamlet/HAMLET"``).
    train, test : list of list of Example
        Per-partition training and held-out examples.
    server_eval : dict
        Named held-out sets evaluated on the global model (e.g. ``unseen`` / ``seen`` templates).
    metric : str
        ``"perplexity"`` or ``"accuracy"``.
    """

    name: str
    clients: list[str]
    train: list[list[Example]]
    test: list[list[Example]]
    server_eval: dict[str, list[Example]] = field(default_factory=dict)
    metric: str = "perplexity"
    info: dict = field(default_factory=dict)

    @property
    def num_partitions(self) -> int:
        return len(self.clients)

    def check_partition(self, partition_id: int) -> int:
        if not 0 <= partition_id < self.num_partitions:
            raise ValueError(
                f"partition {partition_id} does not exist: task {self.name!r} has {self.num_partitions} clients; "
                "run with num-supernodes <= that or lower the task's client filter"
            )
        return partition_id


def cache_root() -> Path:
    """``$LORDBA_FL_CACHE/data`` (default ``~/.cache/lordba_fl/data``)."""
    root = os.environ.get("LORDBA_FL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lordba_fl")
    return Path(root) / "data"


TASKS: dict[str, Callable[..., FederatedTask]] = {}


def register_task(name: str):
    def deco(fn):
        TASKS[name] = fn
        return fn

    return deco


def load_task(name: str, **options) -> FederatedTask:
    """Build (and on first use, prepare and cache) the federated task ``name``."""
    from lordba_fl.data import gsm, shakespeare  # noqa: F401  (registration)

    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    import inspect

    known = set(inspect.signature(TASKS[name]).parameters)
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"task {name!r} has no option(s) {unknown}; its options are {sorted(known)}")
    return TASKS[name](**options)


@dataclass
class ClientData:
    """One partition's examples, what a client process needs (no other client's data, no dataset stack)."""

    partition_id: int
    num_partitions: int
    train: list[Example]
    test: list[Example]


CLIENT_CACHE_FORMAT = 1
_CLIENT_DATA: dict[tuple, ClientData] = {}


def _client_dir(name: str, options: dict) -> Path:
    key = json.dumps([CLIENT_CACHE_FORMAT, name, sorted(options.items())], default=str)
    return cache_root() / "clients" / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _examples(rows: list[dict]) -> list[Example]:
    return [Example(**r) for r in rows]


def load_client_data(name: str, partition_id: int, **options) -> ClientData:
    """Partition ``partition_id`` of task ``name`` from a per-partition cache (one small JSON file).

    The first call on a machine builds the whole task once (:func:`load_task`) and writes every
    partition, atomically; later calls, e.g. a fresh ClientApp process per message under the
    deployment engine, read one file and import nothing of the dataset stack.
    """
    key = (name, partition_id, tuple(sorted(options.items())))
    if key in _CLIENT_DATA:
        return _CLIENT_DATA[key]
    folder = _client_dir(name, options)
    meta = folder / "meta.json"
    if not meta.is_file():
        task = load_task(name, **options)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp", dir=folder.parent))
        try:
            for i, (train, test) in enumerate(zip(task.train, task.test)):
                rows = {"train": [vars(e) for e in train], "test": [vars(e) for e in test]}
                (tmp / f"p{i}.json").write_text(json.dumps(rows))
            (tmp / "meta.json").write_text(json.dumps({"num_partitions": task.num_partitions, "clients": task.clients}))
            try:
                os.rename(tmp, folder)
            except OSError:  # another process built it first
                if not meta.is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    n = json.loads(meta.read_text())["num_partitions"]
    if not 0 <= partition_id < n:
        raise ValueError(
            f"partition {partition_id} does not exist: task {name!r} has {n} clients; "
            "run with num-supernodes <= that or lower the task's client filter"
        )
    rows = json.loads((folder / f"p{partition_id}.json").read_text())
    _CLIENT_DATA[key] = data = ClientData(partition_id, n, _examples(rows["train"]), _examples(rows["test"]))
    return data
