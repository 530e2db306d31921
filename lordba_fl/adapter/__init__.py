"""The adapter layer: configuration, straight-through estimators, the LoRDBA layer, fitting a target
update to double-binary form, bit-packing, the packed file format and PEFT interop.

Below it: only :mod:`lordba_fl.base` (the frozen layers it wraps) and :mod:`lordba_fl.errors`.
"""

from lordba_fl.adapter.config import LoRDBAConfig
from lordba_fl.adapter.layer import (
    LoRDBALinear,
    attach_lordba_,
    expected_adapter_bits,
    expected_num_parameters,
    lordba_layers,
    set_adapters_enabled_,
)
from lordba_fl.adapter.storage import (
    LoRDBAFileError,
    export_peft_lora,
    load_lordba_,
    lordba_from_peft_lora,
    merge_dense_,
    peft_lora_config,
    save_lordba,
)

__all__ = [
    "LoRDBAConfig",
    "LoRDBAFileError",
    "LoRDBALinear",
    "attach_lordba_",
    "expected_adapter_bits",
    "expected_num_parameters",
    "export_peft_lora",
    "load_lordba_",
    "lordba_from_peft_lora",
    "merge_dense_",
    "lordba_layers",
    "peft_lora_config",
    "save_lordba",
    "set_adapters_enabled_",
]
