"""The LoRDBA layer: a double-binary low-rank adapter over a frozen (quantized) linear layer.

Forward (DESIGN §1)::

    y = base(x) + g * s_out * (S2 @ (s_mid * (S1 @ (s_in * x))))      S1 = sign(L1), S2 = sign(L2)

The scales are folded into the two small factors, ``A = S1 * s_mid[:, None] * s_in[None, :]`` (r, in)
and ``B = S2 * s_out[:, None]`` (out, r), so the adapter costs exactly what LoRA costs: two thin
matmuls. One autograd function does the whole adapter path and keeps for backward only what LoRA
keeps (the input and the ``(.., r)`` bottleneck activation) plus references to the parameters: the
signs are computed once in forward and once more in backward from the latents, instead of keeping
full-size sign, folded-factor or scaled-activation copies alive between the two passes.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lordba_fl.adapter.config import LoRDBAConfig
from lordba_fl.adapter.fit import svd_init_
from lordba_fl.adapter.ste import binarize, ste_grad
from lordba_fl.base.quant import quantized_types


def _ones_if_none(s: torch.Tensor | None, n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.ones(n, dtype=like.dtype, device=like.device) if s is None else s


def _fold_a(s1, s_in, s_mid):
    """``A = S1 * s_mid[:, None] * s_in[None, :]`` (.., r, in), in place on the fresh sign tensor ``s1``."""
    if s_mid is not None:
        s1.mul_(s_mid[..., :, None])
    if s_in is not None:
        s1.mul_(s_in[..., None, :])
    return s1


def _fold_b(s2, s_out):
    """``B = S2 * s_out[:, None]`` (.., out, r), in place on the fresh sign tensor ``s2``."""
    return s2.mul_(s_out[..., :, None]) if s_out is not None else s2


class _LoRDBADelta(torch.autograd.Function):
    """``g * ((x @ A^T) @ B^T)`` for K adapters at once; see module docstring.

    Shapes: ``x`` (K, N, in), latents (K, r, in) and (K, out, r), scales (K, in), (K, r), (K, out)
    or None. Adapter k sees only rows ``x[k]``: one client's adapter is K = 1, and
    :mod:`simulations.batched` trains K clients' adapters over one shared base forward.
    """

    @staticmethod
    def forward(ctx, x, latent_a, latent_b, s_in, s_mid, s_out, scaling, ste, ste_k):
        a = _fold_a(binarize(latent_a), s_in, s_mid)  # (K, r, in)
        b = _fold_b(binarize(latent_b), s_out)  # (K, out, r)
        h = x @ a.to(x.dtype).transpose(-1, -2)  # (K, N, in) -> (K, N, r)
        out = (h @ b.to(x.dtype).transpose(-1, -2)).mul_(scaling)  # (K, N, r) -> (K, N, out)
        ctx.save_for_backward(x, h, latent_a, latent_b, s_in, s_mid, s_out)
        ctx.scaling, ctx.ste, ctx.ste_k = scaling, ste, ste_k
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, h, latent_a, latent_b, s_in, s_mid, s_out = ctx.saved_tensors
        s1 = binarize(latent_a)  # (K, r, in), recomputed rather than kept alive since forward
        s2 = binarize(latent_b)  # (K, out, r)
        a = _fold_a(s1.clone(), s_in, s_mid)  # (K, r, in)
        b = _fold_b(s2.clone(), s_out)  # (K, out, r)

        g2 = grad_out * ctx.scaling  # (K, N, out)
        grad_h = g2 @ b.to(g2.dtype)  # (K, N, out) @ (K, out, r) -> (K, N, r)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_h @ a.to(grad_h.dtype)  # (K, N, r) @ (K, r, in) -> (K, N, in)
        grad_b = (g2.transpose(-1, -2) @ h).to(latent_b.dtype)  # (K, out, N) @ (K, N, r) -> (K, out, r)
        grad_a = (grad_h.transpose(-1, -2) @ x).to(latent_a.dtype)  # (K, r, N) @ (K, N, in) -> (K, r, in)

        grad_sin = grad_smid = grad_sout = None
        if s_in is not None or s_mid is not None:
            ga_s1 = grad_a * s1  # (K, r, in): dL/dA * S1
            if s_in is not None and ctx.needs_input_grad[3]:
                # (K, 1, r) @ (K, r, in) -> (K, in)
                grad_sin = (s_mid[..., None, :] @ ga_s1)[..., 0, :] if s_mid is not None else ga_s1.sum(-2)
            if s_mid is not None and ctx.needs_input_grad[4]:
                # (K, r, in) @ (K, in, 1) -> (K, r)
                grad_smid = (ga_s1 @ s_in[..., :, None])[..., 0] if s_in is not None else ga_s1.sum(-1)
        if s_out is not None and ctx.needs_input_grad[5]:
            grad_sout = (grad_b * s2).sum(-1)  # (K, out)
        grad_la = grad_lb = None
        if ctx.needs_input_grad[1]:
            # dL/dS1 = dL/dA * s_mid s_in^T = dL/dA * A / S1 = dL/dA * A * S1 (S1 = +-1)
            grad_la = grad_a.mul_(a.mul_(s1)).mul_(ste_grad(ctx.ste, latent_a, ctx.ste_k))
        if ctx.needs_input_grad[2]:
            grad_lb = grad_b.mul_(b.mul_(s2)).mul_(ste_grad(ctx.ste, latent_b, ctx.ste_k))
        return grad_x, grad_la, grad_lb, grad_sin, grad_smid, grad_sout, None, None, None


def _unsqueeze(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.unsqueeze(0)


@torch.no_grad()
def effective_weight(layer: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight a frozen base layer applies, in fp32, whatever its storage.

    ``q4_1`` layers dequantize their blocks; bitsandbytes int8 layers give ``CB * SCB / 127`` (their
    forward also quantizes the activations, so no input reads the weight back exactly); any other
    weight-only quantized layer (nf4) is read back by feeding it the identity (``W^T + b`` for
    ``x = I``), which is exactly what its forward computes.
    """
    if type(layer) is nn.Linear:
        return layer.weight.detach().float()
    dequantized = getattr(layer, "dequantized_weight", None)
    if dequantized is not None:
        return dequantized(torch.float32)
    cb, scb = getattr(layer.weight, "CB", None), getattr(layer.weight, "SCB", None)
    if cb is not None and scb is not None:  # (out, in) int8 codes, (out,) row absmax
        return (cb.float() * (scb.float() / 127.0)[:, None]).cpu()
    device = _module_device(layer)
    eye = torch.eye(int(layer.in_features), device=device)  # (in, in)
    zero = torch.zeros(1, int(layer.in_features), device=device)  # (1, in): the bias alone
    return (layer(eye).float() - layer(zero).float()).t().cpu()  # (in, out) -> (out, in)


@torch.no_grad()
def base_svd_latents(base_layer: nn.Module, rank: int, magnitude: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents whose signs are the top-``rank`` singular vectors of the frozen base weight.

    ``W0 = U diag(sigma) V^T``; ``L1 = V_r^T``, ``L2 = U_r`` with each component's sign fixed so
    that its largest entry of ``U`` is positive (an SVD defines it only up to sign), rescaled so
    every latent has magnitude about ``magnitude`` like the random init.
    """
    w = effective_weight(base_layer).double()  # (out, in)
    if rank > min(w.shape):
        raise ValueError(f"sign_init='base-svd' needs rank <= min(out, in) = {min(w.shape)}; got rank {rank}")
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    u, vh = u[:, :rank], vh[:rank]  # (out, r), (r, in)
    sign = torch.sign(u.gather(0, u.abs().argmax(0, keepdim=True)))[0]  # (r,)
    sign[sign == 0] = 1.0
    u, vh = u * sign[None, :], vh * sign[:, None]
    la = vh / vh.abs().mean(1, keepdim=True) * magnitude  # (r, in)
    lb = u / u.abs().mean(0, keepdim=True) * magnitude  # (out, r)
    return la.float().cpu().contiguous(), lb.float().cpu().contiguous()  # u[:, :rank] is a strided view


def initial_scale_values(cfg: LoRDBAConfig, n_in: int, n_out: int) -> dict[str, float]:
    """The constant each fresh scale starts at (before the outermost one is zeroed).

    ``normalized``: the folded ``A = S1 diag(s_mid) diag(s_in)`` gets entries ``1/sqrt(in * r)``,
    split as ``s_in = 1/sqrt(in)``, ``s_mid = 1/sqrt(r)``; a scale the config leaves out passes its
    share to the other one (``s_mid = 1/sqrt(in * r)`` without ``s_in``), so every scale set starts
    equally conditioned. ``ones``: every scale is 1.
    """
    if cfg.scale_init == "ones":
        return {"in": 1.0, "mid": 1.0, "out": 1.0}
    g_in, g_mid = n_in ** -0.5, cfg.rank ** -0.5
    has_in, has_mid = "in" in cfg.scales, "mid" in cfg.scales
    return {
        "in": g_in * (1.0 if has_mid else g_mid),
        "mid": g_mid * (1.0 if has_in else g_in),
        "out": 1.0,  # zeroed by the caller when it is the outermost scale
    }


def scratch_latents(cfg: LoRDBAConfig, n_in: int, n_out: int, generator: torch.Generator | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh layer's latents ``L1 (r, in)``, ``L2 (out, r)``, drawn ``N(0, init_std^2)`` from
    ``generator`` in this order (``attach_lordba_`` shares one generator across the layers in module order)."""
    la = torch.randn(cfg.rank, n_in, generator=generator) * cfg.init_std  # (r, in)
    lb = torch.randn(n_out, cfg.rank, generator=generator) * cfg.init_std  # (out, r)
    return la, lb


def scale_lr_gain(layer: "LoRDBALinear", name: str) -> float:
    """The ``relative`` learning-rate multiplier of ``layer``'s scale ``name`` (config.SCALE_LRS):
    its normalized init over the full scale set's, e.g. ``1/sqrt(in)`` for ``s_mid`` without ``s_in``;
    1 for ``s_out`` and for ``ones``-initialised scales."""
    start = layer.scale_targets
    if start is None:
        return 1.0
    full = {"in": layer.in_features ** -0.5, "mid": layer.rank ** -0.5, "out": 1.0}
    return start[name] / full[name]


class LoRDBALinear(nn.Module):
    """A frozen base linear layer plus a LoRDBA adapter.

    Parameters
    ----------
    base_layer : nn.Module
        The frozen layer (``nn.Linear``, bitsandbytes ``Linear4bit`` / ``Linear8bitLt``, or
        :class:`lordba_fl.base.quant.Q41Linear`); it must expose ``in_features`` and ``out_features``.
    cfg : LoRDBAConfig
        Rank, alpha, STE and scale set.
    generator : torch.Generator, optional
        Source of the scratch-init latents.
    """

    def __init__(self, base_layer: nn.Module, cfg: LoRDBAConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.base_layer = base_layer
        self.in_features = int(base_layer.in_features)
        self.out_features = int(base_layer.out_features)
        self.rank = cfg.rank
        self.scaling = cfg.scaling
        self.ste = cfg.ste
        self.ste_k = float(cfg.ste_k)
        self.scale_names = cfg.scales
        self.adapter_enabled = True
        # True while a client trains the latents as unconstrained float factors (no sign, no STE):
        # the warm-up rounds of lordba_fl.methods.lordba fit the result back to signs on the device
        self.float_factors = False
        self._fold_cache = None
        # (latent_A, latent_B, s_in, s_mid, s_out) stacked over K clients while simulations.batched trains them
        self.stack: tuple | None = None
        device = _module_device(base_layer)
        r, n_in, n_out = cfg.rank, self.in_features, self.out_features
        la, lb = scratch_latents(cfg, n_in, n_out, generator)
        if cfg.sign_init == "base-svd":
            la, lb = base_svd_latents(base_layer, r, cfg.init_std)
        self.lordba_latent_A = nn.Parameter(la.to(device))
        self.lordba_latent_B = nn.Parameter(lb.to(device))
        sizes = {"in": n_in, "mid": r, "out": n_out}
        start = initial_scale_values(cfg, n_in, n_out)
        # the gauge an imported (fitted) scale set is moved to: lordba_fl.adapter.fit.normalize_gauge
        self.scale_targets = start if cfg.scale_init == "normalized" else None
        for name in ("in", "mid", "out"):
            p = nn.Parameter(torch.full((sizes[name],), start[name], device=device)) if name in cfg.scales else None
            self.register_parameter(f"lordba_scale_{name}", p)
        # Scratch init is a no-op: zero the outermost scale present (LoRA's B = 0 convention).
        with torch.no_grad():
            self.outermost_scale().zero_()

    def outermost_scale(self) -> nn.Parameter:
        for name in ("out", "mid", "in"):
            p = getattr(self, f"lordba_scale_{name}")
            if p is not None:
                return p
        raise AssertionError("a LoRDBA layer always has at least one scale")

    def scale(self, name: str) -> torch.Tensor | None:
        return getattr(self, f"lordba_scale_{name}")

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution ``g * s_out * (S2 @ (s_mid * (S1 @ (s_in * x))))``."""
        if not torch.is_grad_enabled():
            # Inference: fold signs and scales once and reuse them until a parameter changes
            # (tracked by the tensors' version counters), so a forward costs what LoRA's does.
            a, b = self._folded(x.dtype)
            return (x @ a.t() @ b.t()).mul_(self.scaling)  # (..., in) -> (..., r) -> (..., out)
        self._fold_cache = None
        if self.float_factors:
            a, b = self._float_factors()
            return (x @ a.t() @ b.t()) * self.scaling  # (..., in) -> (..., r) -> (..., out)
        params = (self.lordba_latent_A, self.lordba_latent_B, self.lordba_scale_in, self.lordba_scale_mid, self.lordba_scale_out)
        out = _LoRDBADelta.apply(
            x.reshape(1, -1, self.in_features), *(_unsqueeze(p) for p in params), self.scaling, self.ste, self.ste_k
        )  # (1, N, out)
        return out.reshape(*x.shape[:-1], self.out_features)

    def stacked_delta(self, x: torch.Tensor) -> torch.Tensor:
        """K clients' adapters (``self.stack``) over a batch whose rows come in K equal client blocks."""
        la, lb, s_in, s_mid, s_out = self.stack
        k = la.shape[0]
        if x.shape[0] % k:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {k} equal client blocks")
        out = _LoRDBADelta.apply(
            x.reshape(k, -1, self.in_features), la, lb, s_in, s_mid, s_out, self.scaling, self.ste, self.ste_k
        )  # (K, N/K, out)
        return out.reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)  # (..., out)
        if not self.adapter_enabled:
            return y
        delta = self.delta(x) if self.stack is None else self.stacked_delta(x)
        return y + delta.to(y.dtype)

    def _float_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``A = L1 s_mid s_in`` (r, in) and ``B = s_out L2`` (out, r) with the latents as real values."""
        a, b = self.lordba_latent_A, self.lordba_latent_B
        if self.lordba_scale_mid is not None:
            a = a * self.lordba_scale_mid[:, None]
        if self.lordba_scale_in is not None:
            a = a * self.lordba_scale_in[None, :]
        if self.lordba_scale_out is not None:
            b = b * self.lordba_scale_out[:, None]
        return a, b

    def _folded(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        params = [p for p in self.parameters(recurse=False)]
        key = (dtype, tuple((p.data_ptr(), p._version) for p in params))
        cache = getattr(self, "_fold_cache", None)
        key = (key, self.float_factors)
        if cache is None or cache[0] != key:
            if self.float_factors:
                a, b = (t.detach().clone() for t in self._float_factors())
            else:
                a = _fold_a(binarize(self.lordba_latent_A), self.lordba_scale_in, self.lordba_scale_mid)  # (r, in)
                b = _fold_b(binarize(self.lordba_latent_B), self.lordba_scale_out)  # (out, r)
            cache = (key, a.to(dtype), b.to(dtype))
            self._fold_cache = cache
        return cache[1], cache[2]

    @torch.no_grad()
    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact plain-LoRA factors ``(lora_A (r, in), lora_B (out, r))`` with ``B @ A * g == dW``."""
        r = self.rank
        s1, s2 = binarize(self.lordba_latent_A), binarize(self.lordba_latent_B)
        sin = _ones_if_none(self.lordba_scale_in, self.in_features, s1)
        smid = _ones_if_none(self.lordba_scale_mid, r, s1)
        sout = _ones_if_none(self.lordba_scale_out, self.out_features, s2)
        lora_a = s1 * sin[None, :]  # (r, in)
        lora_b = sout[:, None] * s2 * smid[None, :]  # (out, r)
        return lora_a, lora_b

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """The dense update ``dW`` (out, in) this adapter adds to the base weight."""
        a, b = self.lora_factors()
        return (b @ a) * self.scaling  # (out, r) @ (r, in) -> (out, in)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scaling={self.scaling:g}, "
            f"ste={self.ste}, scales={list(self.scale_names)}"
        )


def _module_device(module: nn.Module) -> torch.device:
    for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        return t.device
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# Attaching to a model


def supported_base_types() -> tuple[type, ...]:
    """Linear layer types a LoRDBA adapter can wrap: ``nn.Linear`` and every quantized base layer."""
    return (nn.Linear, *quantized_types())


def _matches(name: str, targets: Iterable[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def lordba_layers(model: nn.Module) -> dict[str, LoRDBALinear]:
    """Every LoRDBA layer of ``model`` by its module name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRDBALinear)}


def find_targets(model: nn.Module, cfg: LoRDBAConfig) -> dict[str, nn.Module]:
    """The modules ``attach_lordba_(model, cfg)`` would wrap, by name; errors name the fix."""
    supported = supported_base_types()
    targets = {}
    for name, module in model.named_modules():
        if name and _matches(name, cfg.target_modules):
            if not isinstance(module, supported):
                raise TypeError(
                    f"target module {name!r} is a {type(module).__name__}, not a linear layer LoRDBA can wrap "
                    f"({', '.join(t.__name__ for t in supported)}); remove it from target_modules"
                )
            targets[name] = module
    if not targets:
        linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, supported)})
        raise ValueError(
            f"no module matches target_modules={list(cfg.target_modules)}; linear layers in this model are named "
            f"{linear_names}"
        )
    return targets


def attach_lordba_(
    model: nn.Module,
    cfg: LoRDBAConfig | None = None,
    *,
    delta_weights: dict[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Wrap the target linear layers of ``model`` in LoRDBA adapters, in place.

    Afterwards every base parameter is frozen; the only trainable tensors are the latents and the
    configured scales.

    Parameters
    ----------
    model : nn.Module
        A transformers causal LM (or any module) whose targets are supported linear layers.
    cfg : LoRDBAConfig, optional
        Adapter configuration; defaults to ``LoRDBAConfig()``.
    delta_weights : dict, optional
        ``{module_name: dW (out, in)}``, required by ``cfg.init == "svd"``: the dense update each
        adapter is fitted to.

    Returns
    -------
    dict
        For ``svd`` init, the relative Frobenius reconstruction error of every layer; else empty.
    """
    cfg = cfg or LoRDBAConfig()
    if lordba_layers(model):
        raise ValueError("model already has LoRDBA adapters; load a fresh base model to attach a new adapter")
    targets = find_targets(model, cfg)
    if cfg.init == "svd":
        if delta_weights is None:
            raise ValueError("init='svd' needs delta_weights={module_name: dW}; pass them or use init='scratch'")
        missing = sorted(set(targets) - set(delta_weights))
        if missing:
            raise ValueError(f"init='svd': delta_weights has no entry for {missing[:5]} ({len(missing)} missing)")
        for name, m in targets.items():
            shape = tuple(delta_weights[name].shape)
            if shape != (m.out_features, m.in_features):
                raise ValueError(
                    f"delta_weights[{name!r}] has shape {shape}; the layer needs (out, in) = "
                    f"({m.out_features}, {m.in_features})"
                )

    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    errors: dict[str, float] = {}
    for name, base in targets.items():
        layer = LoRDBALinear(base, cfg, generator)
        if cfg.init == "svd":
            errors[name] = svd_init_(layer, delta_weights[name], sweeps=cfg.svd_sweeps)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
    model.lordba_config = cfg
    return errors


def set_adapters_enabled_(model: nn.Module, enabled: bool) -> None:
    """Turn every LoRDBA adapter of ``model`` on or off (off = the frozen base alone)."""
    for layer in lordba_layers(model).values():
        layer.adapter_enabled = enabled


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def expected_num_parameters(cfg: LoRDBAConfig, shapes: Iterable[tuple[int, int]]) -> int:
    """Trainable parameter count of a LoRDBA adapter over layers of ``(in, out)`` shapes."""
    total = 0
    for n_in, n_out in shapes:
        sizes = {"in": n_in, "mid": cfg.rank, "out": n_out}
        total += cfg.rank * (n_in + n_out) + sum(sizes[s] for s in cfg.scales)
    return total


def expected_adapter_bits(cfg: LoRDBAConfig, shapes: Iterable[tuple[int, int]], scale_bits: int = 16) -> int:
    """Information bits of a deployed adapter: ``r (in + out)`` signs plus ``scale_bits`` per scale entry."""
    total = 0
    for n_in, n_out in shapes:
        sizes = {"in": n_in, "mid": cfg.rank, "out": n_out}
        total += cfg.rank * (n_in + n_out) + scale_bits * sum(sizes[s] for s in cfg.scales)
    return total
