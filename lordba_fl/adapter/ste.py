"""Straight-through estimators: forward is always ``sign(L)`` with ``sign(0) = +1``; backward multiplies
the incoming gradient by a surrogate derivative ``d sign(L) / dL`` registered here by name."""

from __future__ import annotations

from collections.abc import Callable

import torch


def _smooth_ste_grad(latent: torch.Tensor, k: float) -> torch.Tensor:
    t = torch.tanh(latent * k)
    return t.square_().neg_().add_(1.0).mul_(k)  # k * (1 - tanh(k L)^2), in place on one buffer


def _clipped_ste_grad(latent: torch.Tensor, k: float) -> torch.Tensor:
    return (latent.abs() <= 1.0).to(latent.dtype)


STE_REGISTRY: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "smooth": _smooth_ste_grad,
    "clipped": _clipped_ste_grad,
}


def binarize(latent: torch.Tensor) -> torch.Tensor:
    """``sign(L)`` with ``sign(0) = +1``, in the latent's dtype."""
    return torch.where(latent < 0, -1.0, 1.0).to(latent.dtype)


def ste_grad(name: str, latent: torch.Tensor, k: float) -> torch.Tensor:
    """Surrogate derivative of the STE ``name`` at ``latent``."""
    try:
        fn = STE_REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown STE {name!r}; known: {sorted(STE_REGISTRY)}") from None
    return fn(latent, k)
