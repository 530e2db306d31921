"""Federated text tasks: ``shakespeare``, ``gsm``, ``files`` (your own JSON Lines / CSV / Parquet) and any
task registered in :data:`lordba_fl.registry.TASKS` or named by import path."""

from lordba_fl.data.tasks import (
    ClientData,
    Example,
    FederatedTask,
    cache_root,
    load_client_data,
    load_task,
    register_task,
)
from lordba_fl.registry import TASKS

__all__ = ["TASKS", "ClientData", "Example", "FederatedTask", "cache_root", "load_client_data", "load_task",
           "register_task"]
