"""LoRDBA as one method package: ``settings`` (its run-config keys and their checks), ``method``
(client and server sides), ``layout`` (the flat adapter layout every frame uses), ``codec`` (the
``LDBA`` frames: bit-packed, zstd-compressed sign flips and scale deltas), ``aggregation`` (the
latent vote and the refit), ``budgets`` (flip budgets and their schedule), ``clientstate`` (what a
stateful node keeps between rounds) and ``privacy`` (local differential privacy)."""

from lordba_fl.methods.lordba.method import (
    RESIDUAL_KEY,
    LoRDBAMethod,
    budget_flips,
    flip_agreement,
    float_factor_groups,
    train_groups,
)
from lordba_fl.methods.lordba.settings import LoRDBASettings

__all__ = ["RESIDUAL_KEY", "LoRDBAMethod", "LoRDBASettings", "budget_flips", "flip_agreement", "float_factor_groups", "train_groups"]
