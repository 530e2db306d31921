"""Federated methods: LoRDBA and the LoRA baselines, behind one interface (:class:`Method`) and one
registry (:data:`lordba_fl.registry.METHODS`)."""

from lordba_fl.methods.base import Method, Reply, make_method, register_method
from lordba_fl.registry import METHODS

__all__ = ["METHODS", "Method", "Reply", "make_method", "register_method"]
