"""lordba-fl: federated fine-tuning with double-binary (LoRDBA) adapters on frozen quantized bases."""

from lordba_fl.adapter import (
    LoRDBAConfig,
    LoRDBAFileError,
    LoRDBALinear,
    attach_lordba_,
    expected_adapter_bits,
    expected_num_parameters,
    export_peft_lora,
    load_lordba_,
    lordba_from_peft_lora,
    lordba_layers,
    peft_lora_config,
    save_lordba,
    set_adapters_enabled_,
)
from lordba_fl.base import load_default_model, quantize_base_

__all__ = [
    "LoRDBAConfig",
    "LoRDBALinear",
    "LoRDBAFileError",
    "attach_lordba_",
    "expected_adapter_bits",
    "expected_num_parameters",
    "export_peft_lora",
    "load_default_model",
    "load_lordba_",
    "lordba_from_peft_lora",
    "lordba_layers",
    "peft_lora_config",
    "quantize_base_",
    "save_lordba",
    "set_adapters_enabled_",
]
__version__ = "0.1.0"
