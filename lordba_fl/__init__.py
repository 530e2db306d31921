"""lordba-fl: federated fine-tuning with double-binary (LoRDBA) adapters on frozen quantized bases."""

from lordba_fl.adapter import (
    LoRDBALinear,
    attach_lordba_,
    expected_adapter_bits,
    expected_num_parameters,
    lordba_layers,
    set_adapters_enabled_,
)
from lordba_fl.config import LoRDBAConfig
from lordba_fl.models import load_default_model
from lordba_fl.quant import quantize_base_
from lordba_fl.storage import (
    LoRDBAFileError,
    export_peft_lora,
    load_lordba_,
    lordba_from_peft_lora,
    peft_lora_config,
    save_lordba,
)

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
