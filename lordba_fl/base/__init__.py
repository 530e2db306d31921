"""The frozen base: quantization backends (q4_1, nf4, int8) and model loading (the embedded SmolLM2
GGUF, a tiny LLaMA for tests). The bottom of the library: it imports nothing else from it."""

from lordba_fl.base.models import MODELS, load_default_model, load_model
from lordba_fl.base.quant import QUANT_BACKENDS, quantize_base_

__all__ = ["MODELS", "QUANT_BACKENDS", "load_default_model", "load_model", "quantize_base_"]
