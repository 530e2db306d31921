"""Federated text tasks, prepared offline from package-registry sources and cached locally.

``load_task(name, **options)`` returns a :class:`FederatedTask`: per-client train / held-out texts
with a natural non-IID split, plus server-side evaluation sets. Tasks register themselves in
:data:`lordba_fl.registry.TASKS`; an unknown name raises an error listing the known ones.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lordba_fl.registry import TASKS

METRICS = ("perplexity", "exact-match", "label-accuracy")


@dataclass
class Example:
    """One training / evaluation sample: ``prompt`` is context (not scored), ``target`` is learned."""

    prompt: str
    target: str
    answer: str | None = None  # gsm: the final number
    whole_target: bool = False  # the target is scored as a whole: never cut to fit train.seq-len (an error)


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
        Named held-out sets evaluated on the global model (e.g. ``unseen`` / ``seen`` templates);
        empty: the clients' held-out examples, pooled.
    metric : str
        What the final report scores besides the loss (:mod:`lordba_fl.scoring`): ``"perplexity"``
        (nothing more), ``"exact-match"`` (generated answer vs ``Example.answer``) or
        ``"label-accuracy"`` (the most likely of ``labels`` vs ``Example.answer``).
    answer_of : callable, optional
        ``exact-match``: the answer in a generated text (default: its first non-empty line).
    labels : list of str, optional
        ``label-accuracy``: every label a target can take.
    max_new_tokens : int
        ``exact-match``: generation length.
    """

    name: str
    clients: list[str]
    train: list[list[Example]]
    test: list[list[Example]]
    server_eval: dict[str, list[Example]] = field(default_factory=dict)
    metric: str = "perplexity"
    info: dict = field(default_factory=dict)
    answer_of: Callable[[str], str | None] | None = None
    labels: list[str] | None = None
    max_new_tokens: int = 160

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"task {self.name!r}: metric must be one of {list(METRICS)}; got {self.metric!r}")
        if self.metric == "label-accuracy" and not self.labels:
            raise ValueError(f"task {self.name!r}: metric 'label-accuracy' needs the list of labels (FederatedTask.labels)")
        if len(self.train) != len(self.clients) or len(self.test) != len(self.clients):
            raise ValueError(f"task {self.name!r}: {len(self.clients)} clients but {len(self.train)} train and "
                             f"{len(self.test)} test partitions; give one of each per client")

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


def register_task(name: str):
    """Decorator: make a loader ``fn(**options) -> FederatedTask`` selectable as ``task = name`` (its
    module must be imported before the run starts; ``task = "pkg.module:fn"`` needs no registration)."""
    return TASKS.register(name)


def load_task(name: str, **options) -> FederatedTask:
    """Build (and on first use, prepare and cache) the federated task ``name`` (a registered name or an
    import path ``package.module:function``), passing it its ``data.<task>.<option>`` options."""
    loader = TASKS.get(name)
    if not callable(loader):
        raise ValueError(f"task {name!r} is {loader!r}, not a function returning a FederatedTask")
    params = inspect.signature(loader).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(options) - set(params))
        if unknown:
            raise ValueError(f"task {name!r} has no option(s) {unknown}; its options are {sorted(params)}")
    task = loader(**options)
    if not isinstance(task, FederatedTask):
        raise ValueError(f"task {name!r} returned {type(task).__name__}, not a lordba_fl.data.FederatedTask")
    return task


@dataclass
class ClientData:
    """One partition's examples, what a client process needs (no other client's data, no dataset stack)."""

    partition_id: int
    num_partitions: int
    train: list[Example]
    test: list[Example]


CLIENT_CACHE_FORMAT = 2  # 2: Example.whole_target
_CLIENT_DATA: dict[tuple, ClientData] = {}


def _client_dir(name: str, options: dict) -> Path:
    loader = TASKS.get(name)
    stamp = getattr(loader, "cache_key", None)  # e.g. a file's size and mtime: a changed file rebuilds
    key = json.dumps([CLIENT_CACHE_FORMAT, name, sorted(options.items()), stamp(**options) if stamp else None],
                     default=str)
    name = name.replace(":", "-").replace("/", "-")
    return cache_root() / "clients" / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _examples(rows: list[dict]) -> list[Example]:
    return [Example(**r) for r in rows]


def load_client_data(name: str, partition_id: int, **options) -> ClientData:
    """Partition ``partition_id`` of task ``name`` from a per-partition cache (one small JSON file).

    The first call on a machine builds the whole task once (:func:`load_task`) and writes every
    partition, atomically; later calls, e.g. a fresh ClientApp process per message under the
    deployment engine, read one file and import nothing of the dataset stack.
    """
    folder = _client_dir(name, options)
    key = (folder, partition_id)
    if key in _CLIENT_DATA:
        return _CLIENT_DATA[key]
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
