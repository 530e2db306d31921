"""Federated methods: LoRDBA and the LoRA baselines, behind one interface (:class:`Method`) and one
registry (:data:`lordba_fl.registry.METHODS`)."""

from lordba_fl.methods.base import Method, MethodSettings, Reply, make_method, register_method, settings_for
from lordba_fl.registry import METHODS

__all__ = ["METHODS", "Method", "MethodSettings", "Reply", "make_method", "register_method", "settings_for"]
