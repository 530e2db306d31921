"""The ``svd`` initialisation: fit a LoRDBA factorization to a dense update ``dW`` (DESIGN §1).

``dW / g = U diag(sigma) V^T`` (thin SVD); the latents take the top-``r`` singular vectors
(``L1 <- V_r^T``, ``L2 <- U_r``), so the carriers are their signs, and ``s_mid <- sigma_r``. Then the
scales are refitted in closed form with the carriers fixed: each of ``s_out``, ``s_in`` and ``s_mid``
is a linear least-squares problem given the other two, solved exactly in alternating sweeps.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from lordba_fl.adapter.ste import binarize


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


def _scale_sweeps(t, s1, s2, sc: dict, names: tuple[str, ...], sweeps: int, tol: float) -> tuple[dict, float]:
    """Alternating exact least-squares steps on the scales in ``names``, carriers fixed.

    Each block step is an exact minimiser, so the error never rises; a sweep is kept only when it
    lowers the error by more than ``tol`` (relative), so a fit that is already optimal (an exactly
    representable target) keeps its scales bit for bit. Returns (scales, relative error).
    """
    err = _rel_err(t, _product(s2, sc["mid"], s1, sc["out"], sc["in"]))
    for _ in range(sweeps):
        new = dict(sc)
        # a block whose least-squares problem is degenerate (e.g. s_mid while s_out is still 0) keeps its value
        if "mid" in names:
            gram = (s2.t() @ (new["out"].square()[:, None] * s2)) * (s1 @ (new["in"].square()[:, None] * s1.t()))  # (r, r)
            rhs = ((s2 * new["out"][:, None]).t() @ (t * new["in"][None, :]) * s1).sum(1)  # (r,)
            if bool(gram.abs().max() > 0):
                new["mid"] = torch.linalg.lstsq(gram, rhs[:, None]).solution[:, 0]
        if "out" in names:
            m = (s2 * new["mid"][None, :]) @ s1 * new["in"][None, :]  # (out, in)
            den = m.square().sum(1)  # (out,)
            new["out"] = torch.where(den > 0, (t * m).sum(1) / den.clamp_min(1e-300), new["out"])
        if "in" in names:
            m = new["out"][:, None] * ((s2 * new["mid"][None, :]) @ s1)  # (out, in)
            den = m.square().sum(0)  # (in,)
            new["in"] = torch.where(den > 0, (t * m).sum(0) / den.clamp_min(1e-300), new["in"])
        new_err = _rel_err(t, _product(s2, new["mid"], s1, new["out"], new["in"]))
        if not new_err < err - tol:
            break
        sc, err = new, new_err
    return sc, err


def _limit(hit: torch.Tensor, change: torch.Tensor, budget: list[int] | None) -> torch.Tensor:
    """Keep at most ``budget[0]`` of the improving flips ``hit``, the largest error reductions first."""
    if budget is None:
        return hit
    n = int(hit.sum())
    if n > budget[0]:
        keep = torch.zeros_like(hit)
        if budget[0] > 0:
            keep[torch.topk(torch.where(hit, -change, torch.full_like(change, -float("inf"))), budget[0]).indices] = True
        hit = keep
    budget[0] -= int(hit.sum())
    return hit


def _flip_pass_a(t, s1, s2, sc, tol: float, budget: list[int] | None = None) -> int:
    """Coordinate descent on the rows of ``S1`` (in place): for each rank component ``k``, flip
    ``S1[k, j]`` in every column ``j`` where that lowers ``||T - B S1 diag(s_in)||``.

    With ``B = diag(s_out) S2 diag(s_mid)`` fixed, the columns of ``S1`` are independent problems, so
    flipping component ``k`` in all improving columns at once is exact. Flipping ``x = S1[k, j]``
    changes column j's squared error by ``4 (c x b_k.rho + c^2 |b_k|^2)`` (``c = s_in[j]``,
    ``rho`` the residual column). Returns the number of flips.
    """
    b = (s2 * sc["mid"][None, :]) * sc["out"][:, None]  # (out, r)
    c = sc["in"]  # (in,)
    resid = t - (b @ s1) * c[None, :]  # (out, in)
    flips, scale = 0, float(t.square().sum())
    for k in range(s1.shape[0]):
        bk = b[:, k]  # (out,)
        change = 4 * (c * s1[k] * (bk @ resid) + c.square() * bk.square().sum())  # (in,)
        hit = _limit(change < -tol * scale, change, budget)
        n = int(hit.sum())
        if n:
            resid[:, hit] += 2 * bk[:, None] * (c * s1[k])[None, hit]  # rho + 2 c x b_k
            s1[k, hit] = -s1[k, hit]
            flips += n
    return flips


def _flip_pass_b(t, s1, s2, sc, tol: float, budget: list[int] | None = None) -> int:
    """The same for the columns of ``S2`` (in place): rows of ``T`` are independent given
    ``A' = diag(s_mid) S1 diag(s_in)``; flipping ``x = S2[i, k]`` changes row i's squared error by
    ``4 (d x a_k.rho + d^2 |a_k|^2)`` with ``d = s_out[i]``."""
    a = (s1 * sc["mid"][:, None]) * sc["in"][None, :]  # (r, in)
    d = sc["out"]  # (out,)
    resid = t - d[:, None] * (s2 @ a)  # (out, in)
    flips, scale = 0, float(t.square().sum())
    for k in range(s2.shape[1]):
        ak = a[k]  # (in,)
        change = 4 * (d * s2[:, k] * (resid @ ak) + d.square() * ak.square().sum())  # (out,)
        hit = _limit(change < -tol * scale, change, budget)
        n = int(hit.sum())
        if n:
            resid[hit] += 2 * (d * s2[:, k])[hit, None] * ak[None, :]
            s2[hit, k] = -s2[hit, k]
            flips += n
    return flips


@torch.no_grad()
def refine_lordba(
    target: torch.Tensor,
    s1: torch.Tensor,
    s2: torch.Tensor,
    scales: dict[str, torch.Tensor],
    names: tuple[str, ...],
    sweeps: int = 3,
    passes: int = 3,
    tol: float = 1e-9,
    max_flips: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], float]:
    """Faithful re-binarization: fit ``target`` starting from the current carriers and scales.

    Alternates (a) exact least-squares sweeps of the scales with the carriers fixed and (b) greedy
    coordinate descent on the signs (DBF-style: one rank component at a time, every sign whose flip
    lowers the error), until a pass changes nothing. Every step lowers the Frobenius error or is
    not taken, so a sign changes only where that lowers the fit error, and an exactly representable
    target (e.g. the current adapter's own product) keeps its carriers and scales unchanged.

    Parameters
    ----------
    target : Tensor
        ``(out, in)`` update to fit, in the adapter's ``dW / g`` units.
    s1, s2 : Tensor
        Current carriers ``(r, in)`` and ``(out, r)`` of ``+-1`` (not modified).
    scales : dict
        Current ``{"in", "mid", "out"}`` scales (absent kinds are ones and stay fixed).
    names : tuple of str
        The trained scale kinds.
    sweeps, passes : int
        Scale sweeps per pass; alternating passes.
    tol : float
        Relative improvement a step must make to be taken.
    max_flips : int, optional
        Most signs (of both carriers together) the fit may change; the largest error reductions
        are taken first within each component.

    Returns
    -------
    (S1, S2, scales, relative error) with the scales for ``names`` only.
    """
    t = target.detach().to(torch.float64)
    n_out, n_in = t.shape
    s1, s2 = s1.to(torch.float64).clone(), s2.to(torch.float64).clone()  # (r, in), (out, r)
    rank = s1.shape[0]
    sizes = {"in": n_in, "mid": rank, "out": n_out}
    sc = {k: (scales[k].to(torch.float64).clone() if k in names else torch.ones(sizes[k], dtype=torch.float64))
          for k in ("in", "mid", "out")}
    if not bool((sc["out"] != 0).any() and (sc["in"] != 0).any() and (sc["mid"] != 0).any()):
        sc, _ = _scale_sweeps(t, s1, s2, sc, names, sweeps, tol)  # a zero scale gives the signs no gradient
    budget = None if max_flips is None else [int(max_flips)]
    for _ in range(passes):
        flipped = _flip_pass_a(t, s1, s2, sc, tol, budget) + _flip_pass_b(t, s1, s2, sc, tol, budget)
        sc, _ = _scale_sweeps(t, s1, s2, sc, names, sweeps, tol)
        if not flipped:
            break
    sc, err = _scale_sweeps(t, s1, s2, sc, names, 4 * sweeps, tol)  # alternating LS converges slowly
    return s1, s2, {k: sc[k] for k in names}, err


def align_components(s1_new, s2_new, s1_old) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order and sign new rank components like the old carriers: the product is invariant to a
    permutation of the components and to flipping row k of ``S1`` together with column k of ``S2``.

    Components are matched by the largest total ``|<S1_old[i], S1_new[j]>|`` (Hungarian
    assignment); a matched pair with a negative overlap flips both of its carriers. Returns
    ``(S1, S2, perm)`` with ``perm[i]`` the new component placed at position i.
    """
    from scipy.optimize import linear_sum_assignment

    overlap = s1_old.double() @ s1_new.double().t()  # (r, r)
    _, perm = linear_sum_assignment(-overlap.abs().numpy())
    perm = torch.as_tensor(perm)
    s1, s2 = s1_new[perm].clone(), s2_new[:, perm].clone()
    sign = torch.where(overlap[torch.arange(len(perm)), perm] < 0, -1.0, 1.0).to(s1.dtype)  # (r,)
    return s1 * sign[:, None], s2 * sign[None, :], perm


@torch.no_grad()
def normalize_gauge(scales: dict[str, torch.Tensor], targets: dict[str, float]) -> dict[str, torch.Tensor]:
    """Rescale a fitted scale set so every scale but the outermost has the rms of a fresh one.

    ``diag(s_out) S2 diag(s_mid) S1 diag(s_in)`` is unchanged by ``s_in * c, s_mid / c`` (and by
    ``s_mid * c, s_out / c``), so a fit leaves this gauge arbitrary: the SVD gives ``s_mid`` the
    singular values and ``s_in`` ones, and ``s_out`` whatever is left. Adam moves every parameter by
    about its learning rate, so the gauge sets how far a step moves the product; moving each inner
    scale to the rms a fresh adapter starts at (``targets``: :func:`initial_scale_values`) makes an
    imported adapter take the steps a fresh one does. The product changes only by rounding.
    """
    names = [n for n in ("in", "mid", "out") if n in scales]
    out = {k: v.clone() for k, v in scales.items()}
    for inner, outer in itertools.pairwise(names):
        rms = float(out[inner].double().square().mean().sqrt())
        if not (rms > 0 and math.isfinite(rms)):
            continue  # an all-zero (or broken) scale has no gauge to move
        c = targets[inner] / rms
        out[inner] = out[inner] * c
        out[outer] = out[outer] / c
    return out


@torch.no_grad()
def svd_init_(layer: nn.Module, delta_weight: torch.Tensor, sweeps: int = 5) -> float:
    """Initialise ``layer`` so its update approximates ``delta_weight`` (out, in); returns the relative error.

    With ``scale_init='normalized'`` the fitted scales are moved to a fresh adapter's gauge
    (:func:`normalize_gauge`), so training after the import is conditioned like training from scratch.
    """
    target = delta_weight.detach().float().cpu() / layer.scaling
    l1, l2, scales, err = fit_lordba(target, layer.rank, layer.scale_names, sweeps)
    if layer.scale_targets is not None:
        scales = normalize_gauge(scales, layer.scale_targets)
    layer.lordba_latent_A.copy_(l1)
    layer.lordba_latent_B.copy_(l2)
    for name, value in scales.items():
        layer.scale(name).copy_(value)
    return err


@torch.no_grad()
def fit_from(target, s1, s2, scales: dict, names: tuple[str, ...], *, restart: bool = False,
             max_flips: int | None = None, sweeps: int = 3, passes: int = 3):
    """:func:`refine_lordba` from the current carriers; with ``restart`` also from a fresh SVD fit of
    ``target`` whose components are aligned to the current carriers (:func:`align_components`),
    keeping the lower error. A restart may change any number of signs, so it is only tried when
    ``max_flips`` is None. Returns ``(S1, S2, scales, relative error)``."""
    warm = refine_lordba(target, s1, s2, scales, names, sweeps, passes, max_flips=max_flips)
    if not restart or max_flips is not None:
        return warm
    l1, l2, fitted, _ = fit_lordba(target, s1.shape[0], names, sweeps)
    f1, f2, perm = align_components(torch.where(l1 < 0, -1.0, 1.0), torch.where(l2 < 0, -1.0, 1.0), s1)
    start = dict(fitted)
    if "mid" in start:
        start["mid"] = start["mid"][perm]
    fresh = refine_lordba(target, f1, f2, start, names, sweeps, passes)
    return fresh if fresh[3] < warm[3] else warm


@torch.no_grad()
def fit_float_factors_(layer: nn.Module, s1: torch.Tensor, s2: torch.Tensor, s_out: torch.Tensor | None,
                       max_flips: int | None, magnitude: float, restart: bool = False) -> tuple[int, float]:
    """Fit a layer trained with float factors back to LoRDBA form, in place (on the device).

    The target is the layer's float product ``diag(s_out) L2 diag(s_mid) L1 diag(s_in)``; the fit
    starts from the signs ``s1`` (r, in), ``s2`` (out, r) it had before training (the broadcast),
    the trained scales and ``s_out`` (the broadcast's, when training folded it into ``L2``), and
    changes at most ``max_flips`` signs (:func:`fit_from`). The latents become the fitted signs
    times ``magnitude``. Returns (signs changed, relative fit error).
    """
    names = layer.scale_names
    a, b = layer.lordba_latent_A.double(), layer.lordba_latent_B.double()  # (r, in), (out, r)
    ones = lambda n: torch.ones(n, dtype=torch.float64)  # noqa: E731
    sc = {k: (layer.scale(k).double() if k in names else ones(n))
          for k, n in (("in", layer.in_features), ("mid", layer.rank), ("out", layer.out_features))}
    target = _product(b, sc["mid"], a, sc["out"], sc["in"])  # (out, in)
    if s_out is not None:
        sc["out"] = s_out.double().clone()
    f1, f2, fitted, err = fit_from(target, s1, s2, sc, names, restart=restart, max_flips=max_flips)
    changed = int((f1 != s1.double()).sum() + (f2 != s2.double()).sum())
    layer.lordba_latent_A.copy_(f1 * magnitude)
    layer.lordba_latent_B.copy_(f2 * magnitude)
    for k, v in fitted.items():
        layer.scale(k).copy_(v)
    return changed, err
