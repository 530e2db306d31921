"""Federated text tasks, prepared offline from package-registry sources and cached locally.

``load_task(name, **options)`` returns a :class:`FederatedTask`: per-client train / held-out texts
with a natural non-IID split, plus server-side evaluation sets. Tasks register themselves in
:data:`TASKS`; an unknown name raises an error listing the known ones.
"""

from __future__ import annotations

import os
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
