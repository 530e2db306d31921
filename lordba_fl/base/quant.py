"""Frozen quantized bases: ``quantize_base_(model, backend)`` over a registry of backends.

- ``nf4``, ``int8``: bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` (CPU and CUDA).
- ``q4_1``: the GGUF Q4_1 layout (blocks of 32 weights along the input dimension, 4-bit codes, an
  fp16 scale ``d`` and an fp16 minimum ``m``; ``w = d * q + m``), dequantized on the fly inside an
  autograd function that keeps no weight copy between forward and backward. Quantizing the
  dequantized weights of a Q4_1 GGUF file reproduces the file's blocks, so the frozen base is exactly
  what was shipped.
- ``none``: leave the base in floating point (still frozen by ``attach_lordba_``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

Q41_BLOCK = 32


# --------------------------------------------------------------------------------------------------
# Q4_1 (ggml's quantize_row_q4_1_ref / dequantize_row_q4_1, vectorized)


@torch.no_grad()
def q41_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``weight (out, in)`` to Q4_1; ``in`` must be a multiple of 32.

    Returns ``(qweight uint8 (out, in // 2), d fp16 (out, in // 32), m fp16 (out, in // 32))``. Within a
    block, byte ``j`` holds element ``j`` in its low nibble and element ``j + 16`` in its high nibble
    (the GGUF byte layout).
    """
    n_out, n_in = weight.shape
    if n_in % Q41_BLOCK:
        raise ValueError(
            f"q4_1 needs in_features to be a multiple of {Q41_BLOCK}; got {n_in}. Use the 'nf4' or 'int8' backend "
            f"for this model, or skip this layer"
        )
    x = weight.detach().float().reshape(n_out, n_in // Q41_BLOCK, Q41_BLOCK)  # (out, nb, 32)
    mn = x.amin(dim=-1, keepdim=True)  # (out, nb, 1)
    mx = x.amax(dim=-1, keepdim=True)
    d = (mx - mn) / 15.0
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = torch.clamp(((x - mn) * inv + 0.5).to(torch.int8), max=15).to(torch.uint8)  # (out, nb, 32); C's (int8_t) cast
    packed = q[..., :16] | (q[..., 16:] << 4)  # (out, nb, 16)
    return packed.reshape(n_out, n_in // 2), d.squeeze(-1).half(), mn.squeeze(-1).half()


def q41_dequantize(qweight: torch.Tensor, d: torch.Tensor, m: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Inverse of :func:`q41_quantize`: ``w = d * q + m`` computed in float32, returned as ``dtype``."""
    n_out, half = qweight.shape
    nb = half * 2 // Q41_BLOCK
    qb = qweight.reshape(n_out, nb, 16)  # (out, nb, 16)
    q = torch.cat([qb & 0x0F, qb >> 4], dim=-1).float()  # (out, nb, 32)
    w = q * d.float().unsqueeze(-1)  # d * q then + m, in that order, as ggml/gguf-py do
    w = w + m.float().unsqueeze(-1)
    return w.reshape(n_out, nb * Q41_BLOCK).to(dtype)  # (out, in)


class _Q41MatMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, qweight, d, m):
        w = q41_dequantize(qweight, d, m, x.dtype)  # (out, in), freed on return
        ctx.q41 = (qweight, d, m)  # module buffers: references, no copy
        return x @ w.t()  # (..., in) -> (..., out)

    @staticmethod
    def backward(ctx, grad_out):
        qweight, d, m = ctx.q41
        w = q41_dequantize(qweight, d, m, grad_out.dtype)  # recomputed, not stored
        return grad_out @ w, None, None, None  # (..., out) -> (..., in)


class Q41Linear(nn.Module):
    """A frozen linear layer stored in the GGUF Q4_1 layout (4.0 + 1.0 bits per weight)."""

    def __init__(self, qweight: torch.Tensor, d: torch.Tensor, m: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, half = qweight.shape
        self.in_features = half * 2
        # fp16 d and m are kept as their raw bits (int16) so that model.to(dtype) cannot re-round them.
        self.register_buffer("qweight", qweight)
        self.register_buffer("q_scale", d.view(torch.int16))
        self.register_buffer("q_min", m.view(torch.int16))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Q41Linear:
        qw, d, m = q41_quantize(linear.weight)
        return cls(qw, d, m, linear.bias)

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        return q41_dequantize(self.qweight, self.q_scale.view(torch.float16), self.q_min.view(torch.float16), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _Q41MatMul.apply(x, self.qweight, self.q_scale.view(torch.float16), self.q_min.view(torch.float16))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


# --------------------------------------------------------------------------------------------------
# Backends


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError(
            "the 'nf4' and 'int8' backends need bitsandbytes: pip install bitsandbytes (after torch==2.13.0)"
        ) from e
    return bnb


def _to_nf4(linear: nn.Linear, compute_dtype: torch.dtype) -> nn.Module:
    bnb = _bnb()
    device = linear.weight.device
    q = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=compute_dtype,
        quant_type="nf4", device="meta",
    )
    q.weight = bnb.nn.Params4bit(linear.weight.data.float(), requires_grad=False, quant_type="nf4")
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    # bitsandbytes' CPU fast path (CPUs with AVX-512 BF16 / AMX, eval mode, no grad) repacks the frozen
    # weight in place on first use, computes in bf16 (other numerics than training forwards take) and
    # fails on widths that are not multiples of 64 ("shape '[64, 1]' is invalid for input of size 96"):
    # every nf4 layer takes the generic dequantize-and-matmul path, the same on every CPU
    q.support_avx512bf16_for_cpu = False
    return q.to(device)  # bitsandbytes quantizes on the move to a real device (CPU or CUDA)


def _to_int8(linear: nn.Linear, compute_dtype: torch.dtype) -> nn.Module:
    bnb = _bnb()
    device = linear.weight.device
    q = bnb.nn.Linear8bitLt(
        linear.in_features, linear.out_features, bias=linear.bias is not None, has_fp16_weights=False,
        threshold=0.0, device="meta",
    )
    q.weight = bnb.nn.Int8Params(linear.weight.data.to(compute_dtype), requires_grad=False, has_fp16_weights=False)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return q.to(device)


def _to_q41(linear: nn.Linear, compute_dtype: torch.dtype) -> nn.Module:
    return Q41Linear.from_linear(linear).to(linear.weight.device)


def _bnb_types() -> tuple[type, ...]:
    """bitsandbytes' layer types, or none while bitsandbytes is not imported: a model holds its layers
    only after :func:`_to_nf4` / :func:`_to_int8` (or the user) imported it, so asking which layer types
    an adapter may wrap never imports it (180 MB and seconds a q4_1 client does not need)."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return ()
    return (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def _q41_peft() -> dict:
    from peft.tuners.lora.layer import Linear as LoraLinear

    return {Q41Linear: LoraLinear}  # PEFT's documented hook for custom layer types


@dataclass(frozen=True)
class QuantBackend:
    """A frozen-base quantization backend: how it converts an ``nn.Linear`` (``convert(linear,
    compute_dtype)``; None leaves it in floating point), which layer types it produces (an adapter
    attaches to them), and the PEFT layer class wrapping those types PEFT does not know natively."""

    name: str
    convert: Callable[[nn.Linear, torch.dtype], nn.Module] | None
    layer_types: Callable[[], tuple[type, ...]] = tuple
    peft_modules: Callable[[], dict] = dict


QUANT_BACKENDS: dict[str, QuantBackend] = {}


def register_backend(backend: QuantBackend) -> QuantBackend:
    """Make ``backend`` selectable as ``quant = backend.name`` (run config) and known to adapters and PEFT."""
    if backend.name in QUANT_BACKENDS:
        raise ValueError(f"quantization backend {backend.name!r} exists; register yours under another name")
    QUANT_BACKENDS[backend.name] = backend
    return backend


register_backend(QuantBackend("nf4", _to_nf4, lambda: _bnb_types()[:1]))  # PEFT wraps bitsandbytes layers itself
register_backend(QuantBackend("int8", _to_int8, lambda: _bnb_types()[1:]))
register_backend(QuantBackend("q4_1", _to_q41, lambda: (Q41Linear,), _q41_peft))
register_backend(QuantBackend("none", None))


def peft_custom_modules() -> dict:
    """``{layer type: PEFT layer class}`` for every registered backend's layers PEFT does not know."""
    out: dict = {}
    for backend in QUANT_BACKENDS.values():
        out.update(backend.peft_modules())
    return out


def quantize_base_(
    model: nn.Module,
    backend: str = "q4_1",
    *,
    compute_dtype: torch.dtype = torch.float32,
    skip_modules: tuple[str, ...] = ("lm_head",),
) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (but ``skip_modules``) with a frozen quantized layer, in place.

    Parameters
    ----------
    model : nn.Module
        Any model; applied before or after ``attach_lordba_`` (adapter layers keep their base).
    backend : str
        One of ``nf4``, ``int8``, ``q4_1``, ``none``.
    compute_dtype : torch.dtype
        Dtype of the dequantized matmul for ``nf4``.
    skip_modules : tuple of str
        Names (last component) left in floating point; the LM head stays full precision by default.
    """
    if backend not in QUANT_BACKENDS:
        raise ValueError(f"unknown quantization backend {backend!r}; known: {sorted(QUANT_BACKENDS)}")
    convert = QUANT_BACKENDS[backend].convert
    if convert is not None:
        for name, module in list(model.named_modules()):
            if type(module) is not nn.Linear or name.rsplit(".", 1)[-1] in skip_modules:
                continue
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            quantized = convert(module, compute_dtype)
            quantized.train(module.training)  # a new module starts in training mode; keep the model's mode
            setattr(parent, child, quantized)
    model.lordba_base_quant = backend
    return model


def quantized_types() -> tuple[type, ...]:
    """Every layer type a registered backend produces (what an adapter may wrap besides ``nn.Linear``)."""
    return tuple(dict.fromkeys(t for backend in QUANT_BACKENDS.values() for t in backend.layer_types()))


@torch.no_grad()
def cast_unquantized_(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the floating-point tensors of every non-quantized module (embeddings, norms, LM head) to ``dtype``.

    Quantized layers keep their own storage untouched; ``model.to(dtype)`` would also touch
    bitsandbytes' quantization state.
    """
    qtypes = quantized_types()
    skip = {id(t) for m in model.modules() if isinstance(m, qtypes) for t in list(m.parameters()) + list(m.buffers())}
    for module in model.modules():
        for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if t is None or id(t) in skip or not t.is_floating_point() or t.dtype == dtype:
                continue
            t.data = t.data.to(dtype)
    return model


def base_weight_bytes(model: nn.Module) -> int:
    """Bytes held by the frozen base (parameters and buffers that are not adapter tensors)."""
    total = 0
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "lordba_" not in n:
            total += t.numel() * t.element_size()
    return total
