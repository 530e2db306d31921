"""The LoRA baselines as one method package: ``frame`` (their wire format), ``method`` (FedAvg,
FFA-LoRA, 2/4-bit uplinks, 2-bit both ways), ``hetero`` (HetLoRA, FlexLoRA: one rank per device)
and ``flora`` (FLoRA: stacked factors)."""

from lordba_fl.methods.lora.flora import FLoRA
from lordba_fl.methods.lora.frame import (
    DELTAS,
    FP16,
    LORA_CONTAINER,
    QUANT,
    decode_lora,
    dequantize_channels,
    encode_lora,
    fp16_values,
    note_version,
    quantize_channels,
    save_peft_factors,
)
from lordba_fl.methods.lora.hetero import FlexLoRA, HeteroRankLoRA, HetLoRA
from lordba_fl.methods.lora.method import FFALoRA, LoRAFedAvg, LoRAQ2, LoRAQ2Both, LoRAQ4, lora_layers, lora_modules

__all__ = [
    "DELTAS", "FP16", "FFALoRA", "FLoRA", "FlexLoRA", "HetLoRA", "HeteroRankLoRA", "LORA_CONTAINER", "LoRAFedAvg",
    "LoRAQ2", "LoRAQ2Both", "LoRAQ4", "QUANT", "decode_lora", "dequantize_channels", "encode_lora", "fp16_values",
    "lora_layers", "lora_modules", "note_version", "quantize_channels", "save_peft_factors",
]
