"""The ``svd`` initialisation: fit a LoRDBA factorization to a dense update ``dW`` (DESIGN §1).

``dW / g = U diag(sigma) V^T`` (thin SVD); the latents take the top-``r`` singular vectors
(``L1 <- V_r^T``, ``L2 <- U_r``), so the carriers are their signs, and ``s_mid <- sigma_r``. Then the
scales are refitted in closed form with the carriers fixed: each of ``s_out``, ``s_in`` and ``s_mid``
is a linear least-squares problem given the other two, solved exactly in alternating sweeps.
"""

from __future__ import annotations

import torch

from lordba_fl.adapter import LoRDBALinear, binarize


def _rel_err(target: torch.Tensor, approx: torch.Tensor) -> float:
    denom = target.norm()
    return float((target - approx).norm() / denom) if denom > 0 else float((target - approx).norm())


def _product(s2, s_mid, s1, s_out, s_in):
    return s_out[:, None] * ((s2 * s_mid[None, :]) @ s1) * s_in[None, :]  # (out, in)


@torch.no_grad()
def fit_lordba(
    target: torch.Tensor, rank: int, scales: tuple[str, ...], sweeps: int = 5
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], float]:
    """Fit ``target (out, in) ~= diag(s_out) S2 diag(s_mid) S1 diag(s_in)``.

    Returns the latents ``L1 (r, in)``, ``L2 (out, r)``, the fitted scales for the names in ``scales``
    (absent scales are fixed to one) and the relative Frobenius error of the fit.
    """
    t = target.detach().to(torch.float64)
    n_out, n_in = t.shape
    if rank > min(n_out, n_in):
        raise ValueError(f"svd init: rank {rank} exceeds min(out, in) = {min(n_out, n_in)} of a {tuple(t.shape)} update")
    u, sigma, vh = torch.linalg.svd(t, full_matrices=False)
    l1, l2 = vh[:rank].clone(), u[:, :rank].clone()  # (r, in), (out, r)
    s1, s2 = binarize(l1), binarize(l2)
    s_in = torch.ones(n_in, dtype=t.dtype)
    s_out = torch.ones(n_out, dtype=t.dtype)
    s_mid = sigma[:rank].clone() if "mid" in scales else torch.ones(rank, dtype=t.dtype)
    best = None
    for _ in range(max(sweeps, 1) if len(scales) else 0):
        if "mid" in scales:
            # min_m || T - sum_k m_k a*S2[:,k] S1[k,:]*b ||: Gram (S2^T a^2 S2) .* (S1 b^2 S1^T), rhs diag(S2^T aTb S1^T)
            gram = (s2.t() @ (s_out.square()[:, None] * s2)) * (s1 @ (s_in.square()[:, None] * s1.t()))  # (r, r)
            rhs = ((s2 * s_out[:, None]).t() @ (t * s_in[None, :]) * s1).sum(1)  # (r,)
            s_mid = torch.linalg.lstsq(gram, rhs[:, None]).solution[:, 0]
        if "out" in scales:
            m = (s2 * s_mid[None, :]) @ s1 * s_in[None, :]  # (out, in)
            s_out = (t * m).sum(1) / m.square().sum(1).clamp_min(1e-30)
        if "in" in scales:
            m = s_out[:, None] * ((s2 * s_mid[None, :]) @ s1)  # (out, in)
            s_in = (t * m).sum(0) / m.square().sum(0).clamp_min(1e-30)
        err = _rel_err(t, _product(s2, s_mid, s1, s_out, s_in))
        if best is not None and err >= best - 1e-12:
            break
        best = err
    err = _rel_err(t, _product(s2, s_mid, s1, s_out, s_in))
    fitted = {"in": s_in, "mid": s_mid, "out": s_out}
    return l1.float(), l2.float(), {k: fitted[k].float() for k in scales}, err


@torch.no_grad()
def svd_init_(layer: LoRDBALinear, delta_weight: torch.Tensor, sweeps: int = 5) -> float:
    """Initialise ``layer`` so its update approximates ``delta_weight`` (out, in); returns the relative error."""
    target = delta_weight.detach().float().cpu() / layer.scaling
    l1, l2, scales, err = fit_lordba(target, layer.rank, layer.scale_names, sweeps)
    layer.lordba_latent_A.copy_(l1)
    layer.lordba_latent_B.copy_(l2)
    for name, value in scales.items():
        layer.scale(name).copy_(value)
    return err
